//! Writes starting inputs for the fuzz targets: every protocol message as a frame (and all of
//! them as one stream), and a real snapshot in the snapshot target's input format.
use ferry_migration::protocol::{send, PAGE};
use std::path::Path;

fn main() -> std::io::Result<()> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/seeds".into());
    let (p, s) = (
        Path::new(&out).join("protocol"),
        Path::new(&out).join("snapshot"),
    );
    std::fs::create_dir_all(&p)?;
    std::fs::create_dir_all(&s)?;
    let page: Vec<u8> = (0..PAGE).map(|i| (i * 7 / 3) as u8).collect();
    let msgs = ferry_migration::fuzz::sample_messages();
    let mut all = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        let mut b = Vec::new();
        send(&mut b, m).map_err(std::io::Error::other)?;
        std::fs::write(p.join(format!("{i:02}-{}", m.name())), &b)?;
        all.extend(b);
    }
    std::fs::write(p.join("all"), &all)?;
    let d = std::env::temp_dir().join(format!("ferry-seed-snap-{}", std::process::id()));
    let mut w = ferry_snapshot::Writer::create(&d).map_err(std::io::Error::other)?;
    w.add_pages(0x1000, &[page.clone(), page.clone()].concat())
        .map_err(std::io::Error::other)?;
    w.add_zero(0x5000, 3);
    w.finish(None, b"state bytes")
        .map_err(std::io::Error::other)?;
    let st = std::fs::read(d.join(ferry_snapshot::STATE_FILE))?;
    let mem = std::fs::read(d.join(ferry_snapshot::MEMORY_FILE))?;
    let mut input = (st.len() as u32).to_le_bytes().to_vec();
    input.extend(&st);
    input.extend(&mem);
    std::fs::write(s.join("real"), input)?;
    let _ = std::fs::remove_dir_all(&d);
    Ok(())
}
