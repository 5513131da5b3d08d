//! Bounds what decoding one raft message may allocate.
//!
//! A frame's byte limit (512 MiB, etcd's) does not bound the memory its decoding takes: an
//! empty entry is 2 bytes on the wire and a 104-byte `Entry` in memory, and a member id in a
//! snapshot's configuration 1 byte against 8. One request of empty entries would make a node
//! allocate some 27 GB. So before decoding, a scan of the protobuf's framing counts what
//! allocates: entries, and the bytes of every configuration. Real messages stay far below the
//! limits: raft-rs puts at most 1 MiB of entries in a message, and every entry of this program
//! is tens of bytes.

use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::Message;

use super::msg_codec::CodecError;

/// The most entries one message may carry (27 MB of `Entry`s in memory).
pub const MAX_ENTRIES: u64 = 1 << 18;

/// The most bytes of snapshot configuration (member ids) one message may carry.
pub const MAX_CONF_STATE_BYTES: u64 = 64 * 1024;

// Field numbers in eraftpb.proto.
const MESSAGE_ENTRIES: u64 = 7;
const MESSAGE_SNAPSHOT: u64 = 9;
const SNAPSHOT_METADATA: u64 = 2;
const METADATA_CONF_STATE: u64 = 1;

/// Decodes a message after checking that decoding it allocates a bounded amount.
///
/// # Errors
///
/// [`CodecError::TooManyElements`] past a limit, [`CodecError::Protobuf`] if it does not decode.
pub fn parse_message(pb: &Bytes) -> Result<Message, CodecError> {
    let mut entries = 0;
    let mut conf_state_bytes = 0;
    for field in Fields(pb) {
        let (number, payload) = field?;
        match (number, payload) {
            (MESSAGE_ENTRIES, _) => entries += 1,
            (MESSAGE_SNAPSHOT, Some(snapshot)) => {
                conf_state_bytes += nested_len(snapshot, &[SNAPSHOT_METADATA, METADATA_CONF_STATE])?
            }
            _ => {}
        }
    }
    check_entries(entries)?;
    if conf_state_bytes > MAX_CONF_STATE_BYTES {
        return Err(CodecError::TooManyElements {
            what: "bytes of configuration",
            count: conf_state_bytes,
            limit: MAX_CONF_STATE_BYTES,
        });
    }
    Ok(Message::parse_from_carllerche_bytes(pb)?)
}

/// Refuses a message of more than [`MAX_ENTRIES`] entries.
///
/// # Errors
///
/// [`CodecError::TooManyElements`].
pub fn check_entries(count: u64) -> Result<(), CodecError> {
    if count > MAX_ENTRIES {
        return Err(CodecError::TooManyElements {
            what: "entries",
            count,
            limit: MAX_ENTRIES,
        });
    }
    Ok(())
}

/// The total length of the fields at `path` (field numbers, outermost first) inside `buf`,
/// over every occurrence (protobuf merges repeated occurrences of a message field).
fn nested_len(buf: &[u8], path: &[u64]) -> Result<u64, CodecError> {
    let Some((&first, rest)) = path.split_first() else {
        return Ok(buf.len() as u64);
    };
    let mut total = 0;
    for field in Fields(buf) {
        if let (number, Some(inner)) = field?
            && number == first
        {
            total += nested_len(inner, rest)?;
        }
    }
    Ok(total)
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
