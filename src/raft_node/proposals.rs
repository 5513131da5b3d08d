//! Proposals that are never silently lost: client sessions (raft dissertation, section 6.3).
//!
//! The Go original answers a PUT once it is handed to raft. On a follower raft forwards it to
//! the leader; if that message is dropped (the leader just died, a queue was full), the write
//! vanishes although the client got a 204. Here every node numbers its proposals: each entry
//! starts with this node's *origin* (random per process) and a sequence number. The proposer
//! keeps what it proposed until it sees it applied, and proposes it again, in order, after a
//! leader change or when nothing was applied for a while. Every node applies an entry only if
//! its sequence number is exactly one past the last applied from that origin, so a proposal
//! that arrives twice is applied once and a retry never reorders two writes.
//!
//! # Entry format
//!
//! ```text
//! 0        8        16
//! | origin | seq    | payload (what the key-value store proposed) ...
//!   u64 BE   u64 BE
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes before the payload.
pub const HEADER_LEN: usize = 16;

/// Re-propose if nothing of ours was applied for this long while proposals are outstanding.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long a node holds new proposals while its last batch is on its way (see
/// [`Proposer::hold`]).
pub const PROPOSAL_HOLD: Duration = Duration::from_millis(2);

/// The last batch of proposals this node handed to raft.
#[derive(Debug, Clone, Copy)]
enum InFlight {
    /// Forwarded to the leader; the highest sequence number in it.
    Forwarded(u64),
    /// Appended to this leader's log; the log index of its last entry.
    Appended(u64),
}

/// This node's outstanding proposals.
pub struct Proposer {
    origin: u64,
    next_seq: u64,
    /// (seq, whole entry data), oldest first: proposed or waiting to be, not yet applied.
    unconfirmed: VecDeque<(u64, Bytes)>,
    /// How many of `unconfirmed` were handed to raft since the last (re)start.
    proposed: usize,
    /// When our applied sequence last moved (or the queue went from empty to busy).
    last_progress: Instant,
    /// The batch in flight, and when it was handed to raft (see [`Proposer::hold`]).
    in_flight: Option<(InFlight, Instant)>,
    /// The highest sequence number of ours seen in the local log.
    seen_in_log: u64,
}

impl Proposer {
    /// A proposer with a fresh origin.
    pub fn new() -> Proposer {
        Proposer {
            origin: fresh_origin(),
            next_seq: 1,
            unconfirmed: VecDeque::new(),
            proposed: 0,
            last_progress: Instant::now(),
            in_flight: None,
            seen_in_log: 0,
        }
    }

    /// Number of proposals not yet applied.
    pub fn len(&self) -> usize {
        self.unconfirmed.len()
    }

    /// Takes a new proposal from the key-value store.
    pub fn push(&mut self, payload: &[u8]) {
        if self.unconfirmed.is_empty() {
            self.last_progress = Instant::now();
        }
        let mut buf = BytesMut::with_capacity(HEADER_LEN + payload.len());
        buf.put_u64(self.origin);
        buf.put_u64(self.next_seq);
        buf.put_slice(payload);
        self.unconfirmed.push_back((self.next_seq, buf.freeze()));
        self.next_seq += 1;
    }

    /// Entry data not yet handed to raft (cheap clones of shared buffers), marking them handed.
    pub fn take_unproposed(&mut self) -> Vec<Bytes> {
        let out = self
            .unconfirmed
            .iter()
            .skip(self.proposed)
            .map(|(_, data)| data.clone())
            .collect();
        self.proposed = self.unconfirmed.len();
        out
    }

    /// Our proposals up to `seq` were applied: forget them.
    pub fn confirm(&mut self, seq: u64) {
        let before = self.unconfirmed.len();
        while self.unconfirmed.front().is_some_and(|(s, _)| *s <= seq) {
            self.unconfirmed.pop_front();
        }
        let done = before - self.unconfirmed.len();
        if done > 0 {
            self.proposed = self.proposed.saturating_sub(done);
            self.last_progress = Instant::now();
        }
    }

    /// Propose everything outstanding again, from the oldest (after a leader change, or when
    /// stalled; see [`Proposer::stalled`]).
    pub fn restart(&mut self) {
        self.proposed = 0;
        self.last_progress = Instant::now();
        self.in_flight = None;
    }

    /// Whether some proposals were not handed to raft yet.
    pub fn has_unproposed(&self) -> bool {
        self.proposed < self.unconfirmed.len()
    }

    /// Records that everything handed to raft so far went to a leader elsewhere.
    pub fn mark_forwarded(&mut self) {
        let last = self.proposed.checked_sub(1).map(|i| self.unconfirmed[i].0);
        self.in_flight = last.map(|seq| (InFlight::Forwarded(seq), Instant::now()));
    }

    /// Records that this node, leading, appended everything handed to raft so far to its log,
    /// up to `last_index`.
    pub fn mark_appended(&mut self, last_index: u64) {
        self.in_flight = Some((InFlight::Appended(last_index), Instant::now()));
    }

    /// Notes an entry appended to the local log: one of ours means the leader has it.
    pub fn note_in_log(&mut self, data: &[u8]) {
        if data.len() >= HEADER_LEN && data[0..8] == self.origin.to_be_bytes() {
            let seq = u64::from_be_bytes(data[8..16].try_into().expect("invariant: 8 bytes"));
            self.seen_in_log = self.seen_in_log.max(seq);
        }
    }

    /// Whether to wait before handing raft more proposals: the last batch is still on its
    /// way, and was handed over less than [`PROPOSAL_HOLD`] ago. On a follower the batch is
    /// on its way until it comes back in the leader's appends; on the leader, until it is
    /// committed (`committed` is the leader's commit index).
    ///
    /// Nagle's algorithm for proposals: with one batch in flight at a time, the proposals that
    /// arrive meanwhile go together in the next one, so every node writes and fsyncs fewer,
    /// larger Readies and sends fewer, larger messages. An idle node proposes at once, and a
    /// plain PUT is answered before it is proposed, so holding costs it nothing.
    pub fn hold(&self, committed: u64) -> bool {
        self.hold_until(committed, Instant::now()).is_some()
    }

    /// If a hold (see [`Proposer::hold`]) is in force at `now`, when it ends at the latest.
    pub fn hold_until(&self, committed: u64, now: Instant) -> Option<Instant> {
        let (batch, at) = self.in_flight?;
        let on_its_way = match batch {
            InFlight::Forwarded(seq) => seq > self.seen_in_log,
            InFlight::Appended(index) => index > committed,
        };
        let until = at + PROPOSAL_HOLD;
        (on_its_way && now < until).then_some(until)
    }

    /// Whether proposals are outstanding and nothing was applied for [`RETRY_AFTER`].
    pub fn stalled(&self) -> bool {
        self.proposed > 0 && self.last_progress.elapsed() >= RETRY_AFTER
    }

    /// This node's origin.
    pub fn origin(&self) -> u64 {
        self.origin
    }
}

/// The last sequence number applied per origin: part of the replicated state (it goes into
/// snapshots), so that every node filters the same entries.
pub type Sessions = BTreeMap<u64, u64>;

/// What to do with a committed entry.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Apply the payload.
    Apply(Bytes),
    /// Already applied (a retry), or after a gap (its origin will propose the gap again).
    Skip,
}

/// Decides whether a committed entry is applied, updating `sessions`.
///
/// # Errors
///
/// An entry too short to carry the header was not written by this program.
pub fn admit(sessions: &mut Sessions, data: &Bytes) -> Result<Verdict, String> {
    if data.len() < HEADER_LEN {
        return Err(format!(
            "entry of {} bytes has no proposal header",
            data.len()
        ));
    }
    let origin = u64::from_be_bytes(data[0..8].try_into().expect("invariant: 8 bytes"));
    let seq = u64::from_be_bytes(data[8..16].try_into().expect("invariant: 8 bytes"));
    let last = sessions.entry(origin).or_insert(0);
    if seq == *last + 1 {
        *last = seq;
        Ok(Verdict::Apply(data.slice(HEADER_LEN..)))
    } else {
        Ok(Verdict::Skip)
    }
}

/// A random 64-bit value, from the OS-seeded hasher mixed with time and pid (no extra crate
/// needed; it only has to differ between processes).
pub fn fresh_origin() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish() | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_holds_new_proposals_until_its_last_batch_is_in_the_log() {
        // Followers ignore the commit index: their batch is back once it is in their log.
        let hold = |p: &Proposer| p.hold(u64::MAX);
        let mut p = Proposer::new();
        assert!(!hold(&p), "an idle follower forwards at once");
        p.push(b"a");
        p.push(b"b");
        let batch = p.take_unproposed();
        p.mark_forwarded();
        p.push(b"c");
        assert!(hold(&p) && p.has_unproposed());
        // Another node's entry, and the first of ours, do not release the hold.
        let mut other = batch[1].to_vec();
        other[0] ^= 1;
        p.note_in_log(&other);
        p.note_in_log(&batch[0]);
        assert!(hold(&p));
        // The whole batch is in the log: the next one may go.
        p.note_in_log(&batch[1]);
        assert!(!hold(&p));
        assert_eq!(p.take_unproposed().len(), 1);
        // A batch that never comes back is held at most PROPOSAL_HOLD, and a restart (a new
        // leader) forgets it.
        p.mark_forwarded();
        assert!(hold(&p));
        p.restart();
        assert!(!hold(&p));
        p.take_unproposed();
        p.mark_forwarded();
        let until = p.hold_until(0, Instant::now()).expect("held");
        assert!(until <= Instant::now() + PROPOSAL_HOLD);
        assert_eq!(p.hold_until(0, until), None, "held at most PROPOSAL_HOLD");
    }

    #[test]
    fn a_leader_holds_new_proposals_until_its_last_batch_is_committed() {
        let mut p = Proposer::new();
        assert!(!p.hold(0), "an idle leader proposes at once");
        p.push(b"a");
        p.take_unproposed();
        p.mark_appended(7);
        p.push(b"b");
        assert!(p.hold(6), "index 7 is not committed yet");
        // Our own entries showing up in the log do not matter to a leader.
        p.note_in_log(&p.unconfirmed[0].1.clone());
        assert!(p.hold(6));
        assert!(!p.hold(7), "committed: the next batch may go");
        let later = Instant::now() + PROPOSAL_HOLD;
        assert_eq!(p.hold_until(6, later), None, "held at most PROPOSAL_HOLD");
    }

    #[test]
    fn retries_are_applied_once_and_in_order() {
        let mut p = Proposer::new();
        p.push(b"a");
        p.push(b"b");
        p.push(b"c");
        let first = p.take_unproposed();
        assert_eq!(first.len(), 3);
        assert!(p.take_unproposed().is_empty(), "nothing new");

        let mut sessions = Sessions::new();
        // "a" is lost on the way; "b" and "c" commit: both skipped (gap).
        assert_eq!(admit(&mut sessions, &first[1]), Ok(Verdict::Skip));
        assert_eq!(admit(&mut sessions, &first[2]), Ok(Verdict::Skip));
        // The proposer retries everything, in order: applied once each.
        p.restart();
        let again = p.take_unproposed();
        let applied: Vec<Verdict> = again
            .iter()
            .map(|d| admit(&mut sessions, d).expect("header"))
            .collect();
        assert_eq!(
            applied,
            vec![
                Verdict::Apply(Bytes::from_static(b"a")),
                Verdict::Apply(Bytes::from_static(b"b")),
                Verdict::Apply(Bytes::from_static(b"c")),
            ]
        );
        // A duplicate of "b" arriving late is skipped.
        assert_eq!(admit(&mut sessions, &first[1]), Ok(Verdict::Skip));
        p.confirm(sessions[&p.origin()]);
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn confirm_forgets_and_keeps_the_rest() {
        let mut p = Proposer::new();
        for v in [b"1", b"2", b"3"] {
            p.push(v);
        }
        let _ = p.take_unproposed();
        p.confirm(2);
        assert_eq!(p.len(), 1);
        p.push(b"4");
        assert_eq!(p.take_unproposed().len(), 1, "only the new one");
        assert!(!p.stalled());
    }

    #[test]
    fn a_short_entry_is_an_error() {
        assert!(admit(&mut Sessions::new(), &Bytes::from_static(b"short")).is_err());
    }

    #[test]
    fn origins_differ() {
        assert_ne!(Proposer::new().origin(), Proposer::new().origin());
    }
}
