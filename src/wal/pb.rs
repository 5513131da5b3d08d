//! A tiny protobuf wire codec, and etcd-compatible (gogoproto) encodings of the raft types.
//!
//! Why hand-written: etcd v3.4 marshals `raftpb` with gogoproto, which **always writes
//! non-nullable scalar fields, zeros included** (`Entry{Type:0}` starts `08 00`), while
//! rust-protobuf (proto3) omits zero fields. Both decode each other, but only the gogo form
//! reproduces etcd's files byte for byte (reference B.3, B.10). Writing by hand into a reused
//! buffer also avoids one allocation per entry on the WAL's hot path.
//!
//! Wire format reminders: a field is `key = field_number << 3 | wire_type` (a varint) and then
//! a varint (wire type 0), 8 bytes (1), a varint length + bytes (2) or 4 bytes (5).
//! Decoders accept any field order, repeated scalars packed or not, and skip unknown fields.

use bytes::Bytes;
use protobuf::ProtobufEnum;
use raft::eraftpb::{ConfState, Entry, EntryType, HardState, Snapshot, SnapshotMetadata};

/// Appends `v` as a base-128 varint.
pub fn put_uvarint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

/// Number of bytes [`put_uvarint`] writes for `v`.
pub fn uvarint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Appends a varint field (wire type 0).
pub fn put_varint_field(buf: &mut Vec<u8>, field: u32, v: u64) {
    put_uvarint(buf, u64::from(field) << 3);
    put_uvarint(buf, v);
}

/// Appends a length-delimited field (wire type 2).
pub fn put_bytes_field(buf: &mut Vec<u8>, field: u32, data: &[u8]) {
    put_uvarint(buf, (u64::from(field) << 3) | 2);
    put_uvarint(buf, data.len() as u64);
    buf.extend_from_slice(data);
}

/// Appends a length-delimited field whose body is produced by `body` (length patched after).
fn put_message_field(buf: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    let mut tmp = Vec::new();
    body(&mut tmp);
    put_bytes_field(buf, field, &tmp);
}

/// A malformed protobuf message: what was wrong and at which byte of the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PbError {
    /// What was wrong.
    pub reason: &'static str,
    /// Byte position inside the message.
    pub at: usize,
}

impl std::fmt::Display for PbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bad protobuf: {} at message byte {}",
            self.reason, self.at
        )
    }
}

/// One decoded field value.
#[derive(Debug, Clone, Copy)]
pub enum Value<'a> {
    /// Wire type 0.
    Varint(u64),
    /// Wire type 2.
    Bytes(&'a [u8]),
    /// Wire type 1 or 5 (fixed 64 or 32 bits): no field we read uses them, so they are skipped.
    Fixed,
}

/// Iterates over the fields of one message.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Reads the fields of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    fn err(&self, reason: &'static str) -> PbError {
        PbError {
            reason,
            at: self.pos,
        }
    }

    fn uvarint(&mut self) -> Result<u64, PbError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(self.err("truncated varint"));
            };
            self.pos += 1;
            if i == 9 && b > 1 {
                return Err(self.err("varint overflows 64 bits"));
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(self.err("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], PbError> {
        let rest = self.buf.len() - self.pos;
        if n > rest as u64 {
            return Err(self.err("field runs past the end of the message"));
        }
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// The next `(field number, value)`, or `None` at the end of the message.
    pub fn next_field(&mut self) -> Result<Option<(u32, Value<'a>)>, PbError> {
        if self.pos == self.buf.len() {
            return Ok(None);
        }
        let key = self.uvarint()?;
        let field = key >> 3;
        if field == 0 || field > u64::from(u32::MAX >> 3) {
            return Err(self.err("invalid field number"));
        }
        let value = match key & 7 {
            0 => Value::Varint(self.uvarint()?),
            1 => {
                self.take(8)?;
                Value::Fixed
            }
            2 => {
                let n = self.uvarint()?;
                Value::Bytes(self.take(n)?)
            }
            5 => {
                self.take(4)?;
                Value::Fixed
            }
            _ => return Err(self.err("unsupported wire type")),
        };
        Ok(Some((field as u32, value)))
    }
}

/// Interprets a value as a varint scalar.
pub fn as_varint(v: Value<'_>, at: usize) -> Result<u64, PbError> {
    match v {
        Value::Varint(x) => Ok(x),
        _ => Err(PbError {
            reason: "wrong wire type for a varint field",
            at,
        }),
    }
}

/// Interprets a value as a length-delimited field.
pub fn as_bytes<'a>(v: Value<'a>, at: usize) -> Result<&'a [u8], PbError> {
    match v {
        Value::Bytes(b) => Ok(b),
        _ => Err(PbError {
            reason: "wrong wire type for a bytes field",
            at,
        }),
    }
}

/// Appends a repeated uint64 value, which may be packed (wire type 2) or not.
fn push_repeated(out: &mut Vec<u64>, v: Value<'_>, at: usize) -> Result<(), PbError> {
    match v {
        Value::Varint(x) => out.push(x),
        Value::Bytes(b) => {
            let mut r = Reader::new(b);
            while r.position() < b.len() {
                out.push(r.uvarint().map_err(|e| PbError { at, ..e })?);
            }
        }
        _ => {
            return Err(PbError {
                reason: "wrong wire type for a repeated uint64",
                at,
            });
        }
    }
    Ok(())
}

/// raftpb.Entry as gogo writes it: Type=1, Term=2, Index=3 always; Data=4 when present.
/// raft-rs's extra fields (sync_log=5, context=6) are written only when set; etcd skips them.
pub fn encode_entry(buf: &mut Vec<u8>, e: &Entry) {
    put_varint_field(buf, 1, e.entry_type.value() as u64);
    put_varint_field(buf, 2, e.term);
    put_varint_field(buf, 3, e.index);
    if !e.data.is_empty() {
        put_bytes_field(buf, 4, &e.data);
    }
    if e.sync_log {
        put_varint_field(buf, 5, 1);
    }
    if !e.context.is_empty() {
        put_bytes_field(buf, 6, &e.context);
    }
}

/// Decodes a raftpb.Entry.
pub fn decode_entry(buf: &[u8]) -> Result<Entry, PbError> {
    let mut e = Entry::default();
    let mut r = Reader::new(buf);
    while let Some((field, v)) = r.next_field()? {
        let at = r.position();
        match field {
            1 => {
                let t = as_varint(v, at)? as i32;
                e.entry_type = EntryType::from_i32(t).ok_or(PbError {
                    reason: "unknown entry type",
                    at,
                })?;
            }
            2 => e.term = as_varint(v, at)?,
            3 => e.index = as_varint(v, at)?,
            4 => e.data = Bytes::copy_from_slice(as_bytes(v, at)?),
            5 => e.sync_log = as_varint(v, at)? != 0,
            6 => e.context = Bytes::copy_from_slice(as_bytes(v, at)?),
            _ => {}
        }
    }
    Ok(e)
}

/// raftpb.HardState: Term=1, Vote=2, Commit=3, always written.
pub fn encode_hard_state(buf: &mut Vec<u8>, hs: &HardState) {
    put_varint_field(buf, 1, hs.term);
    put_varint_field(buf, 2, hs.vote);
    put_varint_field(buf, 3, hs.commit);
}

/// Decodes a raftpb.HardState.
pub fn decode_hard_state(buf: &[u8]) -> Result<HardState, PbError> {
    let mut hs = HardState::default();
    let mut r = Reader::new(buf);
    while let Some((field, v)) = r.next_field()? {
        let at = r.position();
        match field {
            1 => hs.term = as_varint(v, at)?,
            2 => hs.vote = as_varint(v, at)?,
            3 => hs.commit = as_varint(v, at)?,
            _ => {}
        }
    }
    Ok(hs)
}

/// raftpb.ConfState: Voters=1, Learners=2, VotersOutgoing=3, LearnersNext=4 (unpacked),
/// AutoLeave=5 (always written).
pub fn encode_conf_state(buf: &mut Vec<u8>, cs: &ConfState) {
    for (field, ids) in [
        (1, &cs.voters),
        (2, &cs.learners),
        (3, &cs.voters_outgoing),
        (4, &cs.learners_next),
    ] {
        for &id in ids {
            put_varint_field(buf, field, id);
        }
    }
    put_varint_field(buf, 5, u64::from(cs.auto_leave));
}

/// Decodes a raftpb.ConfState.
pub fn decode_conf_state(buf: &[u8]) -> Result<ConfState, PbError> {
    let mut cs = ConfState::default();
    let mut r = Reader::new(buf);
    while let Some((field, v)) = r.next_field()? {
        let at = r.position();
        match field {
            1 => push_repeated(&mut cs.voters, v, at)?,
            2 => push_repeated(&mut cs.learners, v, at)?,
            3 => push_repeated(&mut cs.voters_outgoing, v, at)?,
            4 => push_repeated(&mut cs.learners_next, v, at)?,
            5 => cs.auto_leave = as_varint(v, at)? != 0,
            _ => {}
        }
    }
    Ok(cs)
}

/// raftpb.Snapshot: Data=1 when present, Metadata=2 always
/// (SnapshotMetadata: ConfState=1 always, Index=2, Term=3).
pub fn encode_snapshot(buf: &mut Vec<u8>, s: &Snapshot) {
    if !s.data.is_empty() {
        put_bytes_field(buf, 1, &s.data);
    }
    let meta = s.get_metadata();
    put_message_field(buf, 2, |m| {
        put_message_field(m, 1, |c| encode_conf_state(c, meta.get_conf_state()));
        put_varint_field(m, 2, meta.index);
        put_varint_field(m, 3, meta.term);
    });
}

/// Decodes a raftpb.Snapshot.
pub fn decode_snapshot(buf: &[u8]) -> Result<Snapshot, PbError> {
    let mut s = Snapshot::default();
    let mut r = Reader::new(buf);
    while let Some((field, v)) = r.next_field()? {
        let at = r.position();
        match field {
            1 => s.data = Bytes::copy_from_slice(as_bytes(v, at)?),
            2 => {
                let meta = decode_snapshot_metadata(as_bytes(v, at)?)?;
                s.set_metadata(meta);
            }
            _ => {}
        }
    }
    Ok(s)
}

fn decode_snapshot_metadata(buf: &[u8]) -> Result<SnapshotMetadata, PbError> {
    let mut m = SnapshotMetadata::default();
    let mut r = Reader::new(buf);
    while let Some((field, v)) = r.next_field()? {
        let at = r.position();
        match field {
            1 => m.set_conf_state(decode_conf_state(as_bytes(v, at)?)?),
            2 => m.index = as_varint(v, at)?,
            3 => m.term = as_varint(v, at)?,
            _ => {}
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::Message;

    #[test]
    fn varint_lengths() {
        for v in [0u64, 1, 127, 128, 16383, 16384, u32::MAX as u64, u64::MAX] {
            let mut b = Vec::new();
            put_uvarint(&mut b, v);
            assert_eq!(b.len(), uvarint_len(v), "{v}");
            let mut r = Reader::new(&b);
            assert_eq!(r.uvarint().unwrap(), v);
        }
    }

    #[test]
    fn entry_matches_gogo_and_rust_protobuf_reads_it() {
        let e = Entry {
            term: 1,
            index: 1,
            data: Bytes::from_static(b"hello"),
            ..Default::default()
        };
        let mut b = Vec::new();
        encode_entry(&mut b, &e);
        assert_eq!(b, b"\x08\x00\x10\x01\x18\x01\x22\x05hello");
        let parsed = Entry::parse_from_bytes(&b).unwrap();
        assert_eq!(parsed, e);
        assert_eq!(decode_entry(&b).unwrap(), e);
    }

    #[test]
    fn conf_state_packed_and_unpacked() {
        let cs = ConfState {
            voters: vec![1, 2, 300],
            learners: vec![4],
            ..Default::default()
        };
        let packed = cs.write_to_bytes().unwrap();
        assert_eq!(decode_conf_state(&packed).unwrap(), cs);
        let mut b = Vec::new();
        encode_conf_state(&mut b, &cs);
        assert_eq!(decode_conf_state(&b).unwrap(), cs);
        assert_eq!(ConfState::parse_from_bytes(&b).unwrap(), cs);
    }

    #[test]
    fn snapshot_round_trip_and_unknown_fields_skipped() {
        let mut s = Snapshot {
            data: Bytes::from_static(b"{}"),
            ..Default::default()
        };
        s.mut_metadata().index = 9;
        s.mut_metadata().term = 2;
        s.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        let mut b = Vec::new();
        encode_snapshot(&mut b, &s);
        assert_eq!(decode_snapshot(&b).unwrap(), s);
        assert_eq!(Snapshot::parse_from_bytes(&b).unwrap(), s);
        // An unknown field of each wire type is skipped.
        b.extend_from_slice(&[
            0x78, 0x05, 0x81, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0x8a, 0x01, 0x01, 0xff,
        ]);
        b.extend_from_slice(&[0x95, 0x01, 1, 2, 3, 4]);
        assert_eq!(decode_snapshot(&b).unwrap(), s);
    }

    #[test]
    fn malformed_inputs_error() {
        for bad in [
            &b"\x08"[..],
            b"\x22\x05hel",
            b"\x0b",
            b"\x00\x01",
            b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f",
        ] {
            assert!(decode_entry(bad).is_err(), "{bad:?}");
        }
        assert!(decode_entry(b"\x08\x07").is_err(), "unknown entry type");
    }
}
