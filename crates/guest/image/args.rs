//! Workload command line: `WORKLOAD [key=value]... [; WORKLOAD ...]`.
//! vCPU i runs segment i, or the last segment when there are fewer segments than vCPUs.
//! Tokens before the first workload name are skipped (QEMU puts the kernel path first).

#[derive(Clone, Copy, PartialEq)]
pub enum Kind {
    Idle,
    Heartbeat,
    Dirty,
    Verify,
    Disk,
    DiskVerify,
    DiskBench,
    Net,
    Tcp,
}

#[derive(Clone, Copy)]
pub struct Spec {
    pub kind: Kind,
    /// Heartbeat period in µs (heartbeat: the line period; dirty/verify: `hb=`, 0 = none).
    pub period_us: u64,
    /// Lines (heartbeat), passes (dirty), checks (verify); 0 = forever.
    pub count: u64,
    /// Region size in bytes (dirty, verify).
    pub size: u64,
    /// Write rate in bytes/s (dirty); 0 = as fast as possible.
    pub rate: u64,
    /// Seconds to run (idle); 0 = forever.
    pub seconds: u64,
    /// Bytes of disk from sector 0 the disk workloads use.
    pub span: u64,
    /// Bytes per disk request.
    pub bs: u64,
    /// Which block device (0 = the first found).
    pub dev: u64,
    /// disk-verify: the pass every block before `next` holds (blocks after: pass - 1).
    pub pass: u64,
    /// disk-verify: first block still at `pass - 1` (default: none).
    pub next: u64,
    /// net, tcp: the guest's IPv4 address (host order).
    pub ip: u32,
    /// tcp: the address's prefix length.
    pub prefix: u64,
    /// tcp: the IP MTU (bytes of an IP packet at most; 1450 inside a VXLAN overlay).
    pub mtu: u64,
    /// disk-bench: requests in flight (1..=32).
    pub qd: u64,
    /// disk-bench: random block offsets (else sequential).
    pub random: bool,
    /// disk-bench: reads (else writes).
    pub read: bool,
}

fn kind_of(word: &str) -> Option<Kind> {
    match word {
        "idle" => Some(Kind::Idle),
        "heartbeat" => Some(Kind::Heartbeat),
        "dirty" => Some(Kind::Dirty),
        "verify" => Some(Kind::Verify),
        "disk" => Some(Kind::Disk),
        "disk-verify" => Some(Kind::DiskVerify),
        "disk-bench" => Some(Kind::DiskBench),
        "net" => Some(Kind::Net),
        "tcp" => Some(Kind::Tcp),
        _ => None,
    }
}

/// Number with an optional K/M/G suffix (powers of 1024).
fn number(v: &str) -> Result<u64, &'static str> {
    let b = v.as_bytes();
    if b.is_empty() {
        return Err("empty number");
    }
    let (digits, mult) = match b[b.len() - 1] {
        b'k' | b'K' => (&b[..b.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&b[..b.len() - 1], 1 << 20),
        b'g' | b'G' => (&b[..b.len() - 1], 1 << 30),
        _ => (b, 1),
    };
    if digits.is_empty() {
        return Err("bad number");
    }
    let mut n: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err("bad number");
        }
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add((d - b'0') as u64))
            .ok_or("number too large")?;
    }
    n.checked_mul(mult).ok_or("number too large")
}

fn parse_segment(seg: &str) -> Result<Spec, &'static str> {
    let mut words = seg.split_ascii_whitespace();
    let kind = words.next().and_then(kind_of).ok_or("unknown workload")?;
    let mut spec = Spec {
        kind,
        period_us: if kind == Kind::Heartbeat { 1000 } else { 0 },
        count: 0,
        size: 64 << 20,
        rate: 0,
        seconds: 0,
        span: 4 << 20,
        bs: 4096,
        dev: 0,
        pass: 1,
        next: u64::MAX,
        ip: 0,
        prefix: 24,
        mtu: 1500,
        qd: 1,
        random: false,
        read: false,
    };
    for w in words {
        let (k, v) = w.split_once('=').ok_or("expected key=value")?;
        if matches!(kind, Kind::Net | Kind::Tcp) && k == "ip" {
            spec.ip = ipv4(v)?;
            continue;
        }
        let n = number(v)?;
        match (kind, k) {
            (Kind::Heartbeat, "period") | (Kind::Dirty | Kind::Verify, "hb") => spec.period_us = n,
            (Kind::Heartbeat, "count") | (Kind::Dirty, "passes") | (Kind::Verify, "count") => {
                spec.count = n
            }
            (Kind::Dirty | Kind::Verify, "size") => spec.size = n,
            (Kind::Dirty, "rate") => spec.rate = n,
            (Kind::Idle, "seconds") => spec.seconds = n,
            (Kind::Disk | Kind::DiskVerify, "hb") => spec.period_us = n,
            (Kind::Disk, "passes") => spec.count = n,
            (Kind::Disk, "rate") => spec.rate = n,
            (Kind::Disk | Kind::DiskVerify | Kind::DiskBench, "span") => spec.span = n,
            (Kind::Disk | Kind::DiskVerify | Kind::DiskBench, "bs") => spec.bs = n,
            (Kind::Disk | Kind::DiskVerify | Kind::DiskBench, "dev") => spec.dev = n,
            (Kind::DiskBench, "qd") => spec.qd = n,
            (Kind::DiskBench, "ops") => spec.count = n,
            (Kind::DiskBench, "random") => spec.random = n != 0,
            (Kind::DiskBench, "read") => spec.read = n != 0,
            (Kind::DiskVerify, "pass") => spec.pass = n,
            (Kind::DiskVerify, "next") => spec.next = n,
            (Kind::Net | Kind::Tcp, "hb") => spec.period_us = n,
            (Kind::Net | Kind::Tcp, "dev") => spec.dev = n,
            (Kind::Tcp, "prefix") => spec.prefix = n,
            (Kind::Tcp, "mtu") => spec.mtu = n,
            _ => return Err("unknown argument"),
        }
    }
    if kind == Kind::Heartbeat && spec.period_us == 0 {
        return Err("period must be > 0");
    }
    if matches!(kind, Kind::Dirty | Kind::Verify) && spec.size < 4096 {
        return Err("size must be >= 4K");
    }
    if matches!(kind, Kind::Net | Kind::Tcp) && spec.ip == 0 {
        return Err("net and tcp need ip=A.B.C.D");
    }
    if kind == Kind::Tcp && (spec.prefix == 0 || spec.prefix > 32) {
        return Err("prefix must be 1..32");
    }
    if kind == Kind::Tcp && !(576..=2022).contains(&spec.mtu) {
        return Err("mtu must be 576..2022");
    }
    if kind == Kind::DiskBench && !(1..=crate::virtio::MAX_QD as u64).contains(&spec.qd) {
        return Err("qd must be 1..32");
    }
    if matches!(kind, Kind::Disk | Kind::DiskVerify | Kind::DiskBench) {
        if spec.bs == 0 || spec.bs % 512 != 0 || spec.bs > 1 << 20 {
            return Err("bs must be a multiple of 512, at most 1M");
        }
        if spec.span < spec.bs || spec.span % spec.bs != 0 {
            return Err("span must be a whole number of bs");
        }
        if spec.pass == 0 {
            return Err("pass must be >= 1");
        }
    }
    Ok(spec)
}

/// `A.B.C.D` as a host-order u32.
fn ipv4(v: &str) -> Result<u32, &'static str> {
    let mut ip = 0u32;
    let mut parts = 0;
    for p in v.split('.') {
        let n = number(p)?;
        if n > 255 {
            return Err("bad IPv4 address");
        }
        ip = ip << 8 | n as u32;
        parts += 1;
    }
    if parts != 4 {
        return Err("bad IPv4 address");
    }
    Ok(ip)
}

/// The workload text: from the first known workload name on.
fn workload_text(cmdline: &str) -> &str {
    let mut rest = cmdline;
    loop {
        let t = rest.trim_start();
        let end = t.find(|c: char| c.is_ascii_whitespace() || c == ';').unwrap_or(t.len());
        if end == 0 || kind_of(&t[..end]).is_some() {
            return t;
        }
        rest = &t[end..];
    }
}

pub fn spec_for_cpu(cmdline: &str, cpu: u64) -> Result<Spec, &'static str> {
    let text = workload_text(cmdline);
    if text.trim().is_empty() {
        return parse_segment("idle");
    }
    let n = text.split(';').count() as u64;
    let idx = cpu.min(n - 1) as usize;
    let seg = text.split(';').nth(idx).ok_or("no workload")?;
    parse_segment(seg)
}

/// Bytes of memory the workload of this spec needs.
pub fn region_size(spec: &Spec) -> u64 {
    let page = crate::pattern::PAGE_SIZE;
    match spec.kind {
        Kind::Dirty => (spec.size.div_ceil(page) + 1) * page,
        Kind::Verify => spec.size.div_ceil(page) * page,
        // Status page, ring page, header page, data buffer.
        Kind::Disk | Kind::DiskVerify => 3 * page + spec.bs.div_ceil(page) * page,
        // The same with a data buffer per request in flight.
        Kind::DiskBench => 3 * page + spec.qd * spec.bs.div_ceil(page) * page,
        // Status page, RX ring, TX ring, 4 RX buffers of 2 KiB, TX buffer, control ring,
        // control command.
        Kind::Net | Kind::Tcp => 8 * page,
        Kind::Idle | Kind::Heartbeat => 0,
    }
}
