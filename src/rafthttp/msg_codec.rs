//! The "message" stream framing (etcd `msg_codec.go`, `coder.go`), also used for the
//! header of a snapshot POST.
//!
//! ```text
//! | offset | bytes | description                          |
//! +--------+-------+--------------------------------------+
//! | 0      | 8     | n = length of the protobuf, u64 BE   |
//! | 8      | n     | raftpb.Message (= raft-rs eraftpb)   |
//! ```
//!
//! Go's link heartbeat is `00..00 1e` + 30 bytes of gogo proto2 (every scalar field
//! written, even zeros); rust-protobuf writes only `08 08`. Both sides parse both.
//!
//! Decoders work on a buffer the stream reader fills from the socket: `decode` takes
//! one whole frame off the front or says how many bytes it needs first, so a burst
//! of small frames costs one read, not one read per frame.

use bytes::{Buf, BytesMut};
use protobuf::{CodedOutputStream, Message as _};
use raft::eraftpb::Message;

/// etcd's `readBytesLimit`: a frame claiming more than this ends the stream.
pub const MAX_FRAME_BYTES: u64 = 512 * 1024 * 1024;

/// The most a reader reserves ahead of the bytes that arrived. A frame's length is a claim:
/// a peer that announces 512 MiB and then stalls must not pin that much per connection. Every
/// real message (at most about 1 MiB of entries) is within it, so those still take one
/// allocation; a larger frame grows as its bytes come.
pub const MAX_RESERVE_AHEAD: usize = 4 * 1024 * 1024;

/// Makes room in `buf` for a frame of `need` bytes (a [`Decoded::NeedMore`]), reserving at
/// most [`MAX_RESERVE_AHEAD`] beyond what it holds.
pub fn reserve_for_frame(buf: &mut BytesMut, need: usize) {
    buf.reserve(need.saturating_sub(buf.len()).min(MAX_RESERVE_AHEAD));
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A frame's length is above the reader's limit.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The announced length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The frame's protobuf does not decode.
    #[error("malformed protobuf in frame: {0}")]
    Protobuf(#[from] protobuf::ProtobufError),
    /// A msgappv2 frame starts with an unknown type byte.
    #[error("unknown msgappv2 frame type {0:#04x}")]
    UnknownType(u8),
    /// An AppEntries frame would move the stream's running index past `u64::MAX`.
    #[error("msgappv2 frame moves the log index past its maximum")]
    IndexOverflow,
    /// Decoding the frame would allocate too much (see `pb_bounds`).
    #[error("a message with {count} {what} exceeds the limit of {limit}")]
    TooManyElements {
        /// What was counted.
        what: &'static str,
        /// How many the frame holds.
        count: u64,
        /// The limit.
        limit: u64,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({0} bytes of it received)")]
    Truncated(usize),
}

/// What one `decode` call found at the front of the buffer.
#[derive(Debug)]
pub enum Decoded {
    /// A whole frame, already removed from the buffer.
    Message(Message),
    /// The buffer must hold at least this many bytes before the next frame can be
    /// decoded; nothing was consumed.
    NeedMore(usize),
}

/// Turns messages into frames appended to a batch buffer.
pub trait Encoder: Send {
    /// Appends `m`'s frame to `out`.
    fn encode(&mut self, m: &Message, out: &mut Vec<u8>) -> Result<(), CodecError>;
}

/// Takes frames off the front of a receive buffer.
pub trait Decoder: Send {
    /// Decodes the frame at the front of `buf`, if whole.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, CodecError>;
}

/// Appends `pb` (a protobuf message) to `out`, its size already computed.
pub(crate) fn write_pb(pb: &impl protobuf::Message, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let mut os = CodedOutputStream::vec(out);
    pb.write_to_with_cached_sizes(&mut os)?;
    os.flush()?;
    Ok(())
}

/// Encoder of the message stream; stateless.
#[derive(Debug, Default)]
pub struct MessageEncoder;

impl Encoder for MessageEncoder {
    fn encode(&mut self, m: &Message, out: &mut Vec<u8>) -> Result<(), CodecError> {
        let size = m.compute_size();
        out.reserve(8 + size as usize);
        out.extend_from_slice(&u64::from(size).to_be_bytes());
        write_pb(m, out)
    }
}

/// Decoder of the message stream; stateless apart from its size limit.
#[derive(Debug)]
pub struct MessageDecoder {
    limit: u64,
}

impl MessageDecoder {
    /// A decoder refusing frames longer than `limit` bytes.
    pub fn new(limit: u64) -> MessageDecoder {
        MessageDecoder { limit }
    }
}

impl Default for MessageDecoder {
    fn default() -> MessageDecoder {
        MessageDecoder::new(MAX_FRAME_BYTES)
    }
}

impl Decoder for MessageDecoder {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, CodecError> {
        let Some(len) = read_u64(buf, 0) else {
            return Ok(Decoded::NeedMore(8));
        };
        let total = checked_total(8, len, self.limit)?;
        if buf.len() < total {
            return Ok(Decoded::NeedMore(total));
        }
        buf.advance(8);
        // Freezing shares the receive buffer: entry payloads are not copied again.
        let pb = buf.split_to(total - 8).freeze();
        Ok(Decoded::Message(super::pb_bounds::parse_message(&pb)?))
    }
}

/// Big-endian u64 at `at`, if the buffer is long enough.
pub(crate) fn read_u64(buf: &[u8], at: usize) -> Option<u64> {
    let bytes: [u8; 8] = buf.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// `prefix + len` as a buffer size, refusing lengths over `limit` (and so any
/// length that would not fit in memory).
pub(crate) fn checked_total(prefix: usize, len: u64, limit: u64) -> Result<usize, CodecError> {
    if len > limit {
        return Err(CodecError::TooLarge { len, limit });
    }
    usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_add(prefix))
        .ok_or(CodecError::TooLarge { len, limit })
}

/// Encodes one message as a whole frame (tests and the snapshot header).
pub fn encode_frame(m: &Message) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::new();
    MessageEncoder.encode(m, &mut out)?;
    Ok(out)
}

/// Decodes every frame in `bytes`; a partial frame at the end is an error.
pub fn decode_all(dec: &mut dyn Decoder, bytes: &[u8]) -> Result<Vec<Message>, CodecError> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while !buf.is_empty() {
        match dec.decode(&mut buf)? {
            Decoded::Message(m) => out.push(m),
            Decoded::NeedMore(_) => return Err(CodecError::Truncated(buf.len())),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rafthttp::codec_test_util::arb_message;
    use crate::rafthttp::util::is_link_heartbeat;
    use proptest::prelude::*;

    #[test]
    fn a_claimed_frame_length_reserves_a_bounded_amount() {
        let mut buf = BytesMut::from(&b"12345678"[..]);
        reserve_for_frame(&mut buf, 512 * 1024 * 1024);
        assert!(
            buf.capacity() <= 8 + MAX_RESERVE_AHEAD,
            "{}",
            buf.capacity()
        );
        let mut small = BytesMut::new();
        reserve_for_frame(&mut small, 100_000);
        assert!(
            small.capacity() >= 100_000,
            "a real frame gets its room at once"
        );
    }

    /// etcd v3.4.23's link heartbeat frame, as Go's gogo proto2 encoder writes it.
    const GO_HEARTBEAT_FRAME: [u8; 38] = [
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1e, 0x08, 0x08, 0x10, 0x00, 0x18, 0x00, 0x20,
        0x00, 0x28, 0x00, 0x30, 0x00, 0x40, 0x00, 0x4a, 0x0a, 0x12, 0x08, 0x0a, 0x02, 0x28, 0x00,
        0x10, 0x00, 0x18, 0x00, 0x50, 0x00, 0x58, 0x00,
    ];

    #[test]
    fn go_heartbeat_frame_decodes() {
        let ms = decode_all(&mut MessageDecoder::default(), &GO_HEARTBEAT_FRAME).unwrap();
        assert_eq!(ms.len(), 1);
        assert!(is_link_heartbeat(&ms[0]));
    }

    #[test]
    fn rust_heartbeat_frame_is_minimal() {
        let f = encode_frame(&crate::rafthttp::util::link_heartbeat()).unwrap();
        assert_eq!(f, [0, 0, 0, 0, 0, 0, 0, 2, 0x08, 0x08]);
    }

    #[test]
    fn every_truncation_asks_for_more_never_panics() {
        for cut in 0..GO_HEARTBEAT_FRAME.len() {
            let mut buf = BytesMut::from(&GO_HEARTBEAT_FRAME[..cut]);
            match MessageDecoder::default().decode(&mut buf).unwrap() {
                Decoded::NeedMore(n) => assert!(n > cut),
                Decoded::Message(m) => panic!("decoded {m:?} from {cut} bytes"),
            }
            assert_eq!(buf.len(), cut, "nothing consumed");
        }
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        let mut huge = BytesMut::from(&u64::MAX.to_be_bytes()[..]);
        assert!(matches!(
            MessageDecoder::default().decode(&mut huge),
            Err(CodecError::TooLarge { .. })
        ));
        let mut garbage = BytesMut::from(&[0, 0, 0, 0, 0, 0, 0, 3, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            MessageDecoder::default().decode(&mut garbage),
            Err(CodecError::Protobuf(_))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn round_trip(ms in proptest::collection::vec(arb_message(), 0..8)) {
            let mut bytes = Vec::new();
            for m in &ms {
                MessageEncoder.encode(m, &mut bytes).unwrap();
            }
            let got = decode_all(&mut MessageDecoder::default(), &bytes).unwrap();
            prop_assert_eq!(got, ms);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_all(&mut MessageDecoder::default(), &bytes);
        }
    }
}
