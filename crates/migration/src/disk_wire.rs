//! The storage part of the protocol (`CAP_STORAGE`, shared-nothing migration): the disk list
//! the destination creates, and the frames of the storage connection. Frames use the common
//! header (`protocol::send_frame`); payloads are little-endian.
//!
//! | kind | frame | direction | payload |
//! |---:|---|---|---|
//! | 19 | DiskData | src → dst | `disk u32, offset u64`, then the bytes (≤ 4 MiB) |
//! | 20 | DiskZero | src → dst | `disk u32, offset u64, len u64`: the range reads as zeroes |
//! | 21 | DiskSync | both | `last u8`: src → dst, everything so far is sent, make it durable; dst → src, it is (answering each, in order). `last` = the VM is paused, nothing follows |
use crate::protocol::{malformed, send_frame, send_frame_parts, ProtocolError};
use serde::{Deserialize, Serialize};
use std::io::Write;

pub(crate) const K_DISK_DATA: u8 = 19;
pub(crate) const K_DISK_ZERO: u8 = 20;
pub(crate) const K_DISK_SYNC: u8 = 21;
/// Most disks in one `Disks` message.
pub const MAX_DISKS: usize = 64;
/// Most bytes of disk data in one frame.
pub const MAX_DISK_DATA: usize = 4 << 20;

/// One disk the destination is to create (in `Message::Disks`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// The disk's id in the VM (its device state names it).
    pub id: String,
    pub size: u64,
    /// The source image's format (`raw`, `qcow2`) and file name: the destination's defaults.
    pub format: String,
    pub name: String,
    /// Where the source asks for it (`--disk-map ID=PATH`), and in which format.
    pub path: Option<String>,
    pub to_format: Option<String>,
    /// The logical sector size the guest sees (4096 for a 4K-native VHDX; absent from
    /// peers before it: 512).
    #[serde(default = "sector_512")]
    pub sector: u32,
}

fn sector_512() -> u32 {
    512
}

/// A frame of the storage connection, decoded in place.
#[derive(Debug, PartialEq, Eq)]
pub enum DiskFrame<'a> {
    Data {
        disk: u32,
        offset: u64,
        data: &'a [u8],
    },
    Zero {
        disk: u32,
        offset: u64,
        len: u64,
    },
    Sync {
        last: bool,
    },
}

fn head(disk: u32, offset: u64) -> [u8; 12] {
    let mut h = [0u8; 12];
    h[..4].copy_from_slice(&disk.to_le_bytes());
    h[4..].copy_from_slice(&offset.to_le_bytes());
    h
}

/// Sends `data` at `offset` of disk `disk`, in frames of at most [`MAX_DISK_DATA`] bytes.
pub fn send_data(
    w: &mut impl Write,
    disk: u32,
    offset: u64,
    data: &[u8],
) -> Result<(), ProtocolError> {
    for (i, piece) in data.chunks(MAX_DISK_DATA).enumerate() {
        let h = head(disk, offset + (i * MAX_DISK_DATA) as u64);
        send_frame_parts(w, K_DISK_DATA, &[&h, piece])?;
    }
    Ok(())
}

pub fn send_zero(
    w: &mut impl Write,
    disk: u32,
    offset: u64,
    len: u64,
) -> Result<(), ProtocolError> {
    let mut p = head(disk, offset).to_vec();
    p.extend_from_slice(&len.to_le_bytes());
    send_frame(w, K_DISK_ZERO, &p)
}

pub fn send_sync(w: &mut impl Write, last: bool) -> Result<(), ProtocolError> {
    send_frame(w, K_DISK_SYNC, &[last as u8])
}

/// Decodes a storage-connection frame read by `protocol::recv_raw` (an Abort is for the
/// caller to handle first).
pub fn parse(kind: u8, p: &[u8]) -> Result<DiskFrame<'_>, ProtocolError> {
    let u32_at = |i: usize| u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
    let u64_at = |i: usize| u64::from_le_bytes(p[i..i + 8].try_into().unwrap_or_default());
    match kind {
        K_DISK_DATA if p.len() > 12 => Ok(DiskFrame::Data {
            disk: u32_at(0),
            offset: u64_at(4),
            data: &p[12..],
        }),
        K_DISK_DATA => Err(malformed("DiskData", format!("{} bytes", p.len()))),
        K_DISK_ZERO if p.len() == 20 => Ok(DiskFrame::Zero {
            disk: u32_at(0),
            offset: u64_at(4),
            len: u64_at(12),
        }),
        K_DISK_ZERO => Err(malformed("DiskZero", format!("{} bytes", p.len()))),
        K_DISK_SYNC => match p {
            [0] => Ok(DiskFrame::Sync { last: false }),
            [1] => Ok(DiskFrame::Sync { last: true }),
            _ => Err(malformed("DiskSync", format!("{p:?}"))),
        },
        k => Err(malformed(
            crate::protocol::kind_name(k),
            "not a storage-connection frame",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::recv_raw;

    #[test]
    fn frames_roundtrip_and_large_data_is_split() {
        let mut w = Vec::new();
        let data: Vec<u8> = (0..(MAX_DISK_DATA + 100)).map(|i| i as u8).collect();
        send_data(&mut w, 3, 1 << 40, &data).unwrap();
        send_zero(&mut w, 1, 512, 4096).unwrap();
        send_sync(&mut w, true).unwrap();
        let mut r = w.as_slice();
        let mut p = Vec::new();
        let mut got = Vec::new();
        for _ in 0..2 {
            let k = recv_raw(&mut r, &mut p).unwrap();
            match parse(k, &p).unwrap() {
                DiskFrame::Data { disk, offset, data } => {
                    assert_eq!(disk, 3);
                    assert_eq!(offset, (1 << 40) + got.len() as u64);
                    got.extend_from_slice(data);
                }
                f => panic!("{f:?}"),
            }
        }
        assert_eq!(got, data);
        let k = recv_raw(&mut r, &mut p).unwrap();
        assert_eq!(
            parse(k, &p).unwrap(),
            DiskFrame::Zero {
                disk: 1,
                offset: 512,
                len: 4096
            }
        );
        let k = recv_raw(&mut r, &mut p).unwrap();
        assert_eq!(parse(k, &p).unwrap(), DiskFrame::Sync { last: true });
        assert!(parse(K_DISK_SYNC, &[2]).is_err());
        assert!(parse(K_DISK_DATA, &[0; 12]).is_err());
        assert!(parse(K_DISK_ZERO, &[0; 19]).is_err());
    }
}
