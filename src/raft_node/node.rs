//! The Ready loop (Go: `serveChannels`). Read [`RaftNode::on_ready`] to see one batch of raft
//! work go to disk, to the peers and to the key-value store.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, RwLock};

use raft::eraftpb::{ConfChange, ConfState, Entry, Message, MessageType};
use raft::{RawNode, StateRole, Storage};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::proposals::{Proposer, Sessions};
use super::read_index::Reads;
use super::storage::RaftStorage;
use super::{Commit, Config, GetSnapshot, NodeError, Report, guard, logger, replay};
use crate::kvstore::ReadIndexRequest;
use crate::metrics;
use crate::ops::NodeStatus;
use crate::rafthttp::Transport;
use crate::snap::Snapshotter;
use crate::wal::Wal;

/// How many of this node's proposals may be outstanding (waiting for a leader, or proposed
/// but not yet applied) before *proposeC* pushes back on the HTTP handlers (etcd's
/// `node.Propose` blocks instead; this is the same back-pressure).
const MAX_PENDING_PROPOSALS: usize = 4096;

/// The most bytes of proposals stepped into raft as one `MsgPropose`. A follower forwards the
/// message whole to the leader, and peers refuse huge frames, so a burst of large values is
/// split (a single larger entry still goes, alone).
const MAX_PROPOSAL_BATCH_BYTES: usize = 1024 * 1024;

/// Splits `items` into runs of at most `max` bytes (at least one item each), keeping order.
fn chunk_by_size(items: Vec<bytes::Bytes>, max: usize) -> Vec<Vec<bytes::Bytes>> {
    let mut chunks: Vec<Vec<bytes::Bytes>> = Vec::new();
    let mut size = 0;
    for item in items {
        match chunks.last_mut() {
            Some(last) if size + item.len() <= max => {
                size += item.len();
                last.push(item);
            }
            _ => {
                size = item.len();
                chunks.push(vec![item]);
            }
        }
    }
    chunks
}

/// The channels the loop selects over; kept apart from [`RaftNode`] so the `select!` can borrow
/// them while the handlers borrow the node.
pub(super) struct Inputs {
    pub propose_rx: mpsc::Receiver<Vec<u8>>,
    pub conf_change_rx: mpsc::Receiver<ConfChange>,
    pub read_index_rx: mpsc::Receiver<ReadIndexRequest>,
    pub mailbox_rx: mpsc::Receiver<Message>,
    pub report_rx: mpsc::UnboundedReceiver<Report>,
    pub stop: CancellationToken,
}

/// Whether the loop goes on after handling a batch of committed entries.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Flow {
    Continue,
    /// This node applied its own removal from the cluster.
    Removed,
}

pub(super) struct RaftNode {
    // --- configuration and identity
    pub(super) cfg: Config,
    // --- raft and what backs it
    pub(super) node: RawNode<RaftStorage>,
    pub(super) storage: RaftStorage,
    pub(super) wal: Wal,
    pub(super) snapshotter: Snapshotter,
    // --- the other components
    pub(super) transport: Transport,
    /// *commitC*: committed entries and snapshots, in log order.
    pub(super) commit_tx: mpsc::Sender<Commit>,
    pub(super) get_snapshot: GetSnapshot,
    // --- progress (Go: confState, snapshotIndex, appliedIndex)
    pub(super) conf_state: ConfState,
    pub(super) snapshot_index: u64,
    pub(super) applied_index: u64,
    /// Raft URL of every member this node knows, so snapshots can carry them to new nodes.
    pub(super) members: BTreeMap<u64, String>,
    /// Removed ids, shared with the transport's `is_id_removed`.
    pub(super) removed: Arc<RwLock<HashSet<u64>>>,
    // --- this node's proposals until applied, linearizable reads in progress
    pub(super) proposer: Proposer,
    /// Last sequence number applied per proposing node (replicated state, see `proposals`).
    pub(super) sessions: Sessions,
    /// The leader the outstanding proposals were sent to.
    proposed_to: u64,
    pending_conf_changes: VecDeque<ConfChange>,
    /// The conf change proposed and not yet seen applied, and when it was proposed. raft
    /// turns a conf change into an empty entry while another is pending, so they go one at a
    /// time and are proposed again until applied.
    pub(super) conf_change_in_flight: Option<(ConfChange, std::time::Instant)>,
    conf_change_count: u64,
    pub(super) reads: Reads,
    // --- what the outside sees of the node
    status_tx: watch::Sender<NodeStatus>,
    last_leader: u64,
    /// The WAL's size for `/status`, refreshed once per tick: measuring it lists the WAL
    /// directory and stats every segment, too much to do on every turn of the loop.
    wal_bytes: u64,
    /// A peer told the transport this node was removed.
    removed_by_peer: bool,
    /// Ticks a joining node has waited without ever hearing from a leader (see
    /// `warn_if_never_added`).
    lonely_ticks: u32,
    /// The highest commit index sent to each peer in an append (see `send_pending_commits`).
    commit_sent: HashMap<u64, u64>,
    /// Indexes of the snapshots saved since start, newest last (see `release_wal`).
    pub(super) snapshots_saved: Vec<u64>,
    /// Size of the last snapshot payload taken, to size the next one's buffer.
    pub(super) last_snapshot_bytes: usize,
    /// A snapshot being taken by a background thread (see `finish_snapshot`).
    pub(super) snapshot_in_flight: Option<super::apply::SnapshotInFlight>,
    /// Commits held back while that thread serializes the store (see `publish`).
    pub(super) held_commits: Vec<Commit>,
    /// Woken by that thread once the store is serialized, so held commits go at once.
    pub(super) serialized_wake: std::sync::Arc<tokio::sync::Notify>,
    /// Fires once the store has applied the newest batch published (the store applies in
    /// order, so everything before it too). Kept across Readys: the batches a snapshot covers
    /// may have been published in an earlier Ready, or held back and released since, and still
    /// sit in *commitC* (etcd#12714).
    pub(super) last_apply_done: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl RaftNode {
    /// Replays the stored state (or bootstraps) and builds the `RawNode` (Go: `startRaft`'s
    /// first half).
    pub(super) async fn new(
        cfg: Config,
        transport: Transport,
        commit_tx: mpsc::Sender<Commit>,
        get_snapshot: GetSnapshot,
        removed: Arc<RwLock<HashSet<u64>>>,
        status_tx: watch::Sender<NodeStatus>,
    ) -> Result<RaftNode, NodeError> {
        let snapshotter = Snapshotter::new(cfg.snap_dir());
        let replayed = replay::open_or_bootstrap(&cfg, &snapshotter)?;
        let raft_cfg = raft::Config {
            id: cfg.id,
            election_tick: 10,
            heartbeat_tick: 1,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            max_uncommitted_size: 1 << 30,
            max_committed_size_per_ready: 1024 * 1024,
            applied: 0,
            // Not in raftexample, but what etcd's server does: a leader that cannot reach a
            // quorum steps down within an election timeout (so `/health` stops reporting it
            // healthy), and a node that was partitioned away does not disrupt the cluster
            // with higher-term elections when it comes back.
            check_quorum: true,
            pre_vote: true,
            // raft-rs would send every follower an extra, empty append each time the commit
            // index moves. The commit rides on the next append instead, and
            // `send_pending_commits` tells only the followers that did not get one this turn.
            skip_bcast_commit: true,
            ..Default::default()
        };
        let storage = replayed.storage;
        let node = RawNode::new(&raft_cfg, storage.clone(), &logger::raft_logger(cfg.id))?;
        let mut members: BTreeMap<u64, String> = cfg
            .peers
            .iter()
            .enumerate()
            .map(|(i, url)| (i as u64 + 1, url.clone()))
            .collect();
        let mut rn = RaftNode {
            conf_state: storage.initial_state()?.conf_state,
            snapshot_index: 0,
            applied_index: 0,
            members: BTreeMap::new(),
            cfg,
            node,
            storage,
            wal: replayed.wal,
            snapshotter,
            transport,
            commit_tx,
            get_snapshot,
            removed,
            proposer: Proposer::new(),
            sessions: Sessions::new(),
            proposed_to: 0,
            pending_conf_changes: VecDeque::new(),
            conf_change_in_flight: None,
            conf_change_count: 0,
            reads: Reads::default(),
            status_tx,
            last_leader: 0,
            wal_bytes: 0,
            removed_by_peer: false,
            lonely_ticks: 0,
            commit_sent: HashMap::new(),
            snapshots_saved: Vec::new(),
            last_snapshot_bytes: 0,
            snapshot_in_flight: None,
            held_commits: Vec::new(),
            serialized_wake: std::sync::Arc::default(),
            last_apply_done: None,
        };
        if let Some(snap) = replayed.snapshot {
            rn.publish_snapshot(&snap).await?;
            rn.snapshots_saved.push(snap.get_metadata().index);
        }
        // Flag URLs fill in for members the snapshot (if any) did not name; removed ones stay
        // removed.
        for (id, url) in std::mem::take(&mut rn.members) {
            members.insert(id, url);
        }
        members.retain(|id, _| !rn.is_removed(*id));
        rn.members = members;
        Ok(rn)
    }

    /// The loop: tick, take proposals and peer messages, handle every Ready, until stopped.
    pub(super) async fn serve_channels(mut self, mut inputs: Inputs) -> Result<(), NodeError> {
        let mut ticker = tokio::time::interval(self.cfg.tick_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // Set once asked to stop while leading: leadership is being handed over until then.
        let mut stopping: Option<tokio::time::Instant> = None;
        let mut removed_by_peer = self.transport.member_removed();
        let result = loop {
            if self.removed_by_peer {
                tracing::info!("I've been removed from the cluster! Shutting down.");
                break Ok(());
            }
            let room = self.proposer.len() < MAX_PENDING_PROPOSALS;
            let deadline = stopping.unwrap_or_else(tokio::time::Instant::now);
            // Commits held back during a snapshot's serialization go as soon as it is done.
            let serializing = self.serializing();
            let serialized_wake = std::sync::Arc::clone(&self.serialized_wake);
            // Held proposals (`Proposer::hold`) go when their batch arrives or the hold ends.
            let release = self
                .proposer
                .has_unproposed()
                .then(|| {
                    let committed = self.node.raft.raft_log.committed;
                    self.proposer
                        .hold_until(committed, std::time::Instant::now())
                })
                .flatten()
                .map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                _ = inputs.stop.cancelled(), if stopping.is_none() => {
                    match self.begin_leader_transfer() {
                        Some(until) => stopping = Some(until),
                        None => break Ok(()),
                    }
                }
                _ = tokio::time::sleep_until(deadline), if stopping.is_some() => {
                    tracing::warn!("leadership transfer did not finish in time; stopping anyway");
                    break Ok(());
                }
                _ = tokio::time::sleep_until(release.unwrap_or(deadline)), if release.is_some() => {}
                _ = serialized_wake.notified(), if serializing => {}
                _ = ticker.tick() => {
                    self.node.tick();
                    self.warn_if_never_added();
                    self.retry_reads();
                    self.wal_bytes = self.wal.size_on_disk();
                }
                m = inputs.mailbox_rx.recv() => {
                    // The handle keeps a sender alive as long as the transport does.
                    if let Some(m) = m { self.step(m); }
                }
                Some(r) = inputs.report_rx.recv() => self.report(r),
                // A peer answered 410/403: this node was removed while it was not listening
                // (the leader stops sending to a member once its removal is applied, so it
                // may never see that commit). etcd's errMemberRemoved.
                Ok(()) = removed_by_peer.changed() => {
                    if *removed_by_peer.borrow() {
                        tracing::info!("a peer says this node was removed from the cluster");
                        self.removed_by_peer = true;
                    }
                }
                p = inputs.propose_rx.recv(), if room => match p {
                    Some(p) => self.proposer.push(&p),
                    // Every proposer is gone: the Go original's "close(proposeC)" shutdown.
                    None => break Ok(()),
                },
                cc = inputs.conf_change_rx.recv() => match cc {
                    Some(cc) => self.pending_conf_changes.push_back(cc),
                    None => break Ok(()),
                },
                Some(r) = inputs.read_index_rx.recv() => self.reads.push(r),
            }
            // Batch: take everything that arrived while the last Ready was being handled, so
            // many proposals share one Ready, one WAL write and one fsync.
            self.drain(&mut inputs);
            self.propose_pending();
            self.request_reads();
            let handled = match self.finish_snapshot(false).await {
                Ok(()) => self.handle_all_ready().await,
                Err(e) => Err(e),
            };
            match handled {
                Ok(Flow::Continue) => {}
                Ok(Flow::Removed) => {
                    tracing::info!("I've been removed from the cluster! Shutting down.");
                    break Ok(());
                }
                Err(e) => break Err(e),
            }
            self.publish_status();
            if stopping.is_some() && !self.is_leader() {
                tracing::info!(leader = self.node.raft.leader_id, "leadership handed over");
                break Ok(());
            }
        };
        // Finish a snapshot being written, then close the WAL cleanly (flushes and syncs what
        // was buffered) whatever the reason.
        let snapshot = self.finish_snapshot(true).await;
        let result = result.and(snapshot);
        let closed = self.wal.close().map_err(NodeError::from);
        result.and(closed)
    }

    /// On a graceful stop, a leader hands leadership to its most up-to-date voter so the
    /// cluster need not wait an election timeout. Returns how long to wait for it, or `None`
    /// to stop right away (not leading, or no one to hand over to).
    fn begin_leader_transfer(&mut self) -> Option<tokio::time::Instant> {
        if !self.is_leader() {
            return None;
        }
        let me = self.cfg.id;
        let prs = self.node.raft.prs();
        let voters: HashSet<u64> = prs.conf().voters().ids().iter().collect();
        let target = prs
            .iter()
            .filter(|(id, _)| **id != me && voters.contains(id))
            .max_by_key(|(_, pr)| pr.matched)
            .map(|(id, _)| *id)?;
        tracing::info!(to = target, "stopping: handing leadership over");
        self.node.transfer_leader(target);
        Some(tokio::time::Instant::now() + self.cfg.tick_interval * 20)
    }

    /// A node started with `--join` before the cluster was asked to add it waits forever
    /// without a word (the members refuse it); say what to do, every 10 s.
    fn warn_if_never_added(&mut self) {
        if !self.cfg.join || self.applied_index > 0 || self.node.raft.leader_id != raft::INVALID_ID
        {
            self.lonely_ticks = 0;
            return;
        }
        self.lonely_ticks += 1;
        if self.lonely_ticks.is_multiple_of(100) {
            let url = usize::try_from(self.cfg.id)
                .ok()
                .and_then(|i| self.cfg.peers.get(i.wrapping_sub(1)))
                .map_or("<its raft URL>", String::as_str);
            tracing::warn!(
                "no leader has contacted this node yet: if it is new, add it to the cluster first \
                 (curl -XPOST http://<a member's KV address>/{} -d {url})",
                self.cfg.id
            );
        }
    }

    /// Publishes the node's state for `/status`, `/health` and the metrics.
    fn publish_status(&mut self) {
        let r = &self.node.raft;
        if r.leader_id != self.last_leader {
            self.last_leader = r.leader_id;
            if r.leader_id != raft::INVALID_ID {
                metrics::LEADER_CHANGES.inc();
            }
        }
        metrics::IS_LEADER.set(i64::from(r.state == StateRole::Leader));
        metrics::APPLIED_INDEX.set(self.applied_index as i64);
        let status = NodeStatus {
            id: self.cfg.id,
            leader: r.leader_id,
            term: r.term,
            state: match r.state {
                StateRole::Leader => "leader",
                StateRole::Follower => "follower",
                StateRole::Candidate => "candidate",
                StateRole::PreCandidate => "pre-candidate",
            },
            commit: r.raft_log.committed,
            applied: self.applied_index,
            snapshot_index: self.snapshot_index,
            wal_bytes: self.wal_bytes,
            members: self.members.iter().map(|(k, v)| (*k, v.clone())).collect(),
            voters: {
                let cs = &self.conf_state;
                let mut ids: Vec<u64> = cs.voters.iter().chain(&cs.learners).copied().collect();
                ids.sort_unstable();
                ids
            },
            removed: {
                let removed = self
                    .removed
                    .read()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                let mut ids: Vec<u64> = removed.iter().copied().collect();
                ids.sort_unstable();
                ids
            },
        };
        self.status_tx.send_if_modified(|old| {
            let changed = *old != status;
            *old = status;
            changed
        });
    }

    fn drain(&mut self, inputs: &mut Inputs) {
        while let Ok(m) = inputs.mailbox_rx.try_recv() {
            self.step(m);
        }
        while let Ok(r) = inputs.report_rx.try_recv() {
            self.report(r);
        }
        while self.proposer.len() < MAX_PENDING_PROPOSALS {
            match inputs.propose_rx.try_recv() {
                Ok(p) => self.proposer.push(&p),
                Err(_) => break,
            }
        }
        while let Ok(cc) = inputs.conf_change_rx.try_recv() {
            self.pending_conf_changes.push_back(cc);
        }
        while let Ok(r) = inputs.read_index_rx.try_recv() {
            self.reads.push(r);
        }
    }

    /// Steps a message from a peer (the transport already ran `guard::check_message`).
    fn step(&mut self, m: Message) {
        if let Err(reason) = guard::check_against_state(&m, &guard::NodeView::of(&self.node.raft)) {
            guard::refused(&m, &reason);
            return;
        }
        // raft-rs refuses local message types from the network and responses from unknown
        // peers; etcd ignores both silently, and so do we (at debug level).
        if let Err(e) = self.node.step(m) {
            tracing::debug!("ignored a message from the network: {e}");
        }
    }

    fn report(&mut self, r: Report) {
        match r {
            Report::Unreachable(id) => self.node.report_unreachable(id),
            Report::Snapshot(id, status) => {
                let outcome = match status {
                    raft::SnapshotStatus::Finish => "finish",
                    raft::SnapshotStatus::Failure => "failure",
                };
                metrics::SNAPSHOTS_SENT.with_label_values(&[outcome]).inc();
                self.node.report_snapshot(id, status)
            }
        }
    }

    /// Whether raft would accept a proposal now. raft-rs *drops* a proposal made while no
    /// leader is known, by a candidate, or during a leadership transfer (etcd would block), so
    /// proposals wait in the proposer until this holds.
    fn can_propose(&self) -> bool {
        let r = &self.node.raft;
        match r.state {
            StateRole::Leader => r.lead_transferee.is_none(),
            StateRole::Follower => r.leader_id != raft::INVALID_ID,
            _ => false,
        }
    }

    /// Proposes everything that waited, batched into `MsgPropose`s of up to
    /// [`MAX_PROPOSAL_BATCH_BYTES`] (usually one): one step through raft and one append per
    /// batch, and on a follower one forwarded message to the leader.
    ///
    /// Returns whether it handed raft any entries.
    fn propose_pending(&mut self) -> bool {
        if !self.can_propose() {
            return false;
        }
        // Proposals sent to a leader that is gone may be lost with it; so may any that made no
        // progress for a while. Propose them again: applying is idempotent (`proposals`).
        let leader = self.node.raft.leader_id;
        if leader != self.proposed_to || self.proposer.stalled() {
            self.proposed_to = leader;
            self.proposer.restart();
        }
        let unproposed = if self.proposer.hold(self.node.raft.raft_log.committed) {
            Vec::new()
        } else {
            self.proposer.take_unproposed()
        };
        let proposed_any = !unproposed.is_empty();
        for chunk in chunk_by_size(unproposed, MAX_PROPOSAL_BATCH_BYTES) {
            let entries: Vec<Entry> = chunk
                .into_iter()
                .map(|data| Entry {
                    data,
                    ..Default::default()
                })
                .collect();
            let n = entries.len();
            let mut m = Message::default();
            m.set_msg_type(MessageType::MsgPropose);
            m.from = self.cfg.id;
            m.set_entries(entries.into());
            match self.node.step(m) {
                Ok(()) => metrics::PROPOSALS_ACCEPTED.inc_by(n as u64),
                Err(e) => {
                    // Only the uncommitted-size limit (1 GiB not yet committed) gets here.
                    metrics::PROPOSALS_DROPPED.inc_by(n as u64);
                    tracing::error!("raft dropped {n} proposal(s): {e}");
                }
            }
        }
        if proposed_any {
            if self.is_leader() {
                self.proposer
                    .mark_appended(self.node.raft.raft_log.last_index());
            } else {
                self.proposer.mark_forwarded();
            }
        }
        let retry = self
            .conf_change_in_flight
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() >= super::proposals::RETRY_AFTER);
        if self.conf_change_in_flight.is_none() {
            if let Some(mut cc) = self.pending_conf_changes.pop_front() {
                // Counts up per node, as in Go, from this process's random origin, so that each
                // node recognizes its own change when it is applied, even across restarts.
                self.conf_change_count += 1;
                cc.id = self.proposer.origin().wrapping_add(self.conf_change_count);
                self.conf_change_in_flight = Some((cc, std::time::Instant::now()));
                self.propose_conf_change();
            }
        } else if retry {
            self.propose_conf_change();
        }
        proposed_any
    }

    fn propose_conf_change(&mut self) {
        if let Some((cc, at)) = &mut self.conf_change_in_flight {
            *at = std::time::Instant::now();
            if let Err(e) = self.node.propose_conf_change(vec![], cc.clone()) {
                tracing::warn!("conf change not accepted yet, will retry: {e}");
            }
        }
    }

    async fn handle_all_ready(&mut self) -> Result<Flow, NodeError> {
        loop {
            while self.node.has_ready() {
                if self.on_ready().await? == Flow::Removed {
                    return Ok(Flow::Removed);
                }
            }
            // Held proposals (`Proposer::hold`) go as soon as the previous batch arrived: in
            // the leader's appends on a follower, committed on the leader.
            if self.proposer.has_unproposed() && self.propose_pending() {
                continue;
            }
            if !self.send_pending_commits() {
                return Ok(Flow::Continue);
            }
        }
    }

    /// Tells followers about a commit index they have not heard of. Returns whether that
    /// made messages to send.
    ///
    /// With `skip_bcast_commit`, raft-rs does not send an empty append to every follower each
    /// time the commit index moves. Under load the new commit index rides on the next append
    /// anyway: a turn of the loop usually steps the followers' acks and the new proposals
    /// together, and the appends of those proposals carry the commit. This sends an append
    /// only to the followers that still need one at the end of the turn, so a quiet cluster
    /// applies on followers as quickly as before, and a busy one sends about half the
    /// messages (each of which also costs the follower a Ready and an ack).
    fn send_pending_commits(&mut self) -> bool {
        if !self.is_leader() {
            return false;
        }
        let me = self.cfg.id;
        let committed = self.node.raft.raft_log.committed;
        let lagging: Vec<u64> = self
            .node
            .raft
            .prs()
            .iter()
            .filter(|(id, pr)| {
                // A follower can apply only what it has: news beyond its match is no use.
                let useful = committed.min(pr.matched);
                **id != me && useful > self.commit_sent.get(*id).copied().unwrap_or(0)
            })
            .map(|(id, _)| *id)
            .collect();
        let before = self.node.raft.msgs.len();
        for id in lagging {
            // Sends nothing to a peer raft paused (probing, or too many appends in flight).
            self.node.raft.send_append(id);
        }
        self.node.raft.msgs.len() > before
    }

    /// One Ready, in the order raft-rs requires (its `lib.rs` guide, steps numbered the same).
    /// Go saved to the WAL and only then sent every message; raft-rs lets the leader send its
    /// `messages()` before the fsync (raft thesis 10.2.1), which overlaps the leader's disk
    /// write with the followers' round trip. Followers' `persisted_messages()` (votes, append
    /// acks) still go out only after the fsync.
    async fn on_ready(&mut self) -> Result<Flow, NodeError> {
        let mut rd = self.node.ready();

        // 0. Linearizable reads that a quorum confirmed.
        if !rd.read_states().is_empty() {
            self.answer_reads(rd.take_read_states());
        }

        // 1. Leader messages may go out before this node's own write is durable.
        if !rd.messages().is_empty() {
            self.send(rd.take_messages());
        }

        // 2. A snapshot from the leader: its file and WAL record go to disk before anything
        //    else of this Ready (etcd#10219), then it replaces the log and the store's state.
        let received_snapshot = !rd.snapshot().is_empty();
        if received_snapshot {
            // Its payload was checked on the way in (`guard`): it is one this node can load.
            let snap = rd.snapshot().clone();
            // One snapshot at a time in the directory and the WAL: finish our own first.
            self.finish_snapshot(true).await?;
            self.save_snap(&snap)?;
            self.storage.apply_snapshot(snap.clone())?;
            self.publish_snapshot(&snap).await?;
            metrics::SNAPSHOTS_RECEIVED.inc();
        }

        for e in rd.entries() {
            self.proposer.note_in_log(&e.data);
        }

        // 3. Hard state and new entries to the WAL: one write, one fsync if raft needs it.
        let hs = rd.hs().cloned().unwrap_or_default();
        let started = std::time::Instant::now();
        self.wal.save(&hs, rd.entries())?;
        if rd.must_sync() {
            metrics::WAL_FSYNC_SECONDS.observe(started.elapsed().as_secs_f64());
        }
        if !rd.entries().is_empty() {
            metrics::READY_ENTRIES.observe(rd.entries().len() as f64);
        }
        if received_snapshot {
            // The WAL only trusts a snapshot its hard state commits (etcd#10219): make the
            // commit at the snapshot durable before old segments may go.
            self.wal.sync()?;
            self.release_wal()?;
        }

        // 4. ... and to the in-memory log that raft reads from.
        self.storage.append(rd.entries(), rd.hs())?;

        // 5. Votes and acks only now that what they promise is durable.
        if !rd.persisted_messages().is_empty() {
            self.send(rd.take_persisted_messages());
        }

        // 6. Committed entries to the key-value store.
        let committed = rd.take_committed_entries();
        let flow = self.publish_entries(committed).await?;
        if flow == Flow::Removed {
            return Ok(flow);
        }

        // 7. Tell raft this Ready is handled.
        let mut light = self.node.advance(rd);

        // 8. A commit index learnt from our own append (always, on a single node) must reach
        //    the WAL before a snapshot can cover it, or a restart finds a snapshot beyond the
        //    persisted commit. Commit-only: written now, made durable by the next fsync.
        if let Some(commit) = light.commit_index() {
            self.storage.set_commit(commit);
            self.wal.save(&self.node.raft.hard_state(), &[])?;
        }

        // 9. What became sendable and committed after the advance.
        if !light.messages().is_empty() {
            self.send(light.take_messages());
        }
        let flow = self.publish_entries(light.take_committed_entries()).await?;
        if flow == Flow::Removed {
            return Ok(flow);
        }
        self.node.advance_apply();

        // 10. Snapshot and compact once enough is applied, after the store really applied it.
        self.maybe_trigger_snapshot().await?;
        Ok(Flow::Continue)
    }

    /// Sends to peers through the transport, fixing up snapshots first.
    fn send(&mut self, msgs: Vec<Message>) {
        for m in &msgs {
            if m.get_msg_type() == MessageType::MsgAppend {
                let sent = self.commit_sent.entry(m.to).or_default();
                *sent = (*sent).max(m.commit);
            }
        }
        self.transport
            .send(super::process_messages(msgs, &self.conf_state));
    }

    /// Whether this node currently leads.
    pub(super) fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }
}

#[cfg(test)]
mod tests {
    use super::chunk_by_size;
    use bytes::Bytes;

    #[test]
    fn proposals_are_split_by_size_in_order() {
        let b = |n: usize| Bytes::from(vec![0u8; n]);
        let sizes = |c: Vec<Vec<Bytes>>| {
            c.iter()
                .map(|v| v.iter().map(|x| x.len()).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            sizes(chunk_by_size(vec![b(4), b(4), b(4)], 8)),
            vec![vec![4, 4], vec![4]]
        );
        // An entry larger than the limit goes alone.
        assert_eq!(
            sizes(chunk_by_size(vec![b(2), b(20), b(2)], 8)),
            vec![vec![2], vec![20], vec![2]]
        );
        assert!(chunk_by_size(vec![], 8).is_empty());
    }
}
