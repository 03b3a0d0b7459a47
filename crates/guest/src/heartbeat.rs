//! Parsing the test guest's serial lines (format: docs/test-guest.md) and measuring the
//! heartbeat: host receive timestamps, largest gap (guest-observed pause), continuity.
use std::time::{Duration, Instant};

/// One line printed by the test guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestLine {
    /// `B ferry-guest 1 mem=<MiB>M`
    Boot { mem_mib: u64 },
    /// `S<c> <workload> [base=0x<hex> pages=<n>]`
    Start {
        cpu: u32,
        workload: String,
        base: Option<u64>,
        pages: Option<u64>,
    },
    /// `H<c> <seq> <tsc-hex>`
    Heartbeat { cpu: u32, seq: u64, tsc: u64 },
    /// `D<c> <pass>`
    DirtyPass { cpu: u32, pass: u64 },
    /// `V<c> <n> ok|BAD <sum-hex>`
    Verify {
        cpu: u32,
        n: u64,
        ok: bool,
        sum: u64,
    },
    /// `E<c>`
    End { cpu: u32 },
    /// `X <code>`
    PowerOff { code: u8 },
    /// `!<c> <message>` or `! panic`
    Error { message: String },
    /// Anything else (e.g. firmware output under QEMU).
    Other(String),
}

fn cpu_of(tag: &str, kind: char) -> Option<u32> {
    tag.strip_prefix(kind)?.parse().ok()
}

/// Parses one line (without its newline).
pub fn parse_line(line: &str) -> GuestLine {
    parse(line).unwrap_or_else(|| GuestLine::Other(line.to_string()))
}

fn parse(line: &str) -> Option<GuestLine> {
    let line = line.trim_end_matches(['\r', '\n']);
    if let Some(rest) = line.strip_prefix('!') {
        return Some(GuestLine::Error {
            message: rest.trim().to_string(),
        });
    }
    let mut w = line.split_ascii_whitespace();
    let tag = w.next()?;
    let kind = tag.chars().next()?;
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    Some(match kind {
        'B' if tag == "B" && w.next()? == "ferry-guest" => {
            let _version = w.next()?;
            let mem = w
                .next()?
                .strip_prefix("mem=")?
                .strip_suffix('M')?
                .parse()
                .ok()?;
            GuestLine::Boot { mem_mib: mem }
        }
        'S' => {
            let cpu = cpu_of(tag, 'S')?;
            let workload = w.next()?.to_string();
            let (mut base, mut pages) = (None, None);
            for kv in w {
                match kv.split_once('=')? {
                    ("base", v) => base = Some(hex(v)?),
                    ("pages", v) => pages = Some(v.parse().ok()?),
                    _ => return None,
                }
            }
            GuestLine::Start {
                cpu,
                workload,
                base,
                pages,
            }
        }
        'H' => GuestLine::Heartbeat {
            cpu: cpu_of(tag, 'H')?,
            seq: w.next()?.parse().ok()?,
            tsc: hex(w.next()?)?,
        },
        'D' => GuestLine::DirtyPass {
            cpu: cpu_of(tag, 'D')?,
            pass: w.next()?.parse().ok()?,
        },
        'V' => GuestLine::Verify {
            cpu: cpu_of(tag, 'V')?,
            n: w.next()?.parse().ok()?,
            ok: match w.next()? {
                "ok" => true,
                "BAD" => false,
                _ => return None,
            },
            sum: hex(w.next()?)?,
        },
        'E' => GuestLine::End {
            cpu: cpu_of(tag, 'E')?,
        },
        'X' if tag == "X" => GuestLine::PowerOff {
            code: w.next()?.parse().ok()?,
        },
        _ => return None,
    })
}

/// A heartbeat as received by the host.
#[derive(Debug, Clone, Copy)]
pub struct Beat {
    pub at: Instant,
    pub seq: u64,
    pub tsc: u64,
}

/// Heartbeats of one vCPU, in arrival order.
#[derive(Debug, Default, Clone)]
pub struct HeartbeatLog {
    pub beats: Vec<Beat>,
}

/// What is wrong with a heartbeat sequence.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SequenceError {
    #[error("no heartbeat received")]
    Empty,
    #[error("heartbeat {after} was followed by {next}: {missing} missing")]
    Gap { after: u64, next: u64, missing: u64 },
    #[error("heartbeat {after} was followed by {next}: repeated or out of order")]
    Repeat { after: u64, next: u64 },
}

impl HeartbeatLog {
    pub fn push(&mut self, at: Instant, seq: u64, tsc: u64) {
        self.beats.push(Beat { at, seq, tsc });
    }

    /// Largest host-side interval between consecutive heartbeats, with the sequence number of
    /// the beat that ended it. Across a pause or migration this is the pause the guest saw,
    /// plus at most one heartbeat period.
    pub fn max_gap(&self) -> Option<(Duration, u64)> {
        self.beats
            .windows(2)
            .map(|w| (w[1].at.duration_since(w[0].at), w[1].seq))
            .max_by_key(|g| g.0)
    }

    /// Checks that sequence numbers go up by exactly one.
    pub fn check_continuous(&self) -> Result<(), SequenceError> {
        if self.beats.is_empty() {
            return Err(SequenceError::Empty);
        }
        for w in self.beats.windows(2) {
            let (a, b) = (w[0].seq, w[1].seq);
            if b <= a {
                return Err(SequenceError::Repeat { after: a, next: b });
            }
            if b != a + 1 {
                return Err(SequenceError::Gap {
                    after: a,
                    next: b,
                    missing: b - a - 1,
                });
            }
        }
        Ok(())
    }

    pub fn last_seq(&self) -> Option<u64> {
        self.beats.last().map(|b| b.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind() {
        assert_eq!(
            parse_line("B ferry-guest 1 mem=256M"),
            GuestLine::Boot { mem_mib: 256 }
        );
        assert_eq!(
            parse_line("S1 dirty base=0x600000 pages=4097"),
            GuestLine::Start {
                cpu: 1,
                workload: "dirty".into(),
                base: Some(0x600000),
                pages: Some(4097)
            }
        );
        assert_eq!(
            parse_line("S0 heartbeat"),
            GuestLine::Start {
                cpu: 0,
                workload: "heartbeat".into(),
                base: None,
                pages: None
            }
        );
        assert_eq!(
            parse_line("H0 17 1f3a"),
            GuestLine::Heartbeat {
                cpu: 0,
                seq: 17,
                tsc: 0x1f3a
            }
        );
        assert_eq!(parse_line("D3 2"), GuestLine::DirtyPass { cpu: 3, pass: 2 });
        assert_eq!(
            parse_line("V0 1 BAD ff"),
            GuestLine::Verify {
                cpu: 0,
                n: 1,
                ok: false,
                sum: 255
            }
        );
        assert_eq!(parse_line("E2"), GuestLine::End { cpu: 2 });
        assert_eq!(parse_line("X 3"), GuestLine::PowerOff { code: 3 });
        assert_eq!(
            parse_line("!0 unknown workload"),
            GuestLine::Error {
                message: "0 unknown workload".into()
            }
        );
        assert_eq!(
            parse_line("SeaBIOS (version 1.16)"),
            GuestLine::Other("SeaBIOS (version 1.16)".into())
        );
        assert_eq!(parse_line("H0 x 1"), GuestLine::Other("H0 x 1".into()));
    }

    #[test]
    fn gaps_and_continuity() {
        let t = Instant::now();
        let mut log = HeartbeatLog::default();
        assert_eq!(log.check_continuous(), Err(SequenceError::Empty));
        for (i, ms) in [0u64, 1, 2, 40, 41].iter().enumerate() {
            log.push(t + Duration::from_millis(*ms), i as u64 + 1, 0);
        }
        assert_eq!(log.check_continuous(), Ok(()));
        assert_eq!(log.max_gap(), Some((Duration::from_millis(38), 4)));
        log.push(t + Duration::from_millis(42), 7, 0);
        assert_eq!(
            log.check_continuous(),
            Err(SequenceError::Gap {
                after: 5,
                next: 7,
                missing: 1
            })
        );
        log.beats.pop();
        log.push(t + Duration::from_millis(42), 5, 0);
        assert_eq!(
            log.check_continuous(),
            Err(SequenceError::Repeat { after: 5, next: 5 })
        );
    }
}
