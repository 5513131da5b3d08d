//! Frame decoding across segments (etcd `wal/decoder.go`).
//!
//! The decoder reads the selected segments in order and checks the CRC chain: every record but
//! a crc record must carry `crc32c_append(running, data)`; a crc record (the first record of each
//! segment) must carry the running value, unless the decoder has not seen any data yet (it
//! starts reading mid-log), and re-seeds it.
//!
//! End of a segment: a zero length field (preallocated space) or the end of the file. In a
//! segment that is not the last one, whatever follows a zero length field must be zeros too.
//!
//! No record-size cap: a frame may be as long as what remains of its file (etcd main; v3.4's
//! 10 MiB cap made large entries unreadable after a restart, etcd#14025).
//!
//! Failures become [`DecodeError::Corrupt`] with the path and the frame offset, except in the
//! **last** segment, where [`super::repair::classify_tail`] decides whether the damage is a torn
//! write ([`DecodeError::Torn`], repairable) or corruption.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::PathBuf;

use super::error::WalError;
use super::record::{self, RecordType};
use super::repair::{self, Failure, Verdict};

/// Size of the length field that starts each frame (etcd `frameSizeBytes`).
pub const FRAME_HEADER: u64 = 8;
/// Buffer size of the segment reader.
const READ_BUFFER: usize = 256 * 1024;

/// `decodeFrameSize`: `(record bytes, pad bytes)` from a length field, or `None` when the pad
/// bits are not what the encoder writes for that length (then the field itself is damaged).
pub fn decode_frame_size(len_field: u64) -> Option<(u64, u64)> {
    let rec = len_field & !(0xff << 56);
    let top = len_field >> 56;
    let pad = if top & 0x80 != 0 { top & 0x7 } else { 0 };
    let expected_pad = (8 - rec % 8) % 8;
    let expected_top = if expected_pad == 0 {
        0
    } else {
        0x80 | expected_pad
    };
    (top == expected_top).then_some((rec, pad))
}

/// Why decoding stopped early.
#[derive(Debug)]
pub enum DecodeError {
    /// The last segment ends in a torn write at `offset`; everything before it is valid.
    Torn {
        /// Offset of the first bad frame in the last segment.
        offset: u64,
        /// What was found there.
        reason: String,
    },
    /// Corruption or an I/O error.
    Fatal(WalError),
}

impl From<WalError> for DecodeError {
    fn from(e: WalError) -> Self {
        DecodeError::Fatal(e)
    }
}

/// One decoded record. `data` borrows the decoder's buffer.
#[derive(Debug)]
pub struct Frame<'a> {
    /// The record type.
    pub rec_type: RecordType,
    /// The payload.
    pub data: &'a [u8],
    /// Index (into the decoder's segment list) of the segment holding the record.
    pub segment: usize,
    /// Offset of the frame in that segment.
    pub offset: u64,
}

struct Current {
    reader: BufReader<File>,
    len: u64,
}

/// Reads records from a list of segments.
pub struct Decoder {
    segments: Vec<(PathBuf, File)>,
    /// Index of the segment being read.
    index: usize,
    current: Option<Current>,
    /// Offset after the last valid frame in the current segment (etcd `lastValidOff`).
    offset: u64,
    crc: u32,
    /// Whether `crc` is the real running value: true when reading from the first segment of
    /// the log (whose chain starts at 0) or after a crc record. Until then a crc record is
    /// trusted as the seed (etcd skips the check while the running value is 0).
    crc_known: bool,
    buf: Vec<u8>,
}

impl Decoder {
    /// Decodes `segments` (path, readable handle) in order. `from_log_start` says the first
    /// one is the log's first segment (sequence 0), whose crc record must carry 0.
    pub fn new(segments: Vec<(PathBuf, File)>, from_log_start: bool) -> Self {
        Decoder {
            segments,
            index: 0,
            current: None,
            offset: 0,
            crc: 0,
            crc_known: from_log_start,
            buf: Vec::new(),
        }
    }

    /// The running CRC after the last valid record.
    pub fn last_crc(&self) -> u32 {
        self.crc
    }

    /// Offset after the last valid frame of the segment being read (the last one, once
    /// [`Decoder::next`] returned `None` or `Torn`).
    pub fn last_offset(&self) -> u64 {
        self.offset
    }

    fn is_last(&self) -> bool {
        self.index + 1 == self.segments.len()
    }

    fn io_err(&self, e: io::Error) -> DecodeError {
        DecodeError::Fatal(WalError::Io {
            op: "read segment",
            path: self.segments[self.index].0.clone(),
            source: e,
        })
    }

    /// Opens the current segment if needed; `false` once past the last segment.
    fn ensure_current(&mut self) -> Result<bool, DecodeError> {
        if self.current.is_some() {
            return Ok(true);
        }
        let Some((_, file)) = self.segments.get(self.index) else {
            return Ok(false);
        };
        let opened = file.try_clone().and_then(|f| Ok((f.metadata()?.len(), f)));
        let (len, file) = opened.map_err(|e| self.io_err(e))?;
        self.current = Some(Current {
            reader: BufReader::with_capacity(READ_BUFFER, file),
            len,
        });
        self.offset = 0;
        Ok(true)
    }

    /// Moves to the next segment. The offset of the last segment is kept.
    fn advance(&mut self) -> bool {
        if self.is_last() {
            self.index += 1;
            self.current = None;
            return false;
        }
        self.index += 1;
        self.current = None;
        true
    }

    /// Turns a failure at the current offset into an error: corruption, unless this is the last
    /// segment and the damage looks like a torn write.
    fn fail(&self, failure: Failure) -> DecodeError {
        let (path, file) = &self.segments[self.index];
        if !self.is_last() {
            return DecodeError::Fatal(WalError::Corrupt {
                path: path.clone(),
                offset: self.offset,
                reason: failure.to_string(),
            });
        }
        match repair::classify_tail(file, path, self.offset, self.crc, &failure) {
            Ok(Verdict::Torn) => DecodeError::Torn {
                offset: self.offset,
                reason: failure.to_string(),
            },
            Ok(Verdict::Corrupt(reason)) => DecodeError::Fatal(WalError::Corrupt {
                path: path.clone(),
                offset: self.offset,
                reason,
            }),
            Err(e) => DecodeError::Fatal(e),
        }
    }

    /// The next valid record, `Ok(None)` at the end of the last segment.
    pub fn next(&mut self) -> Result<Option<Frame<'_>>, DecodeError> {
        loop {
            if !self.ensure_current()? {
                return Ok(None);
            }
            let Some(cur) = self.current.as_mut() else {
                return Ok(None);
            };
            let remaining = cur.len.saturating_sub(self.offset);
            if remaining == 0 {
                if !self.advance() {
                    return Ok(None);
                }
                continue;
            }
            let mut head = [0u8; FRAME_HEADER as usize];
            let n = (remaining.min(FRAME_HEADER)) as usize;
            if let Err(e) = cur.reader.read_exact(&mut head[..n]) {
                return Err(self.io_err(e));
            }
            let len_field = u64::from_le_bytes(head);
            if len_field == 0 {
                // End of data in this segment: only zeros may follow.
                match all_zero_rest(&mut cur.reader) {
                    Ok(true) => {}
                    Ok(false) => return Err(self.fail(Failure::DataAfterZeroLength)),
                    Err(e) => return Err(self.io_err(e)),
                }
                if !self.advance() {
                    return Ok(None);
                }
                continue;
            }
            if remaining < FRAME_HEADER {
                return Err(self.fail(Failure::ShortLengthField));
            }
            let Some((rec_len, pad)) = decode_frame_size(len_field) else {
                return Err(self.fail(Failure::BadLengthField(len_field)));
            };
            let body = rec_len + pad;
            if body > remaining - FRAME_HEADER {
                return Err(self.fail(Failure::PastEndOfFile {
                    need: body,
                    have: remaining - FRAME_HEADER,
                }));
            }
            self.buf.resize(body as usize, 0);
            if let Err(e) = cur.reader.read_exact(&mut self.buf) {
                return Err(self.io_err(e));
            }
            if self.buf[rec_len as usize..].iter().any(|&b| b != 0) {
                return Err(self.fail(Failure::NonZeroPad));
            }
            let rec = match record::decode_record(&self.buf[..rec_len as usize]) {
                Ok(r) => r,
                Err(e) => return Err(self.fail(Failure::BadRecord(e))),
            };
            let Some(rec_type) = RecordType::from_i64(rec.rec_type) else {
                return Err(self.fail(Failure::UnknownType(rec.rec_type)));
            };
            let (stored, data_len) = (rec.crc, rec.data.len());
            if rec_type == RecordType::Crc {
                if self.crc_known && stored != self.crc {
                    // A crc record is written and synced before its segment gets its name: it
                    // cannot be torn, so a mismatch here is always corruption.
                    let (path, _) = &self.segments[self.index];
                    return Err(DecodeError::Fatal(WalError::Corrupt {
                        path: path.clone(),
                        offset: self.offset,
                        reason: format!(
                            "crc record carries {stored:#010x} but the previous segments end with \
                             {:#010x} (a segment was replaced or damaged)",
                            self.crc
                        ),
                    }));
                }
                self.crc = stored;
                self.crc_known = true;
            } else {
                let computed = crc32c::crc32c_append(self.crc, rec.data);
                if computed != stored {
                    return Err(self.fail(Failure::CrcMismatch { stored, computed }));
                }
                self.crc = computed;
            }
            let offset = self.offset;
            self.offset += FRAME_HEADER + body;
            let data_start = rec_len as usize - data_len;
            let data = &self.buf[data_start..rec_len as usize];
            debug_assert_eq!(data.len(), data_len);
            return Ok(Some(Frame {
                rec_type,
                data,
                segment: self.index,
                offset,
            }));
        }
    }
}

/// Reads `r` to its end; true if every byte is zero.
fn all_zero_rest(r: &mut impl Read) -> io::Result<bool> {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match r.read(&mut chunk) {
            Ok(0) => return Ok(true),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::encoder::encode_frame_size;

    #[test]
    fn frame_size_round_trip_and_bad_pad_bits() {
        for len in [1usize, 4, 7, 8, 9, 23, 1 << 20, (1 << 20) + 3] {
            let (field, pad) = encode_frame_size(len);
            assert_eq!(decode_frame_size(field), Some((len as u64, pad as u64)));
        }
        assert_eq!(decode_frame_size(0x8000_0000_0000_0008), None);
        assert_eq!(decode_frame_size(0x8300_0000_0000_0004), None);
        assert_eq!(decode_frame_size(0x0400_0000_0000_0004), None);
        assert_eq!(decode_frame_size(0x0000_0000_0000_0005), None);
    }
}
