//! Bounds what decoding one raft message may allocate.
//!
//! A frame's byte limit (512 MiB, etcd's) does not bound the memory its decoding takes: an
//! empty entry is 2 bytes on the wire and a 104-byte `Entry` in memory, an unknown field 2
//! bytes and a 24-byte vector (rust-protobuf keeps them), a member id in a snapshot's
//! configuration 1 byte and 8. One request of empty entries made a node allocate some 27 GB.
//! So before decoding, a scan of the protobuf's framing counts what allocates: fields at every
//! level that is decoded, entries, and the bytes of every configuration. Real messages stay far
//! below the limits: raft-rs puts at most 1 MiB of entries in a message, and every entry of
//! this program is tens of bytes with four or five fields.

use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::{Entry, Message};

use super::msg_codec::CodecError;

/// The most entries one message may carry (27 MB of `Entry`s in memory).
pub const MAX_ENTRIES: u64 = 1 << 18;

/// The most fields one message may hold, counting those of its entries, snapshot and
/// snapshot metadata (25 MB if every one were kept as an unknown field).
pub const MAX_FIELDS: u64 = 1 << 20;

/// The most bytes of snapshot configuration (member ids) one message may carry.
pub const MAX_CONF_STATE_BYTES: u64 = 64 * 1024;

// Field numbers in eraftpb.proto.
const MESSAGE_ENTRIES: u64 = 7;
const MESSAGE_SNAPSHOT: u64 = 9;
const SNAPSHOT_METADATA: u64 = 2;
const METADATA_CONF_STATE: u64 = 1;

/// The messages whose fields the scan walks into (the ones decoding builds structs for; bytes
/// fields are shared with the receive buffer, not copied).
#[derive(Clone, Copy)]
enum Kind {
    Message,
    Entry,
    Snapshot,
    SnapshotMetadata,
}

/// What decoding the frames seen so far will allocate, against the limits. One budget covers
/// one message, however many pieces it arrives in (msgappv2 sends entries one by one).
#[derive(Default)]
pub struct Budget {
    fields: u64,
    entries: u64,
    conf_state_bytes: u64,
}

impl Budget {
    /// An unused budget.
    pub fn new() -> Budget {
        Budget::default()
    }

    /// Decodes a message if it fits the budget.
    ///
    /// # Errors
    ///
    /// [`CodecError::TooManyElements`] past a limit, [`CodecError::Protobuf`] if it does not
    /// decode.
    pub fn message(&mut self, pb: &Bytes) -> Result<Message, CodecError> {
        self.scan(pb, Kind::Message)?;
        Ok(Message::parse_from_carllerche_bytes(pb)?)
    }

    /// Decodes one entry (of a msgappv2 frame) if it fits the budget.
    ///
    /// # Errors
    ///
    /// As [`Budget::message`].
    pub fn entry(&mut self, pb: &Bytes) -> Result<Entry, CodecError> {
        self.add(Kind::Message, MESSAGE_ENTRIES)?;
        self.scan(pb, Kind::Entry)?;
        Ok(Entry::parse_from_carllerche_bytes(pb)?)
    }

    /// Counts the fields of `buf`, a `kind`, and of the messages in it that decoding builds.
    fn scan(&mut self, buf: &[u8], kind: Kind) -> Result<(), CodecError> {
        for field in Fields(buf) {
            let (number, payload) = field?;
            self.add(kind, number)?;
            match (kind, number, payload) {
                (Kind::Message, MESSAGE_ENTRIES, Some(entry)) => self.scan(entry, Kind::Entry)?,
                (Kind::Message, MESSAGE_SNAPSHOT, Some(snapshot)) => {
                    self.scan(snapshot, Kind::Snapshot)?
                }
                (Kind::Snapshot, SNAPSHOT_METADATA, Some(meta)) => {
                    self.scan(meta, Kind::SnapshotMetadata)?
                }
                (Kind::SnapshotMetadata, METADATA_CONF_STATE, Some(conf_state)) => {
                    self.conf_state_bytes += conf_state.len() as u64;
                    over(
                        "bytes of configuration",
                        self.conf_state_bytes,
                        MAX_CONF_STATE_BYTES,
                    )?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Counts one field `number` of a `kind`.
    fn add(&mut self, kind: Kind, number: u64) -> Result<(), CodecError> {
        self.fields += 1;
        over("fields", self.fields, MAX_FIELDS)?;
        if matches!(kind, Kind::Message) && number == MESSAGE_ENTRIES {
            self.entries += 1;
            check_entries(self.entries)?;
        }
        Ok(())
    }
}

/// Decodes a message after checking that decoding it allocates a bounded amount.
///
/// # Errors
///
/// As [`Budget::message`].
pub fn parse_message(pb: &Bytes) -> Result<Message, CodecError> {
    Budget::new().message(pb)
}

/// Refuses a message of more than [`MAX_ENTRIES`] entries.
///
/// # Errors
///
/// [`CodecError::TooManyElements`].
pub fn check_entries(count: u64) -> Result<(), CodecError> {
    over("entries", count, MAX_ENTRIES)
}

fn over(what: &'static str, count: u64, limit: u64) -> Result<(), CodecError> {
    if count > limit {
        return Err(CodecError::TooManyElements { what, count, limit });
    }
    Ok(())
}

/// The top-level fields of a protobuf: their numbers, and the payload of the length-delimited
/// ones.
struct Fields<'a>(&'a [u8]);

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Option<&'a [u8]>), CodecError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let field = self.field();
        if field.is_err() {
            self.0 = &[]; // stop after an error
        }
        Some(field)
    }
}

impl<'a> Fields<'a> {
    fn field(&mut self) -> Result<(u64, Option<&'a [u8]>), CodecError> {
        let key = self.varint()?;
        let payload = match key & 7 {
            0 => {
                self.varint()?;
                None
            }
            1 => {
                self.take(8)?;
                None
            }
            2 => {
                let len = self.varint()?;
                Some(self.take(usize::try_from(len).map_err(|_| malformed())?)?)
            }
            5 => {
                self.take(4)?;
                None
            }
            // Groups (3, 4) are not in eraftpb; anything else is not protobuf.
            _ => return Err(malformed()),
        };
        Ok((key >> 3, payload))
    }

    fn varint(&mut self) -> Result<u64, CodecError> {
        let mut value = 0u64;
        for (i, &b) in self.0.iter().enumerate().take(10) {
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Ok(value);
            }
        }
        Err(malformed())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.0.len() < n {
            return Err(malformed());
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
}

fn malformed() -> CodecError {
    CodecError::Protobuf(protobuf::ProtobufError::WireError(
        protobuf::error::WireError::Other,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::{Entry, MessageType};

    fn encode(m: &Message) -> Bytes {
        m.write_to_bytes().expect("encode").into()
    }

    #[test]
    fn real_messages_decode_unchanged() {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        (m.to, m.from, m.term, m.index, m.commit) = (1, 2, 7, 300, 299);
        let entries: Vec<Entry> = (0..1000)
            .map(|i| Entry {
                index: 301 + i,
                term: 7,
                data: vec![1u8; 40].into(),
                ..Default::default()
            })
            .collect();
        m.set_entries(entries.into());
        let s = m.mut_snapshot();
        s.data = vec![9u8; 4096].into();
        s.mut_metadata().mut_conf_state().voters = vec![1, 2, 3, 1 << 40];
        s.mut_metadata().index = 12;
        assert_eq!(parse_message(&encode(&m)).expect("decodes"), m);
    }

    #[test]
    fn a_flood_of_empty_entries_is_refused_before_decoding() {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.set_entries(vec![Entry::default(); MAX_ENTRIES as usize].into());
        let pb = encode(&m);
        assert!(parse_message(&pb).is_ok(), "exactly the limit");
        // One more entry: 2 bytes on the wire.
        let more = Bytes::from([&pb[..], &[0x3a, 0x00]].concat());
        let err = parse_message(&more).expect_err("over the limit");
        assert!(
            matches!(
                err,
                CodecError::TooManyElements {
                    what: "entries",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_huge_configuration_is_refused_even_split_over_repeated_fields() {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgSnapshot);
        let ids = (MAX_CONF_STATE_BYTES / 2) as usize;
        m.mut_snapshot().mut_metadata().mut_conf_state().voters = vec![1 << 20; ids / 3];
        let half = encode(&m);
        assert!(parse_message(&half).is_ok());
        // The snapshot field twice: protobuf merges them, so the ids add up.
        let twice = Bytes::from([&half[..], &half[..]].concat());
        assert!(matches!(
            parse_message(&twice),
            Err(CodecError::TooManyElements { .. })
        ));
    }

    /// rust-protobuf keeps unknown fields: 2 bytes each on the wire, a vector each decoded.
    #[test]
    fn a_flood_of_unknown_fields_is_refused_at_every_level() {
        // Empty length-delimited fields no message here has: 20 at the top, 15 in an entry.
        let flood = |n: u64| [0xa2_u8, 0x01, 0x00].repeat(n as usize);
        let entry_flood = |n: u64| [0x7a_u8, 0x00].repeat(n as usize);
        let entry_with = |n: u64| {
            let body = entry_flood(n);
            let mut e = vec![0x3a];
            let mut len = body.len() as u64;
            while len >= 0x80 {
                e.push((len as u8) | 0x80);
                len >>= 7;
            }
            e.push(len as u8);
            e.extend_from_slice(&body);
            e
        };
        // Top level, and inside one entry.
        for pb in [flood(MAX_FIELDS + 1), entry_with(MAX_FIELDS)] {
            let err = parse_message(&Bytes::from(pb)).expect_err("too many fields");
            assert!(
                matches!(err, CodecError::TooManyElements { what: "fields", .. }),
                "{err}"
            );
        }
        assert!(
            parse_message(&Bytes::from(flood(1000))).is_ok(),
            "a few are fine"
        );
        // msgappv2 sends entries one by one: the budget spans them.
        let mut budget = Budget::new();
        let one = Bytes::from(entry_flood(MAX_FIELDS / 2));
        assert!(budget.entry(&one).is_ok());
        assert!(
            budget.entry(&one).is_err(),
            "the second half and the entries overflow"
        );
    }

    #[test]
    fn truncated_or_invalid_framing_is_an_error_not_a_panic() {
        let mut m = Message::default();
        m.set_entries(vec![Entry::default(); 3].into());
        m.mut_snapshot().data = vec![1; 10].into();
        let pb = encode(&m);
        for cut in 0..pb.len() {
            let _ = parse_message(&pb.slice(..cut));
        }
        assert!(
            parse_message(&Bytes::from_static(&[0x0b])).is_err(),
            "a group"
        );
        assert!(
            parse_message(&Bytes::from_static(&[0xff; 11])).is_err(),
            "a long varint"
        );
        assert!(
            parse_message(&Bytes::from_static(&[0x3a, 0x05, 0x00])).is_err(),
            "short"
        );
    }
}
