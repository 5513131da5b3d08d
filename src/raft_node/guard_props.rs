//! Tests of the trust boundary, both ways:
//!
//! - whatever a peer sends, a message the guard lets through does not make raft-rs panic, and
//!   handling the Ready that follows does not fail, on a follower or on a leader (a property
//!   test; raft-rs trusts its peers, so without the guard it fails within a few cases: a gap in
//!   an append, a commit beyond the log, a snapshot of term 0...);
//! - a correct cluster never trips the guard ([`liveness`]).

use proptest::prelude::*;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, Message, MessageType,
};
use raft::storage::MemStorage;
use raft::{RawNode, StateRole};

use super::guard::{self, PayloadChecks};
use super::proposals::HEADER_LEN;

/// Payloads of the store in these tests (and `guard`'s): anything that starts with `ok`.
pub(super) fn checks() -> PayloadChecks {
    fn ok(b: &[u8]) -> Result<(), String> {
        b.starts_with(b"ok").then_some(()).ok_or("not ok".into())
    }
    PayloadChecks {
        proposal: ok,
        snapshot: ok,
    }
}

/// Handles every Ready as the raft loop does (snapshot, entries and hard state to storage,
/// advance, apply conf changes). Returns the messages to send, or the first error the loop
/// would stop on.
fn drive(n: &mut RawNode<MemStorage>) -> Result<Vec<Message>, String> {
    let mut out = Vec::new();
    while n.has_ready() {
        let mut rd = n.ready();
        out.extend(rd.take_messages());
        let store = n.raft.raft_log.store.clone();
        if !rd.snapshot().is_empty() {
            store
                .wl()
                .apply_snapshot(rd.snapshot().clone())
                .map_err(|e| format!("installing a snapshot: {e}"))?;
        }
        store
            .wl()
            .append(rd.entries())
            .map_err(|e| format!("appending: {e}"))?;
        if let Some(hs) = rd.hs() {
            store.wl().set_hardstate(hs.clone());
        }
        out.extend(rd.take_persisted_messages());
        let mut committed = rd.take_committed_entries();
        let mut light = n.advance(rd);
        if let Some(commit) = light.commit_index() {
            store.wl().mut_hard_state().commit = commit;
        }
        out.extend(light.take_messages());
        committed.extend(light.take_committed_entries());
        for e in committed {
            if e.get_entry_type() == EntryType::EntryConfChange {
                let cc = ConfChange::parse_from_bytes(&e.data)
                    .map_err(|err| format!("entry {}: {err}", e.index))?;
                let cs = n
                    .apply_conf_change(&cc)
                    .map_err(|err| format!("conf change {}: {err}", e.index))?;
                store.wl().set_conf_state(cs);
            }
        }
        n.advance_apply();
    }
    Ok(out)
}

/// Node 1 of {1, 2, 3} with entries 1..=8 (terms 1, then 2 from index 5), 6 committed, the
/// first 3 compacted away if asked; made leader at term 3 if asked.
fn node(leader: bool, compacted: bool) -> RawNode<MemStorage> {
    let storage = MemStorage::new_with_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
    let ents: Vec<Entry> = (1..=8)
        .map(|index| Entry {
            index,
            term: if index < 5 { 1 } else { 2 },
            data: proposal(),
            ..Default::default()
        })
        .collect();
    storage.wl().append(&ents).expect("append");
    storage.wl().set_hardstate(HardState {
        term: 2,
        commit: 6,
        ..Default::default()
    });
    if compacted {
        storage.wl().compact(4).expect("compact");
    }
    let cfg = raft::Config {
        id: 1,
        election_tick: 10,
        heartbeat_tick: 1,
        check_quorum: true,
        pre_vote: true,
        applied: 6,
        ..Default::default()
    };
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let mut n = RawNode::new(&cfg, storage, &logger).expect("node");
    if leader {
        n.campaign().expect("campaign");
        drive(&mut n).expect("pre-vote");
        for t in [
            MessageType::MsgRequestPreVoteResponse,
            MessageType::MsgRequestVoteResponse,
        ] {
            let mut m = Message::default();
            m.set_msg_type(t);
            (m.from, m.to, m.term) = (2, 1, 3);
            n.step(m).expect("vote");
            drive(&mut n).expect("election");
        }
        assert_eq!(n.raft.state, StateRole::Leader);
    }
    n
}

fn proposal() -> bytes::Bytes {
    let mut data = vec![0u8; HEADER_LEN];
    data.extend_from_slice(b"ok");
    data.into()
}

fn conf_change(kind: ConfChangeType, node_id: u64) -> bytes::Bytes {
    let mut cc = ConfChange::default();
    cc.set_change_type(kind);
    cc.node_id = node_id;
    cc.write_to_bytes().expect("encode").into()
}

/// An entry's type and payload: mostly valid, sometimes not.
fn payload() -> impl Strategy<Value = (EntryType, bytes::Bytes)> {
    prop_oneof![
        2 => Just((EntryType::EntryNormal, bytes::Bytes::new())),
        4 => Just((EntryType::EntryNormal, proposal())),
        1 => Just((EntryType::EntryNormal, bytes::Bytes::from_static(b"junk"))),
        2 => (prop_oneof![
            Just(ConfChangeType::AddNode),
            Just(ConfChangeType::RemoveNode),
            Just(ConfChangeType::AddLearnerNode)
        ], 0..6u64)
            .prop_map(|(k, id)| (EntryType::EntryConfChange, conf_change(k, id))),
        1 => Just((EntryType::EntryConfChange, bytes::Bytes::from_static(&[0xff; 3]))),
        1 => Just((EntryType::EntryConfChangeV2, bytes::Bytes::new())),
    ]
}

const TYPES: [MessageType; 15] = [
    MessageType::MsgAppend,
    MessageType::MsgAppendResponse,
    MessageType::MsgHeartbeat,
    MessageType::MsgHeartbeatResponse,
    MessageType::MsgSnapshot,
    MessageType::MsgRequestVote,
    MessageType::MsgRequestVoteResponse,
    MessageType::MsgRequestPreVote,
    MessageType::MsgRequestPreVoteResponse,
    MessageType::MsgTimeoutNow,
    MessageType::MsgTransferLeader,
    MessageType::MsgReadIndex,
    MessageType::MsgReadIndexResp,
    MessageType::MsgPropose,
    MessageType::MsgUnreachable,
];

/// A message a peer (or anyone) might send to node 1, near its log's state.
fn message() -> impl Strategy<Value = Message> {
    let term = prop_oneof![8 => 0..6u64, 1 => Just(guard::MAX_TERM), 1 => Just(u64::MAX)];
    let entries = prop::collection::vec((any::<bool>(), 0..20u64, 0..6u64, payload()), 0..4);
    (
        (
            0..TYPES.len(),
            prop_oneof![Just(2u64), Just(3), Just(1), Just(0), Just(9)],
            term,
        ),
        (
            prop_oneof![0..20u64, 5..10u64],
            0..6u64,
            0..25u64,
            any::<bool>(),
            0..20u64,
        ),
        (entries, any::<bool>()),
        (0..20u64, 0..6u64, prop::collection::vec(1..5u64, 0..4)),
    )
        .prop_map(
            |((t, from, term), (index, log_term, commit, reject, hint), (ents, fits), snap)| {
                let mut m = Message::default();
                m.set_msg_type(TYPES[t]);
                (m.from, m.to, m.term) = (from, 1, term);
                // Half the time, an append that fits node 1's initial log (so raft takes it).
                let (index, log_term) = match (fits, index) {
                    (true, 0) => (0, 0),
                    (true, 1..=4) => (index, 1),
                    (true, 5..=8) => (index, 2),
                    _ => (index, log_term),
                };
                let ents: Vec<_> = ents
                    .into_iter()
                    .map(|(contiguous, index, t, p)| {
                        let lo = log_term.max(1);
                        let t = if fits { t.clamp(lo, term.max(lo)) } else { t };
                        (contiguous || fits, index, t, p)
                    })
                    .collect();
                (m.index, m.log_term, m.commit) = (index, log_term, commit);
                (m.reject, m.reject_hint) = (reject, hint);
                let ents: Vec<Entry> = ents
                    .into_iter()
                    .enumerate()
                    .map(|(i, (contiguous, index, term, (kind, data)))| {
                        let mut e = Entry {
                            index: if contiguous {
                                m.index + 1 + i as u64
                            } else {
                                index
                            },
                            term,
                            data,
                            ..Default::default()
                        };
                        e.set_entry_type(kind);
                        e
                    })
                    .collect();
                m.set_entries(ents.into());
                let (snap_index, snap_term, voters) = snap;
                let meta = m.mut_snapshot().mut_metadata();
                (meta.index, meta.term) = (snap_index, snap_term);
                meta.mut_conf_state().voters = voters;
                m
            },
        )
}

/// Steps `msgs` into `n` through the guard; an error is what would stop the node.
fn step_guarded(n: &mut RawNode<MemStorage>, msgs: Vec<Message>) -> Result<(), String> {
    for m in msgs {
        if guard::check_message(&m, 1, &checks()).is_err() {
            continue;
        }
        let view = guard::NodeView::of(&n.raft);
        if guard::check_against_state(&m, &view).is_err() {
            continue;
        }
        // Errors are refusals (a local message type, an unknown peer's response): ignored.
        let _ = n.step(m);
        drive(n)?;
    }
    Ok(())
}

proptest! {
    // 256 cases by default; PROPTEST_CASES=300000 searches harder (about a minute, release).

    #[test]
    fn a_follower_survives_whatever_passes_the_guard(
        compacted in any::<bool>(),
        msgs in prop::collection::vec(message(), 1..12)
    ) {
        let mut n = node(false, compacted);
        prop_assert_eq!(step_guarded(&mut n, msgs), Ok(()));
    }

    #[test]
    fn a_leader_survives_whatever_passes_the_guard(
        compacted in any::<bool>(),
        msgs in prop::collection::vec(message(), 1..12)
    ) {
        let mut n = node(true, compacted);
        prop_assert_eq!(step_guarded(&mut n, msgs), Ok(()));
    }
}

/// The other direction: a correct cluster never trips the guard. Three raft-rs nodes exchange
/// every message through both checks (as the transport and the loop apply them), and each
/// must pass, through an election, proposals on the leader and forwarded by a follower, a
/// forwarded read, a follower cut off and caught up by a snapshot, a forwarded conf change
/// and a leadership transfer. A false refusal would stall a healthy cluster.
mod liveness {
    use std::collections::{BTreeMap, HashSet, VecDeque};

    use raft::eraftpb::{ConfChange, ConfChangeType, ConfState, Message};
    use raft::storage::MemStorage;
    use raft::{RawNode, StateRole};

    use super::{checks, drive, proposal};
    use crate::raft_node::guard;

    struct Sim {
        nodes: BTreeMap<u64, RawNode<MemStorage>>,
        queue: VecDeque<Message>,
        cut: HashSet<u64>,
        delivered: usize,
    }

    impl Sim {
        fn new() -> Sim {
            let logger = slog::Logger::root(slog::Discard, slog::o!());
            let nodes = (1..=3)
                .map(|id| {
                    let cs = ConfState::from((vec![1, 2, 3], vec![]));
                    let cfg = raft::Config {
                        id,
                        election_tick: 10,
                        heartbeat_tick: 1,
                        check_quorum: true,
                        pre_vote: true,
                        ..Default::default()
                    };
                    let storage = MemStorage::new_with_conf_state(cs);
                    (id, RawNode::new(&cfg, storage, &logger).expect("node"))
                })
                .collect();
            Sim {
                nodes,
                queue: VecDeque::new(),
                cut: HashSet::new(),
                delivered: 0,
            }
        }

        fn node(&mut self, id: u64) -> &mut RawNode<MemStorage> {
            self.nodes.get_mut(&id).expect("a node of the sim")
        }

        /// Handles Readys and delivers messages until none are left.
        fn settle(&mut self) {
            for _ in 0..100_000 {
                for n in self.nodes.values_mut() {
                    self.queue.extend(drive(n).expect("the loop goes on"));
                }
                let Some(m) = self.queue.pop_front() else {
                    return;
                };
                if self.cut.contains(&m.to) || self.cut.contains(&m.from) {
                    continue;
                }
                // Node 4 is only ever added to the configuration; nothing runs it.
                let Some(n) = self.nodes.get_mut(&m.to) else {
                    continue;
                };
                assert_eq!(
                    guard::check_message(&m, m.to, &checks()),
                    Ok(()),
                    "refused at the door: {m:?}"
                );
                assert_eq!(
                    guard::check_against_state(&m, &guard::NodeView::of(&n.raft)),
                    Ok(()),
                    "refused by the loop: {m:?}"
                );
                self.delivered += 1;
                let _ = n.step(m);
            }
            panic!("the cluster never went quiet");
        }

        fn tick_all(&mut self, times: usize) {
            for _ in 0..times {
                for n in self.nodes.values_mut() {
                    n.tick();
                }
                self.settle();
            }
        }

        fn leader(&self) -> u64 {
            let leaders: Vec<u64> = self
                .nodes
                .iter()
                .filter(|(_, n)| n.raft.state == StateRole::Leader)
                .map(|(id, _)| *id)
                .collect();
            assert_eq!(leaders.len(), 1, "one leader");
            leaders[0]
        }

        fn propose(&mut self, via: u64, n: usize) {
            for _ in 0..n {
                self.node(via)
                    .propose(vec![], proposal().to_vec())
                    .expect("propose");
            }
            self.settle();
        }
    }

    #[test]
    fn a_correct_cluster_never_trips_the_guard() {
        let mut sim = Sim::new();
        sim.node(1).campaign().expect("campaign");
        sim.settle();
        assert_eq!(sim.leader(), 1);

        sim.propose(1, 10);
        sim.propose(2, 10); // forwarded to the leader
        sim.node(2).read_index(b"r1".to_vec()); // forwarded too
        sim.settle();
        sim.tick_all(3);

        // Node 3 misses entries the leader then compacts: it catches up by snapshot.
        sim.cut.insert(3);
        sim.propose(1, 20);
        sim.tick_all(2);
        let applied = sim.node(1).raft.raft_log.applied;
        let store = sim.node(1).raft.raft_log.store.clone();
        store.wl().compact(applied).expect("compact");
        sim.cut.clear();
        sim.tick_all(5);
        assert!(
            sim.nodes[&3].raft.raft_log.first_index() > applied,
            "node 3 installed a snapshot"
        );

        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::AddLearnerNode);
        cc.node_id = 4;
        sim.node(2)
            .propose_conf_change(vec![], cc)
            .expect("conf change");
        sim.settle();
        sim.tick_all(2);

        sim.node(1).transfer_leader(2);
        sim.settle();
        sim.tick_all(3);
        assert_eq!(sim.leader(), 2, "leadership moved");
        sim.propose(3, 5);
        sim.tick_all(3);

        let commits: Vec<u64> = sim
            .nodes
            .values()
            .map(|n| n.raft.raft_log.committed)
            .collect();
        assert!(commits.iter().all(|c| *c == commits[0]), "{commits:?}");
        assert!(commits[0] >= 47, "every proposal committed: {commits:?}");
        assert!(
            sim.nodes[&1].raft.prs().conf().learners().contains(&4),
            "the conf change applied"
        );
        assert!(sim.delivered > 100, "{} messages", sim.delivered);
    }
}
