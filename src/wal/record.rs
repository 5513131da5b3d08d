//! walpb: the WAL's record and snapshot-marker messages (etcd `wal/walpb/record.proto`).
//!
//! ```proto
//! message Record   { optional int64  type  = 1;   // always written
//!                    optional uint32 crc   = 2;   // always written
//!                    optional bytes  data  = 3; } // written when present
//! message Snapshot { optional uint64 index = 1;   // always written
//!                    optional uint64 term  = 2;   // always written
//!                    optional raftpb.ConfState conf_state = 3; } // etcd 3.5+, when present
//! ```
//!
//! | type | name     | data                                            |
//! |------|----------|-------------------------------------------------|
//! | 1    | metadata | opaque application bytes, identical in every segment |
//! | 2    | entry    | `raftpb.Entry`                                  |
//! | 3    | state    | `raftpb.HardState` (never written when empty)   |
//! | 4    | crc      | none; `crc` carries the running checksum into a new segment |
//! | 5    | snapshot | `walpb.Snapshot` (a snapshot marker)            |
//!
//! etcd writes `data` only when its Go slice is non-nil; we write it when non-empty, which
//! decodes identically (an absent `bytes` field reads as empty).

use super::WalSnapshot;
use super::pb::{self, PbError, Reader};

/// The kind of a WAL record (the `type` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i64)]
pub enum RecordType {
    /// Application metadata, repeated at the head of every segment.
    Metadata = 1,
    /// A raft log entry.
    Entry = 2,
    /// A raft HardState.
    State = 3,
    /// The running CRC carried into a new segment.
    Crc = 4,
    /// A snapshot marker.
    Snapshot = 5,
}

impl RecordType {
    /// Maps the wire value back to a type; `None` for values etcd never writes.
    pub fn from_i64(v: i64) -> Option<RecordType> {
        Some(match v {
            1 => RecordType::Metadata,
            2 => RecordType::Entry,
            3 => RecordType::State,
            4 => RecordType::Crc,
            5 => RecordType::Snapshot,
            _ => return None,
        })
    }
}

/// Appends a serialized `walpb.Record{type, crc, data}` to `buf`.
pub fn encode_record(buf: &mut Vec<u8>, rec_type: RecordType, crc: u32, data: &[u8]) {
    pb::put_varint_field(buf, 1, rec_type as i64 as u64);
    pb::put_varint_field(buf, 2, u64::from(crc));
    if !data.is_empty() {
        pb::put_bytes_field(buf, 3, data);
    }
}

/// Size in bytes of what [`encode_record`] writes.
pub fn record_len(rec_type: RecordType, crc: u32, data_len: usize) -> usize {
    let mut n = 1 + pb::uvarint_len(rec_type as i64 as u64) + 1 + pb::uvarint_len(u64::from(crc));
    if data_len > 0 {
        n += 1 + pb::uvarint_len(data_len as u64) + data_len;
    }
    n
}

/// A decoded record borrowing its data from the frame buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// The raw `type` field (checked against [`RecordType`] by the reader).
    pub rec_type: i64,
    /// The stored running CRC.
    pub crc: u32,
    /// The payload.
    pub data: &'a [u8],
}

/// Decodes a `walpb.Record`.
pub fn decode_record(buf: &[u8]) -> Result<RecordRef<'_>, PbError> {
    let mut rec = RecordRef {
        rec_type: 0,
        crc: 0,
        data: &[],
    };
    let mut r = Reader::new(buf);
    while let Some((field, v)) = r.next_field()? {
        let at = r.position();
        match field {
            1 => rec.rec_type = pb::as_varint(v, at)? as i64,
            2 => {
                let c = pb::as_varint(v, at)?;
                rec.crc = u32::try_from(c).map_err(|_| PbError {
                    reason: "crc does not fit in 32 bits",
                    at,
                })?;
            }
            3 => rec.data = pb::as_bytes(v, at)?,
            _ => {}
        }
    }
    Ok(rec)
}

/// Appends a serialized `walpb.Snapshot`.
pub fn encode_wal_snapshot(buf: &mut Vec<u8>, s: &WalSnapshot) {
    pb::put_varint_field(buf, 1, s.index);
    pb::put_varint_field(buf, 2, s.term);
    if let Some(cs) = &s.conf_state {
        let mut tmp = Vec::new();
        pb::encode_conf_state(&mut tmp, cs);
        pb::put_bytes_field(buf, 3, &tmp);
    }
}

/// Decodes a `walpb.Snapshot`.
pub fn decode_wal_snapshot(buf: &[u8]) -> Result<WalSnapshot, PbError> {
    let mut s = WalSnapshot::default();
    let mut r = Reader::new(buf);
    while let Some((field, v)) = r.next_field()? {
        let at = r.position();
        match field {
            1 => s.index = pb::as_varint(v, at)?,
            2 => s.term = pb::as_varint(v, at)?,
            3 => s.conf_state = Some(pb::decode_conf_state(pb::as_bytes(v, at)?)?),
            _ => {}
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::ConfState;

    #[test]
    fn record_golden_and_len() {
        let mut b = Vec::new();
        encode_record(&mut b, RecordType::Crc, 0, &[]);
        assert_eq!(b, [0x08, 0x04, 0x10, 0x00]);
        assert_eq!(record_len(RecordType::Crc, 0, 0), 4);
        b.clear();
        encode_record(&mut b, RecordType::Entry, 0xb4f1_6e85, b"abc");
        assert_eq!(b.len(), record_len(RecordType::Entry, 0xb4f1_6e85, 3));
        let r = decode_record(&b).unwrap();
        assert_eq!((r.rec_type, r.crc, r.data), (2, 0xb4f1_6e85, &b"abc"[..]));
    }

    #[test]
    fn wal_snapshot_round_trip() {
        let mut b = Vec::new();
        encode_wal_snapshot(&mut b, &WalSnapshot::default());
        assert_eq!(b, [0x08, 0x00, 0x10, 0x00]);
        let cs = ConfState {
            voters: vec![1, 2, 3],
            ..Default::default()
        };
        let s = WalSnapshot {
            index: 7,
            term: 3,
            conf_state: Some(cs),
        };
        b.clear();
        encode_wal_snapshot(&mut b, &s);
        assert_eq!(decode_wal_snapshot(&b).unwrap(), s);
    }

    #[test]
    fn crc_too_large_is_an_error() {
        let mut b = Vec::new();
        pb::put_varint_field(&mut b, 2, 1 << 33);
        assert!(decode_record(&b).is_err());
    }
}
