//! Frame encoding (etcd `wal/encoder.go` + `pkg/ioutil/pagewriter.go`).
//!
//! A frame is
//!
//! ```text
//! frame    := u64_le(lenField) || recordBytes || zero_pad
//! pad      := (8 - len(recordBytes) % 8) % 8
//! lenField := len(recordBytes) | (pad != 0 ? (0x80 | pad) << 56 : 0)
//! ```
//!
//! so every frame is a multiple of 8 bytes and a length field never straddles a sector: it is
//! either fully written or not at all, which is what lets the decoder tell a torn tail from
//! corruption. `recordBytes` is a `walpb.Record` whose `crc` is the CRC-32C (Castagnoli) of the
//! `data` of every record so far, this one included, across all segments
//! (`crc = crc32c_append(previous_crc, data)`).
//!
//! Frames are collected in a buffer and reach the file only on [`Encoder::flush`] (sync or cut)
//! or when more than 128 KiB are pending; then only whole 4 KiB pages are written, as etcd's
//! `PageWriter` does, so that a later write does not rewrite a partly written page. All encoding
//! goes into reused buffers: appending an entry allocates nothing.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use raft::eraftpb::{Entry, HardState};

use super::pb;
use super::record::{self, RecordType};

/// Flush granularity (etcd `walPageBytes` = 8 sectors of 512 bytes).
pub const PAGE_BYTES: u64 = 8 * 512;
/// Pending bytes above which whole pages are written out (etcd `defaultBufferBytes`).
const BUFFER_WATERMARK: usize = 128 * 1024;
/// Buffers grown beyond this by one huge record are shrunk back after a flush.
const BUFFER_KEEP: usize = 4 << 20;

/// `encodeFrameSize`: the length field and the pad for a record of `rec_len` bytes.
pub fn encode_frame_size(rec_len: usize) -> (u64, usize) {
    let pad = (8 - rec_len % 8) % 8;
    let mut len_field = rec_len as u64;
    if pad != 0 {
        len_field |= (0x80 | pad as u64) << 56;
    }
    (len_field, pad)
}

/// Appends one frame for `(rec_type, data)` to `buf`, advancing the running `crc`.
fn append_frame(buf: &mut Vec<u8>, crc: &mut u32, rec_type: RecordType, data: &[u8]) {
    *crc = crc32c::crc32c_append(*crc, data);
    let rec_len = record::record_len(rec_type, *crc, data.len());
    let (len_field, pad) = encode_frame_size(rec_len);
    buf.reserve(8 + rec_len + pad);
    buf.extend_from_slice(&len_field.to_le_bytes());
    record::encode_record(buf, rec_type, *crc, data);
    buf.resize(buf.len() + pad, 0);
}

/// Encodes records for one segment file.
pub struct Encoder {
    /// Frames not yet written; `buf[0]` belongs at file offset `flushed`.
    buf: Vec<u8>,
    /// Reused buffer for a record's payload (an entry, a hard state...).
    scratch: Vec<u8>,
    /// Running CRC after the last encoded record.
    crc: u32,
    /// File offset up to which bytes have been written.
    flushed: u64,
}

impl Encoder {
    /// An encoder appending at `offset` whose chain continues from `prev_crc`.
    pub fn new(prev_crc: u32, offset: u64) -> Self {
        Encoder {
            buf: Vec::with_capacity(BUFFER_WATERMARK + PAGE_BYTES as usize),
            scratch: Vec::with_capacity(1024),
            crc: prev_crc,
            flushed: offset,
        }
    }

    /// The running CRC (to carry into the next segment).
    pub fn crc(&self) -> u32 {
        self.crc
    }

    /// File offset up to which frames have been written to the file (buffered ones excluded).
    pub fn flushed(&self) -> u64 {
        self.flushed
    }

    /// File offset after the last encoded frame (buffered bytes included).
    pub fn offset(&self) -> u64 {
        self.flushed + self.buf.len() as u64
    }

    /// Encodes a record with the given payload.
    pub fn encode(&mut self, file: &File, rec_type: RecordType, data: &[u8]) -> io::Result<()> {
        append_frame(&mut self.buf, &mut self.crc, rec_type, data);
        self.maybe_write_pages(file)
    }

    /// Encodes an entry record.
    pub fn encode_entry(&mut self, file: &File, e: &Entry) -> io::Result<()> {
        self.scratch.clear();
        pb::encode_entry(&mut self.scratch, e);
        append_frame(
            &mut self.buf,
            &mut self.crc,
            RecordType::Entry,
            &self.scratch,
        );
        self.shrink_scratch();
        self.maybe_write_pages(file)
    }

    /// Encodes a hard-state record.
    pub fn encode_state(&mut self, file: &File, hs: &HardState) -> io::Result<()> {
        self.scratch.clear();
        pb::encode_hard_state(&mut self.scratch, hs);
        append_frame(
            &mut self.buf,
            &mut self.crc,
            RecordType::State,
            &self.scratch,
        );
        self.maybe_write_pages(file)
    }

    fn shrink_scratch(&mut self) {
        if self.scratch.capacity() > BUFFER_KEEP {
            self.scratch = Vec::with_capacity(1024);
        }
    }

    /// PageWriter overflow: once the buffer passes the watermark, write every complete page and
    /// keep the unaligned remainder (less than a page) buffered.
    fn maybe_write_pages(&mut self, file: &File) -> io::Result<()> {
        if self.buf.len() < BUFFER_WATERMARK {
            return Ok(());
        }
        let end = self.offset();
        let aligned_end = end - end % PAGE_BYTES;
        if aligned_end <= self.flushed {
            return Ok(());
        }
        let n = (aligned_end - self.flushed) as usize;
        file.write_all_at(&self.buf[..n], self.flushed)?;
        self.flushed = aligned_end;
        self.buf.drain(..n);
        Ok(())
    }

    /// Writes every pending byte to `file` (not synced).
    pub fn flush(&mut self, file: &File) -> io::Result<()> {
        if !self.buf.is_empty() {
            file.write_all_at(&self.buf, self.flushed)?;
            self.flushed += self.buf.len() as u64;
            self.buf.clear();
        }
        if self.buf.capacity() > BUFFER_KEEP {
            self.buf = Vec::with_capacity(BUFFER_WATERMARK + PAGE_BYTES as usize);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_sizes() {
        assert_eq!(encode_frame_size(4), (0x8400_0000_0000_0004, 4));
        assert_eq!(encode_frame_size(16), (16, 0));
        assert_eq!(encode_frame_size(23), (0x8100_0000_0000_0017, 1));
        assert_eq!(encode_frame_size(14), (0x8200_0000_0000_000e, 2));
    }

    #[test]
    fn large_batches_write_whole_pages_only() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("f")).unwrap();
        let mut enc = Encoder::new(0, 100);
        let data = vec![1u8; 1000];
        for _ in 0..200 {
            enc.encode(&f, RecordType::Metadata, &data).unwrap();
            assert!(enc.flushed.is_multiple_of(PAGE_BYTES) || enc.flushed == 100);
        }
        assert!(enc.flushed > 100);
        let end = enc.offset();
        enc.flush(&f).unwrap();
        assert_eq!(f.metadata().unwrap().len(), end);
    }
}
