//! The writer killed (SIGKILL) at random points while it allocates blocks and flushes: the
//! image reopens (its log replayed when the kill came between the log entry and the BAT
//! writes), passes `qemu-img check`, holds every write acknowledged by a flush that
//! returned, and nothing else but zeroes or what was written.
mod common;
use common::*;
use ferry_storage::{open, Format, VhdxOptions};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const WRITES: u64 = 600;
const LEN: usize = 16 << 10;

/// Write `i` goes to its own place, a different 1 MiB block each time (so every write
/// allocates), at a varying offset in it.
fn spot(i: u64) -> u64 {
    ((i * 389) % WRITES) * (1 << 20) + (i % 7) * 4096
}

fn data(i: u64) -> Vec<u8> {
    (0..LEN)
        .map(|k| (k as u64 ^ i.wrapping_mul(2654435761)) as u8 | 1)
        .collect()
}

/// The child: writes, flushing every third write and printing what the flush covered.
#[test]
#[ignore = "the writer a crash test kills; run by a_writer_killed_anywhere_leaves_..."]
fn crash_writer() {
    let Ok(p) = std::env::var("FERRY_VHDX_CRASH_IMAGE") else {
        panic!("FERRY_VHDX_CRASH_IMAGE names the image to write");
    };
    let img = open(Path::new(&p), Format::Vhdx, false).unwrap();
    for i in 0..WRITES {
        img.write_at(&data(i), spot(i)).unwrap();
        if i % 3 == 2 {
            img.flush().unwrap();
            println!("flushed {i}");
        }
    }
    println!("done");
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn a_writer_killed_anywhere_leaves_a_consistent_image_with_every_flushed_write() {
    let d = tempfile::tempdir().unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    eprintln!("seed {seed}");
    let mut replayed = 0;
    for round in 0..12 {
        let v = d.path().join(format!("c{round}.vhdx"));
        let o = VhdxOptions {
            block_size: Some(1 << 20),
            ..VhdxOptions::dynamic(WRITES << 20)
        };
        drop(ferry_storage::create_vhdx(&v, &o).unwrap());
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["crash_writer", "--exact", "--ignored", "--nocapture", "-q"])
            .env("FERRY_VHDX_CRASH_IMAGE", &v)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        // Kill after a random number of flushes, a random while later.
        let after = next() % (WRITES / 3);
        let mut flushed: Option<u64> = None;
        let mut line = String::new();
        loop {
            line.clear();
            if out.read_line(&mut line).unwrap() == 0 || line.starts_with("done") {
                break;
            }
            if let Some(n) = line.trim().strip_prefix("flushed ") {
                flushed = Some(n.parse().unwrap());
                if flushed.unwrap() / 3 >= after {
                    std::thread::sleep(Duration::from_micros(next() % 10000));
                    break;
                }
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Lines the child printed before it died: flushes that returned.
        for l in out.lines().map_while(Result::ok) {
            if let Some(n) = l.trim().strip_prefix("flushed ") {
                flushed = Some(n.parse().unwrap());
            }
        }
        // Replay happens on this open: count the kills that came between a log entry and
        // its BAT writes (the BAT in place changes).
        let bat = |v: &Path| std::fs::read(v).unwrap()[3 << 20..4 << 20].to_vec();
        let before = bat(&v);
        let img = open(&v, Format::Vhdx, false).unwrap();
        if bat(&v) != before {
            replayed += 1;
        }
        let mut b = vec![0u8; LEN];
        for i in 0..WRITES {
            img.read_at(&mut b, spot(i)).unwrap();
            let acked = flushed.is_some_and(|f| i <= f);
            // Not acknowledged: there, or not, or partly (a write cut by the kill); never
            // anything else.
            let want = data(i);
            let ok = b == want || (!acked && b.iter().zip(&want).all(|(x, w)| x == w || *x == 0));
            assert!(
                ok,
                "round {round} (seed {seed}): write {i} (flushed to {flushed:?})"
            );
        }
        drop(img);
        qemu_img(&["check", "-q", "-f", "vhdx", s(&v)]);
    }
    eprintln!("{replayed} of 12 kills came between a log entry and its BAT writes");
}
