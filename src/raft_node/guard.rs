//! The trust boundary: what the raft port lets through to raft-rs.
//!
//! raft-rs trusts its peers. It panics (`fatal!`) on messages a correct peer never sends, and
//! a follower stores whatever entries its leader appends. The raft port, though, answers anyone
//! who sends the right cluster id, and every raftexample cluster started without
//! `--cluster-token` uses the same one (`1000`): a node of another cluster pointed at the wrong
//! port, a buggy peer or a fuzzer can reach it.
//! Without these checks one such message could crash the node, or worse, append an entry this
//! program cannot apply. That entry reaches the WAL, so every restart stops at it again: the
//! node is bricked until someone edits its log by hand.
//!
//! So every message from the network is checked here first, and one that fails is dropped
//! with a warning (a `POST` gets a 400 naming the reason), exactly as if the network had lost
//! it; raft copes with lost messages. The checks are of two kinds:
//!
//! - [`check_message`], on the transport's tasks: the shape of the message alone (who it is
//!   addressed to and from, a sane term, appended entries contiguous with consistent terms,
//!   every payload one this program can apply). A snapshot's payload is checked too, on a
//!   blocking thread since it may be large ([`check_snapshot`]).
//! - [`check_against_state`], on the raft loop: what needs the node's state (a commit or an
//!   acknowledgement is not beyond this node's log).
//!
//! What this cannot catch: a well-formed message that lies, sent by a member (or something
//! that claims a member's id). raftexample has no peer authentication; etcd adds TLS client
//! certificates for that.

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, Entry, EntryType, Message, MessageType};

use super::proposals::HEADER_LEN;

/// No real cluster reaches this term (an election every millisecond for nearly 9,000 years);
/// a message claiming more is forged, and accepting it would leave raft-rs's term counter close
/// enough to `u64::MAX` to overflow on a later election.
pub const MAX_TERM: u64 = 1 << 48;

/// How the application recognises its own data, so that the raft port can refuse entries and
/// snapshots it could never apply. [`PayloadChecks::default`] accepts anything (tests that
/// replicate arbitrary bytes); `main` passes the key-value store's checks.
#[derive(Clone, Copy, Debug)]
pub struct PayloadChecks {
    /// A proposal, as the store handed it to *proposeC*.
    pub proposal: fn(&[u8]) -> Result<(), String>,
    /// The store's part of a snapshot, as its `GetSnapshot` wrote it.
    pub snapshot: fn(&[u8]) -> Result<(), String>,
}

fn accept_anything(_: &[u8]) -> Result<(), String> {
    Ok(())
}

impl Default for PayloadChecks {
    fn default() -> PayloadChecks {
        PayloadChecks {
            proposal: accept_anything,
            snapshot: accept_anything,
        }
    }
}

/// Checks what can be checked without the node's state. `me` is this node's id.
///
/// # Errors
///
/// Why the message must be dropped.
pub fn check_message(m: &Message, me: u64, checks: &PayloadChecks) -> Result<(), String> {
    use MessageType::*;
    if m.to != me {
        return Err(format!("addressed to node {:x}, this is {me:x}", m.to));
    }
    if m.from == me || m.from == raft::INVALID_ID {
        return Err(format!("claims to come from node {:x}", m.from));
    }
    if m.term > MAX_TERM {
        return Err(format!("term {} is beyond any real cluster's", m.term));
    }
    // raft-rs takes a message without a term for a local one, and panics answering it.
    if m.term == 0 && !matches!(m.get_msg_type(), MsgPropose | MsgReadIndex) {
        return Err(format!("a {:?} without a term", m.get_msg_type()));
    }
    match m.get_msg_type() {
        // A follower forwards these to its leader as they came, and raft-rs panics when one it
        // forwards carries a term (correct peers send them with term 0). This program never
        // sends a leadership transfer request to a peer: a leader transfers on its own.
        MsgPropose | MsgReadIndex if m.term != 0 => Err(format!(
            "a forwarded {:?} carrying term {} (peers send it without one)",
            m.get_msg_type(),
            m.term
        )),
        MsgTransferLeader => Err("a leadership transfer request from a peer".into()),
        // raft-rs asserts that a proposal has entries and that read requests carry exactly one
        // context; a leader appends proposed entries to its log, so their payloads must be ours.
        MsgPropose if m.entries.is_empty() => Err("a proposal without entries".into()),
        MsgPropose => m.entries.iter().try_for_each(|e| check_entry(e, checks)),
        MsgReadIndex | MsgReadIndexResp if m.entries.len() != 1 => Err(format!(
            "a read request or answer with {} contexts instead of one",
            m.entries.len()
        )),
        MsgAppend => check_append(m, checks),
        MsgSnapshot => {
            let meta = m.get_snapshot().get_metadata();
            if meta.index == 0 || meta.term == 0 {
                return Err(format!(
                    "a snapshot at index {} term {}: neither can be 0",
                    meta.index, meta.term
                ));
            }
            if meta.term > m.term {
                return Err(format!(
                    "a snapshot of term {} sent at term {}",
                    meta.term, m.term
                ));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// An append must continue the log at `m.index` with consecutive indexes, and terms that never
/// decrease and never exceed the sender's term (the log's invariants: raft-rs panics on a gap or
/// on a conflict with a committed entry, and would store anything else as it came).
fn check_append(m: &Message, checks: &PayloadChecks) -> Result<(), String> {
    // Every entry has a term of at least 1. raft-rs reads the term of an index beyond its log
    // as 0, so an append "after" such an index with term 0 would leave a gap in the log.
    if m.index > 0 && m.log_term == 0 {
        return Err(format!("an append after index {} of term 0", m.index));
    }
    if m.log_term > m.term {
        return Err(format!(
            "an append after an entry of term {} sent at term {}",
            m.log_term, m.term
        ));
    }
    let mut prev_term = m.log_term;
    for (i, e) in m.entries.iter().enumerate() {
        let want = m
            .index
            .checked_add(i as u64 + 1)
            .ok_or("an append beyond the largest index")?;
        if e.index != want {
            return Err(format!(
                "an append of non-consecutive entries: index {} where {want} belongs",
                e.index
            ));
        }
        if e.term == 0 || e.term < prev_term || e.term > m.term {
            return Err(format!(
                "entry {} has term {}, outside {prev_term}..={}",
                e.index, e.term, m.term
            ));
        }
        prev_term = e.term;
        check_entry(e, checks).map_err(|reason| format!("entry {}: {reason}", e.index))?;
    }
    Ok(())
}

/// An entry's payload must be one [`super::apply`] can apply: an empty entry (a new leader's
/// no-op), a proposal with its session header and a payload the store accepts, or a conf
/// change. This program never writes `ConfChangeV2` entries.
fn check_entry(e: &Entry, checks: &PayloadChecks) -> Result<(), String> {
    match e.get_entry_type() {
        EntryType::EntryNormal if e.data.is_empty() => Ok(()),
        EntryType::EntryNormal if e.data.len() < HEADER_LEN => Err(format!(
            "a proposal of {} bytes has no session header",
            e.data.len()
        )),
        EntryType::EntryNormal => (checks.proposal)(&e.data[HEADER_LEN..]),
        EntryType::EntryConfChange => ConfChange::parse_from_bytes(&e.data)
            .map(|_| ())
            .map_err(|err| format!("not a valid conf change: {err}")),
        EntryType::EntryConfChangeV2 => Err("a ConfChangeV2 entry (never written here)".into()),
    }
}

/// Checks a snapshot's payload: the raft node's part (`SnapshotData` in `apply.rs`) and
/// the store's. Run off the raft loop: it reads the whole payload.
///
/// # Errors
///
/// Why the snapshot cannot be installed.
pub fn check_snapshot(data: &[u8], checks: &PayloadChecks) -> Result<(), String> {
    let kv = super::apply::snapshot_store_part(data)?;
    (checks.snapshot)(kv).map_err(|reason| format!("the store's part of the snapshot: {reason}"))
}

/// Records a refused message: counted in `raftexample_peer_messages_refused_total`, and logged
/// at most once a second (a misdirected peer may send hundreds a second; the next warning
/// says how many were not logged).
pub fn refused(m: &Message, reason: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_WARNED_SEC: AtomicU64 = AtomicU64::new(0);
    static NOT_LOGGED: AtomicU64 = AtomicU64::new(0);
    crate::metrics::MESSAGES_REFUSED.inc();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if LAST_WARNED_SEC.swap(now, Ordering::Relaxed) == now {
        NOT_LOGGED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let not_logged = NOT_LOGGED.swap(0, Ordering::Relaxed);
    tracing::warn!(
        from = %format_args!("{:x}", m.from),
        kind = ?m.get_msg_type(),
        not_logged,
        "dropped a raft message: {reason}"
    );
}

/// What the raft loop knows that the checks need.
pub struct NodeView {
    /// This node's current term.
    pub term: u64,
    /// The commit index, and the term of the entry there (0 if unknown).
    pub committed: (u64, u64),
    /// The index of the last entry in this node's log.
    pub last_index: u64,
}

impl NodeView {
    /// What `raft` knows now.
    pub fn of<T: raft::Storage>(raft: &raft::Raft<T>) -> NodeView {
        let log = &raft.raft_log;
        NodeView {
            term: raft.term,
            committed: (log.committed, log.term(log.committed).unwrap_or(0)),
            last_index: log.last_index(),
        }
    }
}

/// Checks what needs the node's state; run on the raft loop just before raft-rs steps `m`.
///
/// The sender is not required to be a member (etcd does not either): a node that installed an
/// older snapshot, or has not yet applied the `AddNode` of its new leader, must still accept
/// that leader's appends to learn of it. Removed members are refused by the transport.
///
/// # Errors
///
/// Why the message must be dropped.
pub fn check_against_state(m: &Message, node: &NodeView) -> Result<(), String> {
    match m.get_msg_type() {
        // A leader only sends a commit its follower has; raft-rs panics on one beyond its log.
        MessageType::MsgHeartbeat if m.term >= node.term && m.commit > node.last_index => {
            Err(format!(
                "a heartbeat committing {} beyond this log's end {}",
                m.commit, node.last_index
            ))
        }
        // A leader's log never shrinks within its term, so no follower acknowledges beyond
        // it; raft-rs would commit the acknowledged index and panic.
        MessageType::MsgAppendResponse
            if !m.reject && m.term == node.term && m.index > node.last_index =>
        {
            Err(format!(
                "an acknowledgement of index {} beyond this log's end {}",
                m.index, node.last_index
            ))
        }
        // raft-rs installs a snapshot at exactly the commit index even when its term differs
        // from the committed entry's (etcd refuses any snapshot at or below the commit): that
        // rewrites a committed entry, or fails against the snapshot already installed there.
        MessageType::MsgSnapshot => {
            let meta = m.get_snapshot().get_metadata();
            let (index, term) = node.committed;
            if meta.index == index && meta.term != term {
                return Err(format!(
                    "a snapshot at the commit index {index} with term {} instead of {term}",
                    meta.term
                ));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::ConfChangeType;

    const ME: u64 = 1;

    fn msg(t: MessageType) -> Message {
        let mut m = Message::default();
        m.set_msg_type(t);
        m.to = ME;
        m.from = 2;
        m.term = 5;
        m
    }

    fn proposal(payload: &[u8]) -> Vec<u8> {
        let mut data = vec![0u8; HEADER_LEN];
        data.extend_from_slice(payload);
        data
    }

    fn entry(index: u64, term: u64, data: Vec<u8>) -> Entry {
        Entry {
            index,
            term,
            data: data.into(),
            ..Default::default()
        }
    }

    fn append(index: u64, log_term: u64, entries: Vec<Entry>) -> Message {
        let mut m = msg(MessageType::MsgAppend);
        m.index = index;
        m.log_term = log_term;
        m.set_entries(entries.into());
        m
    }

    fn check(m: &Message) -> Result<(), String> {
        // Payloads must start with `ok`.
        check_message(m, ME, &crate::raft_node::guard_props::checks())
    }

    #[test]
    fn a_well_formed_append_passes() {
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::AddNode);
        cc.node_id = 4;
        let mut conf = entry(13, 5, cc.write_to_bytes().expect("encode"));
        conf.set_entry_type(EntryType::EntryConfChange);
        let m = append(
            10,
            3,
            vec![entry(11, 3, proposal(b"ok 1")), entry(12, 5, vec![]), conf],
        );
        assert_eq!(check(&m), Ok(()));
        // A heartbeat-like append without entries too.
        assert_eq!(check(&append(10, 3, vec![])), Ok(()));
    }

    #[test]
    fn appends_that_break_the_log_or_carry_foreign_data_are_refused() {
        let refused = |m: Message, why: &str| {
            let e = check(&m).expect_err(why);
            assert!(!e.is_empty(), "{why}");
        };
        refused(
            append(10, 3, vec![entry(12, 3, proposal(b"ok"))]),
            "a gap after index 10",
        );
        refused(
            append(
                10,
                3,
                vec![entry(11, 3, proposal(b"ok")), entry(11, 3, proposal(b"ok"))],
            ),
            "a repeated index",
        );
        refused(
            append(u64::MAX, 3, vec![entry(0, 3, proposal(b"ok"))]),
            "an index that wraps",
        );
        refused(
            append(10, 4, vec![entry(11, 3, proposal(b"ok"))]),
            "a term lower than the entry before",
        );
        refused(
            append(10, 3, vec![entry(11, 6, proposal(b"ok"))]),
            "a term above the sender's",
        );
        refused(append(10, 6, vec![]), "a previous term above the sender's");
        refused(append(10, 0, vec![]), "a previous entry of term 0");
        refused(
            append(0, 0, vec![entry(1, 0, proposal(b"ok"))]),
            "an entry of term 0",
        );
        refused(
            append(10, 3, vec![entry(11, 3, b"short".to_vec())]),
            "no session header",
        );
        refused(
            append(10, 3, vec![entry(11, 3, proposal(b"garbage"))]),
            "a payload the store refuses",
        );
        let mut conf = entry(11, 3, vec![0xff, 0xff]);
        conf.set_entry_type(EntryType::EntryConfChange);
        refused(
            append(10, 3, vec![conf]),
            "a conf change that does not decode",
        );
        let mut v2 = entry(11, 3, vec![]);
        v2.set_entry_type(EntryType::EntryConfChangeV2);
        refused(append(10, 3, vec![v2]), "a ConfChangeV2");
    }

    #[test]
    fn misaddressed_self_sent_and_far_future_messages_are_refused() {
        let mut m = msg(MessageType::MsgHeartbeat);
        assert_eq!(check(&m), Ok(()));
        m.to = 3;
        assert!(check(&m).is_err(), "addressed to another node");
        m.to = ME;
        m.from = ME;
        assert!(check(&m).is_err(), "from this node itself");
        m.from = 0;
        assert!(check(&m).is_err(), "from no node");
        m.from = 2;
        m.term = MAX_TERM + 1;
        assert!(check(&m).is_err(), "a term no cluster reaches");
        m.term = MAX_TERM;
        assert_eq!(check(&m), Ok(()));
    }

    #[test]
    fn proposals_reads_and_snapshots_raft_would_assert_on_are_refused() {
        let mut p = msg(MessageType::MsgPropose);
        p.set_entries(vec![entry(0, 0, proposal(b"ok"))].into());
        assert!(
            check(&p).is_err(),
            "a proposal with a term would be forwarded with it"
        );
        p.term = 0;
        p.set_entries(Vec::new().into());
        assert!(check(&p).is_err(), "a proposal without entries");
        p.set_entries(vec![entry(0, 0, proposal(b"ok"))].into());
        assert_eq!(check(&p), Ok(()));
        p.set_entries(vec![entry(0, 0, proposal(b"no"))].into());
        assert!(check(&p).is_err(), "a proposal the store could not apply");

        assert!(check(&msg(MessageType::MsgTransferLeader)).is_err());
        for t in [MessageType::MsgReadIndex, MessageType::MsgReadIndexResp] {
            let mut r = msg(t);
            if t == MessageType::MsgReadIndex {
                r.set_entries(vec![Entry::default()].into());
                assert!(check(&r).is_err(), "a read request with a term");
                r.term = 0;
                r.set_entries(Vec::new().into());
            }
            assert!(check(&r).is_err(), "{t:?} without a context");
            r.set_entries(vec![Entry::default()].into());
            assert_eq!(check(&r), Ok(()));
            r.set_entries(vec![Entry::default(), Entry::default()].into());
            assert!(check(&r).is_err(), "{t:?} with two contexts");
        }

        let mut s = msg(MessageType::MsgSnapshot);
        assert!(check(&s).is_err(), "an empty snapshot");
        s.mut_snapshot().mut_metadata().index = 100;
        assert!(check(&s).is_err(), "a snapshot of term 0");
        s.mut_snapshot().mut_metadata().term = 6;
        assert!(check(&s).is_err(), "a snapshot from a later term");
        s.mut_snapshot().mut_metadata().term = 5;
        assert_eq!(check(&s), Ok(()));
    }

    #[test]
    fn the_node_state_refuses_claims_beyond_the_log() {
        let view = NodeView {
            term: 5,
            committed: (18, 4),
            last_index: 20,
        };
        let mut hb = msg(MessageType::MsgHeartbeat);
        hb.commit = 20;
        assert_eq!(check_against_state(&hb, &view), Ok(()));
        // A leader this node has not heard of yet (its AddNode not applied here) gets through.
        hb.from = 99;
        assert_eq!(check_against_state(&hb, &view), Ok(()));
        hb.commit = 21;
        assert!(check_against_state(&hb, &view).is_err(), "commit beyond");
        // From an old term raft ignores it anyway (and must answer it).
        hb.term = 4;
        assert_eq!(check_against_state(&hb, &view), Ok(()));

        let mut ack = msg(MessageType::MsgAppendResponse);
        ack.index = 20;
        assert_eq!(check_against_state(&ack, &view), Ok(()));
        ack.index = 21;
        assert!(check_against_state(&ack, &view).is_err(), "ack beyond");
        ack.reject = true;
        assert_eq!(check_against_state(&ack, &view), Ok(()));

        let mut snap = msg(MessageType::MsgSnapshot);
        snap.mut_snapshot().mut_metadata().index = 18;
        snap.mut_snapshot().mut_metadata().term = 3;
        assert!(
            check_against_state(&snap, &view).is_err(),
            "rewrites entry 18"
        );
        snap.mut_snapshot().mut_metadata().term = 4;
        assert_eq!(check_against_state(&snap, &view), Ok(()));
        snap.mut_snapshot().mut_metadata().index = 19;
        snap.mut_snapshot().mut_metadata().term = 5;
        assert_eq!(check_against_state(&snap, &view), Ok(()));
    }
}
