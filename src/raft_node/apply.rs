//! From committed entries to the key-value store, and snapshots both ways (Go:
//! `entriesToApply`, `publishEntries`, `publishSnapshot`, `saveSnap`, `maybeTriggerSnapshot`,
//! `processMessages`).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use protobuf::Message as _;
use raft::Storage;
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, MessageType, Snapshot,
    SnapshotMetadata,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::node::{Flow, RaftNode};
use super::proposals::{self, Sessions, Verdict};
use super::{Commit, NodeError};
use crate::snap::SnapError;
use crate::wal::WalSnapshot;

/// What a snapshot file holds in `Snapshot.data`: the store's own bytes, plus the raft URL of
/// every member. raftexample kept only the store; then a node restarted from a snapshot that
/// covers an `AddNode` no longer knows where that member listens.
///
/// It also keeps the ids removed from the cluster, which may never come back (a removed node
/// still has its old log; etcd refuses to re-add an id for the same reason).
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    members: BTreeMap<u64, String>,
    removed: BTreeSet<u64>,
    /// Client sessions: the last applied sequence number per proposing node.
    sessions: Sessions,
    #[serde(with = "serde_bytes")]
    kv: Vec<u8>,
}

/// Writes a [`SnapshotData`] into `buf` with the store's part serialized in place: the same
/// bytes as `bincode::serialize(&SnapshotData { .. })`, without building the `kv` vector first
/// and copying it.
fn encode_snapshot_data(
    mut buf: Vec<u8>,
    members: &BTreeMap<u64, String>,
    removed: &BTreeSet<u64>,
    sessions: &Sessions,
    get_snapshot: &super::GetSnapshot,
) -> Vec<u8> {
    // bincode writes a struct as its fields in order, and bytes as a u64 length and the bytes.
    bincode::serialize_into(&mut buf, &(members, removed, sessions))
        .expect("invariant: serializing strings and numbers into memory cannot fail");
    let len_at = buf.len();
    buf.extend_from_slice(&[0; 8]);
    get_snapshot(&mut buf);
    let kv_len = (buf.len() - len_at - 8) as u64;
    buf[len_at..len_at + 8].copy_from_slice(&kv_len.to_le_bytes());
    buf
}

/// [`SnapshotData`] read in place: what checking a payload needs, without copying the store's
/// part (which may be hundreds of megabytes).
#[derive(Deserialize)]
struct SnapshotDataRef<'a> {
    _members: BTreeMap<u64, String>,
    _removed: BTreeSet<u64>,
    _sessions: Sessions,
    #[serde(borrow, with = "serde_bytes")]
    kv: &'a [u8],
}

/// The store's part of a snapshot payload, if the payload is one this program wrote.
pub(super) fn snapshot_store_part(data: &[u8]) -> Result<&[u8], String> {
    bincode::deserialize::<SnapshotDataRef<'_>>(data)
        .map(|d| d.kv)
        .map_err(|e| format!("not a raftexample snapshot: {e}"))
}

/// The committed entries not yet applied: raft may hand out entries again around a snapshot.
///
/// # Errors
///
/// A gap (the first entry is beyond `applied + 1`) means an entry would never be applied.
pub fn entries_to_apply(ents: Vec<Entry>, applied: u64) -> Result<Vec<Entry>, String> {
    let Some(first) = ents.first().map(|e| e.index) else {
        return Ok(ents);
    };
    if first > applied + 1 {
        return Err(format!(
            "first index of committed entry[{first}] should <= progress.appliedIndex[{applied}]+1"
        ));
    }
    let skip = (applied + 1 - first) as usize;
    Ok(ents.into_iter().skip(skip).collect())
}

/// Makes an outgoing snapshot name its receiver. A snapshot taken before a node was added
/// does not list it, and raft rejects a snapshot that does not name the receiver (etcd#13760,
/// raft-rs#472), so a new member could never catch up.
///
/// Go stamps the leader's *current* ConfState instead. That mixes two indexes: the payload
/// (members, removed ids, sessions, the store) is as of the snapshot, the ConfState as of now,
/// and the receiver then replays the entries in between against the wrong configuration. A
/// `RemoveNode` among them looks like the removal of a non-member and is skipped there, so
/// that node alone keeps the removed id as a member. Adding just the receiver (as the voter or
/// learner it now is) keeps the snapshot's configuration otherwise as of its index; the
/// receiver's own `AddNode`, replayed after it, then changes nothing.
pub fn process_messages(mut msgs: Vec<Message>, conf_state: &ConfState) -> Vec<Message> {
    for m in msgs.iter_mut() {
        if m.get_msg_type() == MessageType::MsgSnapshot {
            let to = m.to;
            let cs = m.mut_snapshot().mut_metadata().mut_conf_state();
            if cs.voters.contains(&to) || cs.learners.contains(&to) {
                continue;
            }
            if conf_state.learners.contains(&to) {
                cs.learners.push(to);
            } else {
                cs.voters.push(to);
            }
        }
    }
    msgs
}

impl RaftNode {
    /// Applies conf changes to raft and the transport and sends the payloads of normal entries
    /// to the store. Returns whether this node was removed; `last_apply_done` fires once the
    /// store applied the batch.
    pub(super) async fn publish_entries(&mut self, ents: Vec<Entry>) -> Result<Flow, NodeError> {
        let ents =
            entries_to_apply(ents, self.applied_index).map_err(|reason| NodeError::BadEntry {
                index: self.applied_index + 1,
                reason,
            })?;
        let Some(last) = ents.last().map(|e| e.index) else {
            return Ok(Flow::Continue);
        };
        let mut data = Vec::with_capacity(ents.len());
        let mut flow = Flow::Continue;
        for e in ents {
            match e.get_entry_type() {
                // An empty entry is the leader's no-op at the start of its term.
                EntryType::EntryNormal if e.data.is_empty() => {}
                EntryType::EntryNormal => match proposals::admit(&mut self.sessions, &e.data) {
                    Ok(Verdict::Apply(payload)) => data.push(payload),
                    Ok(Verdict::Skip) => {}
                    Err(reason) => {
                        return Err(NodeError::BadEntry {
                            index: e.index,
                            reason,
                        });
                    }
                },
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    cc.merge_from_bytes(&e.data)
                        .map_err(|err| NodeError::BadEntry {
                            index: e.index,
                            reason: format!("not a valid conf change: {err}"),
                        })?;
                    if self.apply_conf_change(&cc)? {
                        flow = Flow::Removed;
                    }
                }
                EntryType::EntryConfChangeV2 => {
                    tracing::warn!(
                        index = e.index,
                        "ignoring an unsupported ConfChangeV2 entry"
                    );
                }
            }
        }
        if let Some(&seq) = self.sessions.get(&self.proposer.origin()) {
            self.proposer.confirm(seq);
        }
        crate::metrics::ENTRIES_COMMITTED.inc_by(data.len() as u64);
        // After the loop, as Go: the applied index moves before the store has applied, which
        // is why snapshots wait for `apply_done`.
        self.applied_index = last;
        // Published even without data, so the store's applied index (which linearizable reads
        // wait on) also moves past no-ops and conf changes.
        let (apply_done, rx) = oneshot::channel();
        self.publish(Commit::Entries {
            data,
            index: last,
            apply_done,
        })
        .await?;
        self.last_apply_done = Some(rx);
        Ok(flow)
    }

    /// Applies one conf change; returns true if it removed this node.
    fn apply_conf_change(&mut self, cc: &ConfChange) -> Result<bool, NodeError> {
        if self
            .conf_change_in_flight
            .as_ref()
            .is_some_and(|(mine, _)| {
                mine.id == cc.id
                    && mine.node_id == cc.node_id
                    && mine.get_change_type() == cc.get_change_type()
            })
        {
            self.conf_change_in_flight = None;
        }
        let skip = {
            let removed = self
                .removed
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            skip_conf_change(&self.conf_state, &removed, cc)
        };
        if let Some(why) = skip {
            tracing::warn!(node = cc.node_id, "conf change ignored: {why}");
            return Ok(false);
        }
        // A change raft cannot apply (e.g. removing the last voter) is skipped, the same way on
        // every node, rather than stopping them all.
        self.conf_state = match self.node.apply_conf_change(cc) {
            Ok(cs) => cs,
            Err(e) => {
                tracing::warn!(node = cc.node_id, "conf change not applied: {e}");
                return Ok(false);
            }
        };
        self.storage.set_conf_state(self.conf_state.clone());
        let id = cc.node_id;
        match cc.get_change_type() {
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                if !cc.context.is_empty() {
                    let url = String::from_utf8_lossy(&cc.context).into_owned();
                    if id != self.cfg.id {
                        self.transport.add_peer(id, std::slice::from_ref(&url));
                    }
                    self.members.insert(id, url);
                }
                tracing::info!(node = id, "member added");
            }
            ConfChangeType::RemoveNode => {
                self.members.remove(&id);
                self.removed
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .insert(id);
                if id == self.cfg.id {
                    return Ok(true);
                }
                self.transport.remove_peer(id);
                tracing::info!(node = id, "member removed");
            }
        }
        Ok(false)
    }

    pub(super) fn is_removed(&self, id: u64) -> bool {
        self.removed
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(&id)
    }

    /// Hands a snapshot (received, or loaded at start) to the store and adopts its membership.
    pub(super) async fn publish_snapshot(&mut self, snap: &Snapshot) -> Result<(), NodeError> {
        let meta = snap.get_metadata();
        if meta.index <= self.applied_index {
            return Err(NodeError::BadSnapshot {
                index: meta.index,
                reason: format!("not newer than the applied index {}", self.applied_index),
            });
        }
        let payload: SnapshotData =
            bincode::deserialize(&snap.data).map_err(|e| NodeError::BadSnapshot {
                index: meta.index,
                reason: e.to_string(),
            })?;
        for (&id, url) in &payload.members {
            if id != self.cfg.id && self.members.get(&id) != Some(url) {
                if self.members.contains_key(&id) {
                    self.transport.update_peer(id, std::slice::from_ref(url));
                } else {
                    self.transport.add_peer(id, std::slice::from_ref(url));
                }
            }
        }
        for id in payload.removed.iter() {
            if *id != self.cfg.id && self.members.contains_key(id) {
                self.transport.remove_peer(*id);
            }
        }
        self.members = payload.members;
        self.sessions = payload.sessions;
        if let Some(&seq) = self.sessions.get(&self.proposer.origin()) {
            self.proposer.confirm(seq);
        }
        self.removed
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend(payload.removed);
        self.conf_state = meta.get_conf_state().clone();
        self.snapshot_index = meta.index;
        self.applied_index = meta.index;
        // The store replaces its state with the snapshot: earlier batches no longer matter.
        self.last_apply_done = None;
        self.publish(Commit::Snapshot {
            data: Bytes::from(payload.kv),
            index: meta.index,
        })
        .await
    }

    /// Hands a commit to the key-value store, in order; held back while a snapshot thread is
    /// serializing the store, which must stay at the snapshot's index until it is done.
    async fn publish(&mut self, commit: Commit) -> Result<(), NodeError> {
        if self.serializing() {
            self.held_commits.push(commit);
            return Ok(());
        }
        self.release_held_commits().await?;
        self.send_commit(commit).await
    }

    async fn send_commit(&self, commit: Commit) -> Result<(), NodeError> {
        self.commit_tx
            .send(commit)
            .await
            .map_err(|_| NodeError::Halted("the key-value store stopped reading commits".into()))
    }

    /// Sends the commits held back during a serialization, oldest first.
    async fn release_held_commits(&mut self) -> Result<(), NodeError> {
        for commit in std::mem::take(&mut self.held_commits) {
            self.send_commit(commit).await?;
        }
        Ok(())
    }

    /// Whether the snapshot thread is still serializing the store.
    pub(super) fn serializing(&mut self) -> bool {
        let Some(rx) = self
            .snapshot_in_flight
            .as_mut()
            .and_then(|s| s.serialized.as_mut())
        else {
            return false;
        };
        // Fired, or dropped by a thread that died (then `written` reports it).
        let still = matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        if !still && let Some(s) = self.snapshot_in_flight.as_mut() {
            s.serialized = None;
        }
        still
    }

    /// Saves a snapshot: the file first, then its WAL record (synced). A crash in between
    /// leaves an extra snapshot file, which is harmless: at start only a snapshot recorded in
    /// the WAL is used (etcd#12691). Old WAL segments go later, in [`RaftNode::release_wal`].
    pub(super) fn save_snap(&mut self, snap: &Snapshot) -> Result<(), NodeError> {
        self.snapshotter.save_snap(snap)?;
        self.record_snapshot(snap)
    }

    /// Writes the WAL record (synced) of a snapshot whose file is already durable.
    fn record_snapshot(&mut self, snap: &Snapshot) -> Result<(), NodeError> {
        let meta = snap.get_metadata();
        self.wal.save_snapshot(&WalSnapshot {
            index: meta.index,
            term: meta.term,
            conf_state: Some(meta.get_conf_state().clone()),
        })?;
        self.snapshots_saved.push(meta.index);
        Ok(())
    }

    /// Completes a snapshot whose file a background thread was writing: once the file is
    /// durable, its WAL record goes in (file first, then record, as in [`RaftNode::save_snap`]),
    /// old WAL segments go, raft may serve it, and the log is compacted. With `wait` false it
    /// returns at once if the file is not written yet.
    pub(super) async fn finish_snapshot(&mut self, wait: bool) -> Result<(), NodeError> {
        // First the store's serialization, which the held commits wait for ...
        if wait {
            let serialized = self
                .snapshot_in_flight
                .as_mut()
                .and_then(|s| s.serialized.take());
            if let Some(rx) = serialized {
                let _ = rx.await;
            }
        } else if self.serializing() {
            return Ok(());
        }
        self.release_held_commits().await?;
        let Some(mut inflight) = self.snapshot_in_flight.take() else {
            return Ok(());
        };
        // ... then the file.
        let result = if wait {
            inflight.written.await.ok()
        } else {
            match inflight.written.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => {
                    self.snapshot_in_flight = Some(inflight);
                    return Ok(());
                }
                Err(oneshot::error::TryRecvError::Closed) => None,
                Ok(r) => Some(r),
            }
        };
        let snap =
            result.ok_or_else(|| NodeError::Halted("the snapshot writer thread died".into()))??;
        self.last_snapshot_bytes = snap.data.len();
        self.record_snapshot(&snap)?;
        let (applied, index) = (self.applied_index, snap.get_metadata().index);
        // The commit index at `index` was written to the WAL (LightReady) before the snapshot
        // was taken, and the snapshot record's sync made it durable: old segments may go.
        self.release_wal()?;
        self.storage.set_latest_snapshot(snap);
        crate::metrics::SNAPSHOTS_TAKEN.inc();
        let compact_index = index
            .min(applied)
            .saturating_sub(self.cfg.snapshot_catchup_entries)
            .max(1);
        self.storage.mem().wl().compact(compact_index)?;
        tracing::info!(index, compact_index, "snapshot saved, log compacted");
        self.snapshot_index = self.snapshot_index.max(index);
        Ok(())
    }

    /// Deletes the WAL segments that only the snapshot *before* the newest one needs. Keeping
    /// one generation back is etcd's safety net: if the newest snapshot file turns out
    /// unreadable at start, the previous snapshot plus the WAL from it still restores the node.
    /// Call only once the newest snapshot is committed in the WAL's hard state.
    pub(super) fn release_wal(&mut self) -> Result<(), NodeError> {
        if self.snapshots_saved.len() < 2 {
            return Ok(());
        }
        let keep_from = self.snapshots_saved[self.snapshots_saved.len() - 2];
        self.snapshots_saved.drain(..self.snapshots_saved.len() - 2);
        self.wal.release_lock_to(keep_from)?;
        Ok(())
    }

    /// Takes a snapshot once `snapshot_count` entries were applied since the last, after the
    /// store has applied them, then compacts the in-memory log.
    ///
    /// "Applied them" means every batch published so far, not just this Ready's: a trigger
    /// skipped while another snapshot was in flight comes due in a later Ready, perhaps one
    /// with no commits at all, while the commits held back during that snapshot were only
    /// just released and still sit in *commitC*. Serializing then would label an older store
    /// with the newer index, and a restart or a follower loading it would lose the difference.
    pub(super) async fn maybe_trigger_snapshot(&mut self) -> Result<(), NodeError> {
        if self.applied_index - self.snapshot_index <= self.cfg.snapshot_count
            || self.snapshot_in_flight.is_some()
        {
            return Ok(());
        }
        // None only before any batch was published since start or since a received snapshot,
        // and then `applied_index` is the snapshot's, which does not trigger.
        if let Some(done) = self.last_apply_done.take() {
            // Dropped without a signal: the store failed before applying the batch, so its
            // state is not the one at `applied`. A snapshot of it would lose that batch.
            done.await.map_err(|_| {
                NodeError::Halted(
                    "the key-value store stopped before applying a batch; not snapshotting".into(),
                )
            })?;
        }
        let applied = self.applied_index;
        tracing::info!(
            applied,
            last_snapshot = self.snapshot_index,
            "start snapshot"
        );
        let removed: BTreeSet<u64> = self
            .removed
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .copied()
            .collect();
        let mut meta = SnapshotMetadata {
            index: applied,
            term: self.storage.term(applied)?,
            ..Default::default()
        };
        meta.set_conf_state(self.conf_state.clone());
        // Room for a store a little larger than last time, so the buffer is not regrown.
        let capacity = self.last_snapshot_bytes + self.last_snapshot_bytes / 8 + 4096;
        let (members, sessions) = (self.members.clone(), self.sessions.clone());
        let get_snapshot = Arc::clone(&self.get_snapshot);
        let wake = Arc::clone(&self.serialized_wake);
        let snapshotter = self.snapshotter.clone();
        // Serializing the map (tens of milliseconds per 100,000 keys) and writing and fsyncing
        // the file happen on a thread of its own, so the Ready loop keeps serving meanwhile.
        // The store must stay at `applied` while it is serialized: `publish` holds commits back
        // until `serialized` fires. `finish_snapshot` completes the snapshot.
        let (serialized_tx, serialized) = oneshot::channel();
        let (done, written) = oneshot::channel();
        std::thread::Builder::new()
            .name("snapshot-writer".into())
            .spawn(move || {
                let data = encode_snapshot_data(
                    Vec::with_capacity(capacity),
                    &members,
                    &removed,
                    &sessions,
                    &get_snapshot,
                );
                let _ = serialized_tx.send(());
                wake.notify_one();
                let snap = Snapshot {
                    data: data.into(),
                    metadata: Some(meta).into(),
                    ..Default::default()
                };
                let _ = done.send(snapshotter.save_snap(&snap).map(|()| snap));
            })
            .map_err(|source| NodeError::Io {
                context: "spawning the snapshot writer".into(),
                source,
            })?;
        self.snapshot_in_flight = Some(SnapshotInFlight {
            serialized: Some(serialized),
            written,
        });
        Ok(())
    }
}

/// A snapshot being taken by the snapshot writer thread.
pub(super) struct SnapshotInFlight {
    /// Fires once the store is serialized; until then commits are held back (`publish`).
    serialized: Option<oneshot::Receiver<()>>,
    /// The snapshot, once its file is durable.
    written: oneshot::Receiver<Result<Snapshot, SnapError>>,
}

/// Why a committed conf change must change nothing, if it must. Decided from replicated state
/// only (the configuration and the removed ids), so every node skips the same ones.
///
/// - A removed id never comes back (its node still holds its old log and its peers refuse
///   it): a late or repeated AddNode for it is skipped.
/// - Removing an id that is not in the configuration (a typo in `DELETE /<id>` that got past
///   the API's check, or a repeated removal) must not mark the id removed, which would refuse
///   it for good.
fn skip_conf_change(
    cs: &ConfState,
    removed: &HashSet<u64>,
    cc: &ConfChange,
) -> Option<&'static str> {
    let id = cc.node_id;
    match cc.get_change_type() {
        ConfChangeType::AddNode | ConfChangeType::AddLearnerNode if removed.contains(&id) => {
            Some("the id was removed from this cluster and cannot be reused")
        }
        ConfChangeType::RemoveNode if !cs.voters.contains(&id) && !cs.learners.contains(&id) => {
            Some("the id is not a member")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ent(index: u64) -> Entry {
        Entry {
            index,
            term: 1,
            ..Default::default()
        }
    }

    #[test]
    fn snapshot_data_is_encoded_as_bincode_would() {
        let members: BTreeMap<u64, String> = [
            (1, "http://127.0.0.1:12379".to_string()),
            (4, "http://h:4".to_string()),
        ]
        .into();
        let removed: BTreeSet<u64> = [3, 9].into();
        let sessions: Sessions = [(7, 42)].into();
        let kv = b"any bytes the store writes".to_vec();
        let store = kv.clone();
        let get: crate::raft_node::GetSnapshot = Arc::new(move |out| out.extend_from_slice(&store));
        let want = bincode::serialize(&SnapshotData {
            members: members.clone(),
            removed: removed.clone(),
            sessions: sessions.clone(),
            kv,
        })
        .expect("ser");
        let got = encode_snapshot_data(vec![], &members, &removed, &sessions, &get);
        assert_eq!(got, want);
        let back: SnapshotData = bincode::deserialize(&got).expect("decodes");
        assert_eq!(back.kv, b"any bytes the store writes");
        assert_eq!(back.members, members);
        // The guard finds the store's part in place; a cut payload is refused.
        assert_eq!(
            snapshot_store_part(&got),
            Ok(&b"any bytes the store writes"[..])
        );
        assert!(snapshot_store_part(&got[..got.len() - 1]).is_err());
        assert!(snapshot_store_part(b"junk").is_err());
    }

    #[test]
    fn entries_to_apply_skips_what_was_applied() {
        let idx = |v: Vec<Entry>| v.iter().map(|e| e.index).collect::<Vec<_>>();
        assert_eq!(
            idx(entries_to_apply(vec![ent(1), ent(2)], 0).expect("ok")),
            vec![1, 2]
        );
        assert_eq!(
            idx(entries_to_apply(vec![ent(1), ent(2), ent(3)], 2).expect("ok")),
            vec![3]
        );
        assert!(
            entries_to_apply(vec![ent(1), ent(2)], 5)
                .expect("ok")
                .is_empty()
        );
        assert!(entries_to_apply(vec![], 5).expect("ok").is_empty());
        assert!(entries_to_apply(vec![ent(7)], 5).is_err());
    }

    /// After Go's TestProcessMessages: a MsgSnapshot is made to name its receiver, with the
    /// role it has now; the rest of its configuration stays as of the snapshot. Other messages
    /// are left alone.
    #[test]
    fn process_messages_adds_the_receiver_to_snapshots_only() {
        let current = ConfState {
            voters: vec![2, 6, 8, 10],
            learners: vec![11],
            ..Default::default()
        };
        let at_snapshot = ConfState {
            voters: vec![1, 2, 3],
            ..Default::default()
        };
        let snap_to = |to: u64, cs: &ConfState| {
            let mut m = Message::default();
            m.set_msg_type(MessageType::MsgSnapshot);
            m.to = to;
            m.mut_snapshot().mut_metadata().set_conf_state(cs.clone());
            m.mut_snapshot().mut_metadata().index = 9;
            m
        };
        let mut app_msg = Message::default();
        app_msg.set_msg_type(MessageType::MsgAppend);
        app_msg.to = 8;
        app_msg
            .mut_snapshot()
            .mut_metadata()
            .set_conf_state(at_snapshot.clone());

        let out = process_messages(
            vec![
                snap_to(8, &at_snapshot),
                snap_to(11, &at_snapshot),
                snap_to(2, &at_snapshot),
                app_msg.clone(),
            ],
            &current,
        );

        let with = |voters: Vec<u64>, learners: Vec<u64>| ConfState {
            voters,
            learners,
            ..Default::default()
        };
        let want = vec![
            snap_to(8, &with(vec![1, 2, 3, 8], vec![])),
            snap_to(11, &with(vec![1, 2, 3], vec![11])),
            snap_to(2, &at_snapshot),
            app_msg,
        ];
        assert_eq!(out, want);
    }

    #[test]
    fn conf_changes_that_must_change_nothing_are_skipped() {
        let cs = ConfState {
            voters: vec![1, 2, 3],
            learners: vec![5],
            ..Default::default()
        };
        let removed: HashSet<u64> = [4].into();
        let cc = |t: ConfChangeType, id: u64| {
            let mut cc = ConfChange::default();
            cc.set_change_type(t);
            cc.node_id = id;
            cc
        };
        use ConfChangeType::{AddLearnerNode, AddNode, RemoveNode};
        for (t, id, skipped) in [
            (RemoveNode, 2, false),
            (RemoveNode, 5, false),
            // Never a member, or already removed: nothing to do, and 9 stays usable.
            (RemoveNode, 9, true),
            (RemoveNode, 4, true),
            (AddNode, 4, true),
            (AddLearnerNode, 4, true),
            (AddNode, 9, false),
        ] {
            assert_eq!(
                skip_conf_change(&cs, &removed, &cc(t, id)).is_some(),
                skipped,
                "{t:?} {id}"
            );
        }
    }
}
