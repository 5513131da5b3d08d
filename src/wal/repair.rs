//! Telling a torn tail from corruption, and repairing a torn tail (etcd `wal/repair.go` and
//! `decoder.isTornEntry`).
//!
//! A crash during an append can leave the last segment ending in a partly written frame: the
//! file ends inside it, or some of its 512-byte sectors were never written and still read as the
//! preallocated zeros. Such a frame was never acknowledged (`save` returns only after fsync), so
//! the log is cut just before it and opening succeeds, with a warning and a copy of the damaged
//! file in `<segment>.broken`.
//!
//! Anything else is corruption, and we refuse to guess. etcd's heuristic ("some sector chunk of
//! the frame is all zeros") is kept, with three safeguards so that damage to *acknowledged*
//! records is never mistaken for a torn write and silently cut off:
//!
//! 1. the zero test looks at whole 512-byte sectors of the file, not at the part of a sector the
//!    frame covers (a frame whose last few bytes are zero padding at a sector start would
//!    otherwise look torn);
//! 2. a torn write cannot damage an 8-byte length field alone, so if the bytes after the length
//!    field are an intact record (its CRC chains) of a different length, the length is corrupt;
//! 3. a torn write is the *end* of the log, so if an intact record follows the damaged one
//!    (CRC-chained to it), or any two CRC-chained records follow it, it is corruption.
//!
//! The price of safeguard 3: after a power loss that persisted a later part of an unsynced
//! batch but lost an earlier sector of it, opening refuses with a corruption error although the
//! records involved were never acknowledged. A false alarm that an operator can inspect (the
//! `.broken` copy is not made in that case; the file is untouched) is preferred to silently
//! cutting off records that were acknowledged.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::decoder::{FRAME_HEADER, decode_frame_size};
use super::error::WalError;
use super::pb::PbError;
use super::record::{self, RecordType};
use crate::fileutil;

/// Disk sector size assumed for torn-write detection (etcd `minSectorSize`).
pub const SECTOR: u64 = 512;

/// What was wrong with the frame at the failing offset.
#[derive(Debug)]
pub enum Failure {
    /// Fewer than 8 non-zero bytes left: a partial length field.
    ShortLengthField,
    /// The pad bits of the length field do not match the length.
    BadLengthField(u64),
    /// The frame is longer than what remains of the file.
    PastEndOfFile {
        /// Bytes the frame needs after its length field.
        need: u64,
        /// Bytes left in the file.
        have: u64,
    },
    /// The record is not a valid protobuf.
    BadRecord(PbError),
    /// The record type is unknown.
    UnknownType(i64),
    /// The stored CRC does not match the data.
    CrcMismatch {
        /// CRC in the record.
        stored: u32,
        /// CRC computed from the chain and the data.
        computed: u32,
    },
    /// A zero length field (end of data) followed by non-zero bytes.
    DataAfterZeroLength,
    /// The padding after the record is not zero (the encoder always writes zeros).
    NonZeroPad,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::ShortLengthField => write!(f, "file ends inside a frame length field"),
            Failure::BadLengthField(v) => {
                write!(
                    f,
                    "frame length field {v:#018x} is malformed (pad bits do not match)"
                )
            }
            Failure::PastEndOfFile { need, have } => write!(
                f,
                "frame needs {need} bytes but only {have} remain in the file"
            ),
            Failure::BadRecord(e) => write!(f, "record does not decode ({e})"),
            Failure::UnknownType(t) => write!(f, "unknown record type {t}"),
            Failure::CrcMismatch { stored, computed } => write!(
                f,
                "crc mismatch: record says {stored:#010x}, data gives {computed:#010x}"
            ),
            Failure::DataAfterZeroLength => {
                write!(
                    f,
                    "zero frame length (end of data) followed by non-zero bytes"
                )
            }
            Failure::NonZeroPad => write!(f, "frame padding is not zero"),
        }
    }
}

/// The decision for a failure in the last segment.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A torn write: cut the log at the failing offset.
    Torn,
    /// Corruption, with the reason.
    Corrupt(String),
}

/// A frame parsed from an in-memory region: its record fields and where it ends.
struct Parsed<'a> {
    rec_type: i64,
    crc: u32,
    data: &'a [u8],
    end: usize,
}

/// Parses the frame starting at `pos` of `bytes`, if its framing and protobuf are valid.
fn parse_frame(bytes: &[u8], pos: usize) -> Option<Parsed<'_>> {
    let head = bytes.get(pos..pos + FRAME_HEADER as usize)?;
    let len_field = u64::from_le_bytes(head.try_into().ok()?);
    let (rec_len, pad) = decode_frame_size(len_field)?;
    if rec_len == 0 {
        return None;
    }
    let start = pos + FRAME_HEADER as usize;
    let end = start.checked_add(usize::try_from(rec_len + pad).ok()?)?;
    let body = bytes.get(start..start + rec_len as usize)?;
    if end > bytes.len() {
        return None;
    }
    let rec = record::decode_record(body).ok()?;
    RecordType::from_i64(rec.rec_type)?;
    Some(Parsed {
        rec_type: rec.rec_type,
        crc: rec.crc,
        data: rec.data,
        end,
    })
}

/// Whether a record with `data` and stored `crc` chains from `prev`.
fn chains(prev: u32, rec_type: i64, crc: u32, data: &[u8]) -> bool {
    if rec_type == RecordType::Crc as i64 || data.is_empty() {
        // Without data the check degenerates to `crc == prev`; only trust it for a non-zero chain.
        prev != 0 && crc == prev
    } else {
        crc32c::crc32c_append(prev, data) == crc
    }
}

/// Parses a record right after a length field, using the protobuf's own field lengths instead
/// of the length field: `(type, crc, data, record length)`.
fn parse_self_delimited(bytes: &[u8]) -> Option<(i64, u32, &[u8], usize)> {
    let mut r = super::pb::Reader::new(bytes);
    let (mut t, mut crc, mut data) = (None, None, &[][..]);
    loop {
        let before = r.position();
        match r.next_field() {
            Ok(Some((1, super::pb::Value::Varint(v)))) if t.is_none() => t = Some(v as i64),
            Ok(Some((2, super::pb::Value::Varint(v)))) if t.is_some() && crc.is_none() => {
                crc = Some(u32::try_from(v).ok()?);
            }
            Ok(Some((3, super::pb::Value::Bytes(d)))) if crc.is_some() => {
                data = d;
                return Some((t?, crc?, data, r.position()));
            }
            _ => return Some((t?, crc?, data, before)),
        }
    }
}

/// Decides whether the failure at `offset` of the last segment `file` is a torn write.
/// `prev_crc` is the running CRC before the failing frame.
pub fn classify_tail(
    file: &File,
    path: &Path,
    offset: u64,
    prev_crc: u32,
    failure: &Failure,
) -> Result<Verdict, WalError> {
    let io = |e| WalError::Io {
        op: "read segment tail",
        path: path.to_path_buf(),
        source: e,
    };
    let len = file.metadata().map_err(io)?.len();
    let base = offset - offset % SECTOR;
    let mut bytes = vec![0u8; (len - base) as usize];
    file.read_exact_at(&mut bytes, base).map_err(io)?;
    let at = (offset - base) as usize;
    let corrupt = |why: &str| Ok(Verdict::Corrupt(format!("{failure}; {why}")));

    // A length field is written whole or not at all: malformed pad bits are never a torn write.
    if let Failure::BadLengthField(_) | Failure::UnknownType(_) = failure {
        return corrupt("a torn write cannot produce this");
    }

    // The frame's own extent, as far as the file holds it.
    let declared = bytes
        .get(at..at + FRAME_HEADER as usize)
        .and_then(|h| decode_frame_size(u64::from_le_bytes(h.try_into().ok()?)));
    let frame_end = declared
        .map(|(r, p)| at as u64 + FRAME_HEADER + r + p)
        .map_or(bytes.len(), |e| e.min(bytes.len() as u64) as usize);

    if let Failure::BadRecord(_) | Failure::CrcMismatch { .. } | Failure::NonZeroPad = failure {
        // etcd isTornEntry: torn only if some sector under the frame was never written.
        let data_start = at + FRAME_HEADER as usize;
        let first = data_start / SECTOR as usize;
        let last = frame_end.saturating_sub(1) / SECTOR as usize;
        let zero_sector = (first..=last).any(|s| {
            let lo = s * SECTOR as usize;
            let hi = (lo + SECTOR as usize).min(bytes.len());
            bytes[lo..hi].iter().all(|&b| b == 0)
        });
        if !zero_sector {
            return corrupt("the frame is fully written, so this is not a torn write");
        }
    }

    // Safeguard 2: an intact record behind a length field that disagrees with it.
    let after_len = at + FRAME_HEADER as usize;
    if let Some(body) = bytes.get(after_len..)
        && let Some((t, crc, data, rec_len)) = parse_self_delimited(body)
    {
        let intact = RecordType::from_i64(t).is_some() && chains(prev_crc, t, crc, data);
        if intact && declared.is_none_or(|(r, _)| r != rec_len as u64) {
            return corrupt(
                "the record after the length field is intact, so the length field is damaged",
            );
        }
    }

    // Safeguard 3a: the next frame chains from the damaged one (its stored crc, or the crc its
    // data would give if only the crc field is damaged).
    if let Some((rec_len, _)) = declared {
        let body = bytes.get(after_len..after_len + rec_len as usize);
        if let Some(rec) = body.and_then(|b| record::decode_record(b).ok()) {
            let candidates = [rec.crc, crc32c::crc32c_append(prev_crc, rec.data)];
            if let Some(next) = parse_frame(&bytes, frame_end)
                && candidates
                    .iter()
                    .any(|&c| chains(c, next.rec_type, next.crc, next.data))
            {
                return corrupt("the record after it is intact, so acknowledged data follows");
            }
        }
    }

    // Safeguard 3b: any two chained records anywhere after the failing offset.
    let mut pos = after_len;
    while pos + 2 * FRAME_HEADER as usize <= bytes.len() {
        if bytes[pos..pos + FRAME_HEADER as usize] != [0u8; 8]
            && let Some(a) = parse_frame(&bytes, pos)
            && let Some(b) = parse_frame(&bytes, a.end)
            && chains(a.crc, b.rec_type, b.crc, b.data)
        {
            let off = base + pos as u64;
            return corrupt(&format!(
                "intact records follow at byte offset {off}: this is not a torn final write, and \
                 cutting here could drop acknowledged entries (a disk that reordered unsynced \
                 writes in a power cut looks the same)"
            ));
        }
        pos += FRAME_HEADER as usize;
    }
    Ok(Verdict::Torn)
}

/// Repairs a torn tail: copies the segment to `<segment>.broken`, zeroes it from `offset` to
/// its end (keeping its preallocated length) and syncs it.
pub fn repair_torn_tail(
    file: &File,
    path: &Path,
    offset: u64,
    reason: &str,
) -> Result<(), WalError> {
    let mut broken = PathBuf::from(path);
    broken.as_mut_os_string().push(".broken");
    tracing::warn!(
        path = %path.display(),
        offset,
        reason,
        backup = %broken.display(),
        "WAL ends in a torn write (a crash during an append); cutting the log at the last valid record"
    );
    std::fs::copy(path, &broken).map_err(WalError::io("copy damaged segment to", &broken))?;
    fileutil::zero_to_end(file, offset).map_err(WalError::io("truncate torn tail of", path))?;
    file.sync_all().map_err(WalError::io("fsync", path))?;
    Ok(())
}
