//! The msgappv2 stream framing (etcd `msgappv2_codec.go`): only `MsgAppend` travels
//! here, and in steady replication most of each message can be predicted, so it is
//! left out. All integers are big-endian.
//!
//! Encoder and decoder each keep per-connection state `(term, index)`, both 0 when
//! the connection opens: the term and the index of the last entry sent.
//!
//! Link heartbeat (the stream's keep-alive):
//! ```text
//! | offset | bytes | description |
//! +--------+-------+-------------+
//! | 0      | 1     | 0x00        |
//! ```
//!
//! AppEntries: a `MsgAppend` with `index == state.index` and
//! `log_term == term == state.term`. Type, from, to, term, log_term and index are
//! not sent; the decoder rebuilds them from its state and the connection's ends.
//! ```text
//! | offset | bytes | description                 |
//! +--------+-------+-----------------------------+
//! | 0      | 1     | 0x01                        |
//! | 1      | 8     | n = number of entries       |
//! | 9      | 8     | length of entry 1           |
//! | 17     | n1    | entry 1 (eraftpb.Entry)     |
//! | ...    |       | ... up to entry n           |
//! | x      | 8     | commit index                |
//! ```
//! After it, `state.index += n` (term unchanged).
//!
//! MsgApp (any other message):
//! ```text
//! | offset | bytes | description                 |
//! +--------+-------+-----------------------------+
//! | 0      | 1     | 0x02                        |
//! | 1      | 8     | n = length of the protobuf  |
//! | 9      | n     | eraftpb.Message             |
//! ```
//! After it, `state.term = m.term` and `state.index` = index of the last entry,
//! or `m.index` when there are none.

use bytes::{Buf, BytesMut};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};

use super::msg_codec::{
    CodecError, Decoded, Decoder, Encoder, MAX_FRAME_BYTES, checked_total, read_u64, write_pb,
};
use super::util::{is_link_heartbeat, link_heartbeat};

const TYPE_LINK_HEARTBEAT: u8 = 0x00;
const TYPE_APP_ENTRIES: u8 = 0x01;
const TYPE_MSG_APP: u8 = 0x02;

/// Encoder for one msgappv2 connection.
#[derive(Debug, Default)]
pub struct MsgAppV2Encoder {
    term: u64,
    index: u64,
}

impl MsgAppV2Encoder {
    /// An encoder at the start of a connection (term and index 0).
    pub fn new() -> MsgAppV2Encoder {
        MsgAppV2Encoder::default()
    }
}

impl Encoder for MsgAppV2Encoder {
    fn encode(&mut self, m: &Message, out: &mut Vec<u8>) -> Result<(), CodecError> {
        if is_link_heartbeat(m) {
            out.push(TYPE_LINK_HEARTBEAT);
        } else if m.msg_type == MessageType::MsgAppend
            && self.index == m.index
            && self.term == m.log_term
            && m.log_term == m.term
        {
            // etcd checks only the indexes and terms; requiring MsgAppend as well
            // costs nothing (only MsgAppend is routed here) and never mis-frames.
            out.push(TYPE_APP_ENTRIES);
            out.extend_from_slice(&(m.entries.len() as u64).to_be_bytes());
            for e in m.entries.iter() {
                let size = e.compute_size();
                out.extend_from_slice(&u64::from(size).to_be_bytes());
                write_pb(e, out)?;
            }
            out.extend_from_slice(&m.commit.to_be_bytes());
            self.index += m.entries.len() as u64;
        } else {
            let size = m.compute_size();
            out.push(TYPE_MSG_APP);
            out.extend_from_slice(&u64::from(size).to_be_bytes());
            write_pb(m, out)?;
            self.term = m.term;
            self.index = m.entries.last().map_or(m.index, |e| e.index);
        }
        Ok(())
    }
}

/// Decoder for one msgappv2 connection, dialed by `local` to `remote`.
#[derive(Debug)]
pub struct MsgAppV2Decoder {
    local: u64,
    remote: u64,
    term: u64,
    index: u64,
    limit: u64,
    /// How far an AppEntries frame still arriving has been scanned, so each new
    /// chunk resumes the length walk instead of starting over.
    scan: Option<Scan>,
}

#[derive(Debug, Clone, Copy)]
struct Scan {
    /// Entries in the frame.
    n: u64,
    /// Entries whose length and bytes are known to be in the buffer.
    seen: u64,
    /// Offset just past the last seen entry.
    pos: usize,
}

impl MsgAppV2Decoder {
    /// A decoder for the stream from `remote` to `local`, at the start of a connection.
    pub fn new(local: u64, remote: u64) -> MsgAppV2Decoder {
        MsgAppV2Decoder::with_limit(local, remote, MAX_FRAME_BYTES)
    }

    /// `limit` bounds one whole frame; etcd has none for msgappv2.
    pub fn with_limit(local: u64, remote: u64, limit: u64) -> MsgAppV2Decoder {
        let (term, index, scan) = (0, 0, None);
        MsgAppV2Decoder {
            local,
            remote,
            term,
            index,
            limit,
            scan,
        }
    }

    fn decode_app_entries(&mut self, buf: &mut BytesMut) -> Result<Decoded, CodecError> {
        let mut scan = match self.scan {
            Some(s) => s,
            None => {
                let Some(n) = read_u64(buf, 1) else {
                    return Ok(Decoded::NeedMore(9));
                };
                // Every entry takes at least its 8-byte length.
                if n > self.limit / 8 {
                    return Err(CodecError::TooLarge {
                        len: n.saturating_mul(8),
                        limit: self.limit,
                    });
                }
                super::pb_bounds::check_entries(n)?;
                Scan { n, seen: 0, pos: 9 }
            }
        };
        while scan.seen < scan.n {
            let Some(size) = read_u64(buf, scan.pos) else {
                self.scan = Some(scan);
                return Ok(Decoded::NeedMore(scan.pos + 8));
            };
            let end = checked_total(scan.pos + 8, size, self.limit)?;
            if end as u64 > self.limit {
                return Err(CodecError::TooLarge {
                    len: end as u64,
                    limit: self.limit,
                });
            }
            if buf.len() < end {
                self.scan = Some(scan);
                return Ok(Decoded::NeedMore(end));
            }
            scan.pos = end;
            scan.seen += 1;
        }
        let Some(commit) = read_u64(buf, scan.pos) else {
            self.scan = Some(scan);
            return Ok(Decoded::NeedMore(scan.pos + 8));
        };
        // The whole frame is here: take it off the buffer and parse the entries.
        self.scan = None;
        let frame = buf.split_to(scan.pos + 8).freeze();
        let mut m = Message::new();
        m.msg_type = MessageType::MsgAppend;
        m.from = self.remote;
        m.to = self.local;
        m.term = self.term;
        m.log_term = self.term;
        m.index = self.index;
        m.commit = commit;
        let mut pos = 9;
        let mut budget = super::pb_bounds::Budget::new();
        for _ in 0..scan.n {
            let size = read_u64(&frame, pos).expect("invariant: scanned above") as usize;
            let entry = frame.slice(pos + 8..pos + 8 + size);
            m.entries.push(budget.entry(&entry)?);
            pos += 8 + size;
        }
        // A peer cannot make the running index wrap: that would be garbage, not a frame.
        self.index = self
            .index
            .checked_add(scan.n)
            .ok_or(CodecError::IndexOverflow)?;
        Ok(Decoded::Message(m))
    }
}

impl Decoder for MsgAppV2Decoder {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, CodecError> {
        let Some(&typ) = buf.first() else {
            return Ok(Decoded::NeedMore(1));
        };
        match typ {
            TYPE_LINK_HEARTBEAT => {
                buf.advance(1);
                Ok(Decoded::Message(link_heartbeat()))
            }
            TYPE_APP_ENTRIES => self.decode_app_entries(buf),
            TYPE_MSG_APP => {
                let Some(len) = read_u64(buf, 1) else {
                    return Ok(Decoded::NeedMore(9));
                };
                let total = checked_total(9, len, self.limit)?;
                if buf.len() < total {
                    return Ok(Decoded::NeedMore(total));
                }
                buf.advance(9);
                let pb = buf.split_to(total - 9).freeze();
                let m = super::pb_bounds::parse_message(&pb)?;
                self.term = m.term;
                self.index = m.entries.last().map_or(m.index, |e| e.index);
                Ok(Decoded::Message(m))
            }
            other => Err(CodecError::UnknownType(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rafthttp::codec_test_util::{arb_entry, arb_message};
    use crate::rafthttp::msg_codec::decode_all;
    use proptest::prelude::*;
    use raft::eraftpb::Entry;

    const LOCAL: u64 = 2;
    const REMOTE: u64 = 1;

    fn entry(term: u64, index: u64, data: &'static [u8]) -> Entry {
        let mut e = Entry::new();
        e.term = term;
        e.index = index;
        e.data = bytes::Bytes::from_static(data);
        e
    }

    fn app(term: u64, log_term: u64, index: u64, entries: Vec<Entry>, commit: u64) -> Message {
        let mut m = Message::new();
        m.msg_type = MessageType::MsgAppend;
        (m.from, m.to, m.term, m.log_term, m.index, m.commit) =
            (REMOTE, LOCAL, term, log_term, index, commit);
        m.entries = entries.into();
        m
    }

    fn encode_all(ms: &[Message]) -> Vec<u8> {
        let mut enc = MsgAppV2Encoder::new();
        let mut out = Vec::new();
        for m in ms {
            enc.encode(m, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn frames_match_the_byte_tables() {
        let first = app(1, 1, 0, vec![entry(1, 1, b"a")], 0);
        let second = app(1, 1, 1, vec![entry(1, 2, b"b")], 1);
        let bytes = encode_all(&[link_heartbeat(), first.clone(), second.clone()]);
        assert_eq!(bytes[0], TYPE_LINK_HEARTBEAT);
        // (0,0) state: the first append with term 1 needs the full MsgApp form.
        assert_eq!(bytes[1], TYPE_MSG_APP);
        let len = read_u64(&bytes, 2).unwrap() as usize;
        let app_entries = &bytes[10 + len..];
        let e = second.entries[0].write_to_bytes().unwrap();
        let mut want = vec![TYPE_APP_ENTRIES];
        want.extend_from_slice(&1u64.to_be_bytes());
        want.extend_from_slice(&(e.len() as u64).to_be_bytes());
        want.extend_from_slice(&e);
        want.extend_from_slice(&1u64.to_be_bytes());
        assert_eq!(app_entries, &want[..]);

        let got = decode_all(&mut MsgAppV2Decoder::new(LOCAL, REMOTE), &bytes).unwrap();
        assert!(is_link_heartbeat(&got[0]));
        assert_eq!(got[1..], [first, second]);
    }

    #[test]
    fn truncations_wait_and_garbage_fails() {
        let bytes = encode_all(&[
            app(3, 3, 7, vec![entry(3, 8, b"x")], 5),
            app(3, 3, 8, vec![entry(3, 9, b"yy"), entry(3, 10, b"")], 6),
        ]);
        for cut in 0..bytes.len() {
            // Cutting anywhere is either a clean prefix or asks for more, never a panic.
            match decode_all(&mut MsgAppV2Decoder::new(LOCAL, REMOTE), &bytes[..cut]) {
                Ok(ms) => assert!(ms.len() < 2),
                Err(e) => assert!(matches!(e, CodecError::Truncated(_)), "{e}"),
            }
        }
        let mut dec = MsgAppV2Decoder::new(LOCAL, REMOTE);
        assert!(matches!(
            decode_all(&mut dec, &[7]),
            Err(CodecError::UnknownType(7))
        ));
        let mut huge = vec![TYPE_APP_ENTRIES];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(
            decode_all(&mut dec, &huge),
            Err(CodecError::TooLarge { .. })
        ));
        let mut big_entry = vec![TYPE_APP_ENTRIES];
        big_entry.extend_from_slice(&1u64.to_be_bytes());
        big_entry.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(matches!(
            decode_all(&mut dec, &big_entry),
            Err(CodecError::TooLarge { .. })
        ));
    }

    /// A stream of appends as a leader in steady state would send them: each one
    /// continues where the previous one ended, some jump (a new term or a probe).
    fn arb_appends() -> impl Strategy<Value = Vec<Message>> {
        proptest::collection::vec(
            (
                any::<bool>(),
                0u64..3,
                proptest::collection::vec(arb_entry(), 0..4),
                any::<u64>(),
            ),
            1..12,
        )
        .prop_map(|steps| {
            let (mut term, mut index) = (1u64, 0u64);
            let mut out = Vec::new();
            for (jump, bump, mut entries, commit) in steps {
                if jump {
                    term += bump;
                    index += bump * 3;
                }
                for (i, e) in entries.iter_mut().enumerate() {
                    e.index = index + 1 + i as u64;
                }
                let m = app(term, term, index, entries, commit);
                index = m.entries.last().map_or(index, |e| e.index);
                out.push(m);
            }
            out
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn appends_round_trip(ms in arb_appends(), chunk in 1usize..64) {
            let bytes = encode_all(&ms);
            // Feed in small chunks to exercise the resumable scan.
            let mut dec = MsgAppV2Decoder::new(LOCAL, REMOTE);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in bytes.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Decoded::Message(m) = dec.decode(&mut buf).unwrap() {
                    got.push(m);
                }
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(got, ms);
        }

        #[test]
        fn any_message_round_trips_as_msgapp(m in arb_message()) {
            // Messages that are not predictable appends go whole and come back whole.
            prop_assume!(!is_link_heartbeat(&m));
            prop_assume!(!(m.msg_type == MessageType::MsgAppend && m.index == 0 && m.term == 0 && m.log_term == 0));
            let got = decode_all(&mut MsgAppV2Decoder::new(LOCAL, REMOTE), &encode_all(std::slice::from_ref(&m))).unwrap();
            prop_assert_eq!(got, vec![m]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_all(&mut MsgAppV2Decoder::new(LOCAL, REMOTE), &bytes);
        }
    }

    /// A forged MsgApp at index u64::MAX followed by an AppEntries frame is an error, not an
    /// overflow (a panic in debug builds, a wrapped index in release).
    #[test]
    fn index_overflow_is_an_error() {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.index = u64::MAX;
        let pb = protobuf::Message::write_to_bytes(&m).expect("encode");
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[TYPE_MSG_APP]);
        buf.extend_from_slice(&(pb.len() as u64).to_be_bytes());
        buf.extend_from_slice(&pb);
        buf.extend_from_slice(&[TYPE_APP_ENTRIES]);
        buf.extend_from_slice(&1u64.to_be_bytes()); // one entry
        buf.extend_from_slice(&0u64.to_be_bytes()); // of zero bytes
        buf.extend_from_slice(&0u64.to_be_bytes()); // commit
        let mut dec = MsgAppV2Decoder::new(1, 2);
        assert!(matches!(dec.decode(&mut buf), Ok(Decoded::Message(_))));
        assert!(matches!(
            dec.decode(&mut buf),
            Err(CodecError::IndexOverflow)
        ));
    }
}
