//! The replicated key-value map (Go: `kvstore.go`).
//!
//! Writes never touch the map directly: [`KvStore::propose`] serializes the pair into
//! *proposeC*, and the map changes only when [`KvStore::read_commits`] sees the entry come
//! back committed. Reads are served from the local map, so a follower may answer with a value
//! a moment old, exactly as the Go original.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::raft_node::Commit;

/// One proposal: the key (the full request URI) and its value (Go: `kv{Key, Val}`, gob), plus
/// the id of a client waiting for it to apply (0: nobody waits, the Go original's behaviour).
#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Kv<'a> {
    key: &'a str,
    #[serde(with = "serde_bytes")]
    val: &'a [u8],
    req: u64,
}

/// Why a commit could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// A committed entry is not a key-value pair written by this program.
    #[error("committed entry #{position} of a batch is not a key-value proposal: {source}")]
    BadEntry {
        /// Position of the entry in its batch.
        position: usize,
        /// The decoding error.
        source: bincode::Error,
    },
    /// A snapshot's payload could not be decoded.
    #[error("snapshot is not a key-value map: {0}")]
    BadSnapshot(bincode::Error),
}

/// Why a proposal could not be made.
#[derive(Debug, thiserror::Error)]
#[error("the raft node has stopped; restart this node")]
pub struct Stopped;

/// Why a linearizable request failed.
#[derive(Debug, thiserror::Error)]
pub enum LinearizableError {
    /// The raft node is gone.
    #[error(transparent)]
    Stopped(#[from] Stopped),
    /// No answer in time: no quorum, no leader, or the proposal was dropped.
    #[error(
        "not confirmed by a quorum within {0:?}; the cluster may have no leader or quorum \
         (check GET /health on the raft port), retry later"
    )]
    Timeout(Duration),
}

/// *readIndexC*: a request for the cluster's commit index, confirmed by a quorum (raft's
/// ReadIndex). The raft node answers on the sender; dropping it means "no answer".
pub type ReadIndexRequest = oneshot::Sender<u64>;

/// The map plus the way to change it. Cheap to clone: clones share everything.
#[derive(Clone)]
pub struct KvStore {
    /// *proposeC*: serialized pairs for the raft node.
    propose_tx: mpsc::Sender<Vec<u8>>,
    /// *readIndexC*: ReadIndex requests for linearizable reads (None: not wired, as in tests
    /// that only need the Go original's behaviour).
    read_index_tx: Option<mpsc::Sender<ReadIndexRequest>>,
    /// A std lock, not tokio's: it is never held across an `.await`, and reads are short.
    map: Arc<RwLock<HashMap<String, Bytes>>>,
    /// Raft index of the last applied commit; linearizable reads wait for it.
    applied: Arc<watch::Sender<u64>>,
    /// Clients waiting for their write to apply, by request id.
    waiters: Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>,
    /// The next request id; starts at random so ids differ across nodes and restarts.
    next_req: Arc<AtomicU64>,
}

impl KvStore {
    /// An empty store that proposes into `propose_tx`. The raft node fills it through
    /// [`KvStore::read_commits`], starting with its snapshot if it has one.
    pub fn new(propose_tx: mpsc::Sender<Vec<u8>>) -> KvStore {
        // Random per process, so that two nodes' waiter ids never meet (a waiter is woken by
        // whichever entry carries its id).
        let seed = crate::raft_node::random_u64() | 1;
        KvStore {
            propose_tx,
            read_index_tx: None,
            map: Arc::default(),
            applied: Arc::new(watch::channel(0).0),
            waiters: Arc::default(),
            next_req: Arc::new(AtomicU64::new(seed)),
        }
    }

    /// Enables linearizable reads through the raft node's ReadIndex channel.
    pub fn with_read_index(mut self, read_index_tx: mpsc::Sender<ReadIndexRequest>) -> KvStore {
        self.read_index_tx = Some(read_index_tx);
        self
    }

    /// Raft index of the last applied commit.
    pub fn applied_index(&self) -> u64 {
        *self.applied.borrow()
    }

    /// The committed value of `key`, if any.
    pub fn lookup(&self, key: &str) -> Option<Bytes> {
        self.read().get(key).cloned()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Proposes `key = val` to the cluster. Returns once the raft node has taken the proposal
    /// (it waits while the node's queue is full); the write is applied when it commits.
    pub async fn propose(&self, key: &str, val: &[u8]) -> Result<(), Stopped> {
        self.propose_tx
            .send(encode(key, val, 0))
            .await
            .map_err(|_| Stopped)
    }

    /// Proposes `key = val` and returns once it is committed and applied here, so the write is
    /// durable on a quorum and visible to every later linearizable read.
    ///
    /// # Errors
    ///
    /// [`LinearizableError::Timeout`] if that did not happen within `timeout` (no quorum, or
    /// raft dropped the proposal): the write may or may not take effect later.
    pub async fn propose_and_wait(
        &self,
        key: &str,
        val: &[u8],
        timeout: Duration,
    ) -> Result<(), LinearizableError> {
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock_waiters().insert(req, tx);
        let outcome = tokio::time::timeout(timeout, async {
            self.propose_tx
                .send(encode(key, val, req))
                .await
                .map_err(|_| Stopped)?;
            rx.await.map_err(|_| Stopped)
        })
        .await;
        match outcome {
            Ok(r) => Ok(r?),
            Err(_) => {
                self.lock_waiters().remove(&req);
                Err(LinearizableError::Timeout(timeout))
            }
        }
    }

    /// Reads `key` after a quorum confirmed this node's view is current: the raft node obtains
    /// the commit index through ReadIndex, and the read waits until that index is applied here.
    /// Works on followers too.
    pub async fn linearizable_lookup(
        &self,
        key: &str,
        timeout: Duration,
    ) -> Result<Option<Bytes>, LinearizableError> {
        let Some(read_index_tx) = &self.read_index_tx else {
            return Err(Stopped.into());
        };
        let mut applied = self.applied.subscribe();
        tokio::time::timeout(timeout, async {
            let (tx, rx) = oneshot::channel();
            read_index_tx.send(tx).await.map_err(|_| Stopped)?;
            let index = rx.await.map_err(|_| Stopped)?;
            applied
                .wait_for(|&a| a >= index)
                .await
                .map_err(|_| Stopped)?;
            Ok::<_, LinearizableError>(())
        })
        .await
        .map_err(|_| LinearizableError::Timeout(timeout))??;
        Ok(self.lookup(key))
    }

    /// Applies commits until the raft node closes *commitC* (Go: `readCommits`).
    ///
    /// # Errors
    ///
    /// A committed entry or snapshot that does not decode stops the store: skipping it would
    /// silently diverge from the other replicas.
    pub async fn read_commits(self, mut commit_rx: mpsc::Receiver<Commit>) -> Result<(), KvError> {
        while let Some(commit) = commit_rx.recv().await {
            match commit {
                Commit::Snapshot { data, index } => {
                    self.recover_from_snapshot(&data)?;
                    self.applied.send_replace(index);
                    tracing::info!(keys = self.len(), index, "loaded a snapshot");
                }
                Commit::Entries {
                    data,
                    index,
                    apply_done,
                } => {
                    self.apply(&data)?;
                    self.applied.send_replace(index);
                    // The raft node may not be waiting; that's fine.
                    let _ = apply_done.send(());
                }
            }
        }
        Ok(())
    }

    fn apply(&self, batch: &[Bytes]) -> Result<(), KvError> {
        // Decode first, then take the write lock once for the whole batch.
        let mut pairs = Vec::with_capacity(batch.len());
        let mut waited = Vec::new();
        for (position, data) in batch.iter().enumerate() {
            let kv: Kv<'_> = bincode::deserialize(data)
                .map_err(|source| KvError::BadEntry { position, source })?;
            if kv.req != 0 {
                waited.push(kv.req);
            }
            // The value keeps pointing into the entry's buffer: no copy.
            pairs.push((kv.key.to_owned(), data.slice_ref(kv.val)));
        }
        crate::metrics::ENTRIES_APPLIED.inc_by(pairs.len() as u64);
        {
            let mut map = self.write();
            for (k, v) in pairs {
                map.insert(k, v);
            }
        }
        // Wake the writers after the map changed, so their next read sees their write.
        if !waited.is_empty() {
            let mut waiters = self.lock_waiters();
            for req in waited {
                if let Some(w) = waiters.remove(&req) {
                    let _ = w.send(());
                }
            }
        }
        Ok(())
    }

    /// The whole map, serialized for a raft snapshot (Go: `getSnapshot`, JSON there); see
    /// [`KvStore::write_snapshot`].
    pub fn get_snapshot(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_snapshot(&mut out);
        out
    }

    /// [`KvStore::get_snapshot`], appended to `out`: the raft node's [`GetSnapshot`].
    ///
    /// Runs on the snapshot writer thread every `snapshot_count` entries, holding the read
    /// lock (GETs go on), and serializes straight from the map: no intermediate map of
    /// borrowed pairs, which cost a hash per key.
    ///
    /// [`GetSnapshot`]: crate::raft_node::GetSnapshot
    pub fn write_snapshot(&self, out: &mut Vec<u8>) {
        let map = self.read();
        bincode::serialize_into(out, &SnapshotRef(&map))
            .expect("invariant: serializing strings and bytes into memory cannot fail");
    }

    /// Replaces the map with a snapshot's (Go: `recoverFromSnapshot`).
    pub fn recover_from_snapshot(&self, data: &[u8]) -> Result<(), KvError> {
        let snap: SnapshotOwned = bincode::deserialize(data).map_err(KvError::BadSnapshot)?;
        *self.write() = snap.0;
        Ok(())
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, Bytes>> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts).
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, Bytes>> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_waiters(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<()>>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The map as a snapshot: a bincode map of key to byte string. Same bytes as serializing a
/// `HashMap<String, serde_bytes::ByteBuf>`, which is how [`SnapshotOwned`] reads it back.
struct SnapshotRef<'a>(&'a HashMap<String, Bytes>);

impl Serialize for SnapshotRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            m.serialize_entry(k, serde_bytes::Bytes::new(v))?;
        }
        m.end()
    }
}

/// A snapshot read back: decoded straight into the store's map type. (Decoding into a
/// `HashMap<String, ByteBuf>` and converting would build the map twice, a second hash and
/// insert per key, which is most of a restart with a million keys.)
struct SnapshotOwned(HashMap<String, Bytes>);

impl<'de> Deserialize<'de> for SnapshotOwned {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = SnapshotOwned;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of keys to byte strings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<SnapshotOwned, A::Error> {
                // Capped: the length comes from the file.
                let mut map = HashMap::with_capacity(access.size_hint().unwrap_or(0).min(1 << 20));
                while let Some((k, v)) = access.next_entry::<String, serde_bytes::ByteBuf>()? {
                    map.insert(k, Bytes::from(v.into_vec()));
                }
                Ok(SnapshotOwned(map))
            }
        }
        d.deserialize_map(Entries)
    }
}

/// Whether `data` is a proposal [`encode`] wrote: the raft port refuses entries the store could
/// not apply (see `raft_node::guard`).
///
/// # Errors
///
/// Why it is not.
pub fn check_proposal(data: &[u8]) -> Result<(), String> {
    bincode::deserialize::<Kv<'_>>(data)
        .map(|_| ())
        .map_err(|e| format!("not a key-value proposal: {e}"))
}

/// Whether `data` is a snapshot [`KvStore::write_snapshot`] wrote, read in place (no map is
/// built): the raft port refuses a snapshot the store could not load.
///
/// # Errors
///
/// Why it is not.
pub fn check_snapshot(data: &[u8]) -> Result<(), String> {
    struct Pairs;
    impl<'de> serde::de::Visitor<'de> for Pairs {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of keys to byte strings")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut access: A) -> Result<(), A::Error> {
            while access.next_entry::<&str, &[u8]>()?.is_some() {}
            Ok(())
        }
    }
    struct Check;
    impl<'de> Deserialize<'de> for Check {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Check, D::Error> {
            d.deserialize_map(Pairs).map(|()| Check)
        }
    }
    bincode::deserialize::<Check>(data)
        .map(|_| ())
        .map_err(|e| format!("not a key-value snapshot: {e}"))
}

/// The bytes of one proposal; `req` is the id of a waiting client, or 0.
pub fn encode(key: &str, val: &[u8], req: u64) -> Vec<u8> {
    bincode::serialize(&Kv { key, val, req })
        .expect("invariant: serializing a string and bytes into memory cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commits_are_applied_in_order_and_acknowledged() {
        let (tx, _rx) = mpsc::channel(1);
        let kvs = KvStore::new(tx);
        let (commit_tx, commit_rx) = mpsc::channel(4);
        let task = tokio::spawn(kvs.clone().read_commits(commit_rx));
        let (done_tx, done_rx) = oneshot::channel();
        let data = vec![
            Bytes::from(encode("/a", b"1", 0)),
            Bytes::from(encode("/a", b"2", 0)),
            Bytes::from(encode("/b", b"", 0)),
        ];
        commit_tx
            .send(Commit::Entries {
                data,
                index: 7,
                apply_done: done_tx,
            })
            .await
            .expect("send");
        done_rx.await.expect("applied");
        assert_eq!(kvs.lookup("/a").as_deref(), Some(&b"2"[..]));
        assert_eq!(kvs.lookup("/b").as_deref(), Some(&b""[..]));
        assert_eq!(kvs.lookup("/c"), None);
        assert_eq!(kvs.applied_index(), 7);
        drop(commit_tx);
        task.await.expect("join").expect("clean end");
    }

    /// A linearizable write returns once applied; one never applied times out.
    #[tokio::test]
    async fn propose_and_wait_returns_when_applied() {
        let (ptx, mut prx) = mpsc::channel(4);
        let kvs = KvStore::new(ptx);
        let (commit_tx, commit_rx) = mpsc::channel(4);
        tokio::spawn(kvs.clone().read_commits(commit_rx));
        // A fake raft node: commits whatever is proposed.
        tokio::spawn(async move {
            while let Some(p) = prx.recv().await {
                let (apply_done, _) = oneshot::channel();
                let data = vec![Bytes::from(p)];
                if commit_tx
                    .send(Commit::Entries {
                        data,
                        index: 1,
                        apply_done,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        kvs.propose_and_wait("/k", b"v", Duration::from_secs(10))
            .await
            .expect("applied");
        assert_eq!(kvs.lookup("/k").as_deref(), Some(&b"v"[..]));

        let (ptx, _prx) = mpsc::channel(4);
        let lonely = KvStore::new(ptx);
        let err = lonely
            .propose_and_wait("/k", b"v", Duration::from_millis(50))
            .await
            .expect_err("nobody commits");
        assert!(matches!(err, LinearizableError::Timeout(_)));
        assert!(lonely.lock_waiters().is_empty(), "the waiter is cleaned up");
    }

    /// The snapshot bytes are those of a bincode `HashMap<String, ByteBuf>` (the disk format).
    #[test]
    fn snapshot_bytes_are_a_bincode_map_of_byte_strings() {
        let (tx, _rx) = mpsc::channel(1);
        let kvs = KvStore::new(tx);
        kvs.write()
            .insert("/k".into(), Bytes::from_static(&[1, 2, 3]));
        let mut want: HashMap<String, serde_bytes::ByteBuf> = HashMap::new();
        want.insert("/k".into(), serde_bytes::ByteBuf::from(vec![1, 2, 3]));
        assert_eq!(kvs.get_snapshot(), bincode::serialize(&want).expect("ser"));
    }

    /// Port of Go's Test_kvstore_snapshot: the snapshot round-trips the map.
    #[test]
    fn snapshot_round_trip() {
        let (tx, _rx) = mpsc::channel(1);
        let kvs = KvStore::new(tx);
        kvs.write()
            .insert("/foo".into(), Bytes::from_static(b"bar"));
        kvs.write()
            .insert("/bin".into(), Bytes::from_static(&[0, 255, 10]));
        let snap = kvs.get_snapshot();
        let (tx, _rx) = mpsc::channel(1);
        let other = KvStore::new(tx);
        other.recover_from_snapshot(&snap).expect("recover");
        assert_eq!(*other.read(), *kvs.read());
    }

    /// The raft port's checks accept exactly what the store writes and can read back.
    #[test]
    fn payload_checks_accept_the_store_s_own_bytes_only() {
        let p = encode("/k", b"v", 7);
        assert_eq!(check_proposal(&p), Ok(()));
        assert!(check_proposal(&p[..p.len() - 1]).is_err(), "cut short");
        assert!(check_proposal(b"\xff\xff").is_err());

        let (tx, _rx) = mpsc::channel(1);
        let kvs = KvStore::new(tx);
        assert_eq!(check_snapshot(&kvs.get_snapshot()), Ok(()), "an empty map");
        kvs.write().insert("/a".into(), Bytes::from_static(b"1"));
        kvs.write()
            .insert("/b".into(), Bytes::from_static(&[0, 255]));
        let snap = kvs.get_snapshot();
        assert_eq!(check_snapshot(&snap), Ok(()));
        assert!(
            check_snapshot(&snap[..snap.len() - 1]).is_err(),
            "cut short"
        );
        assert!(check_snapshot(b"").is_err(), "empty");
        // A key that is not UTF-8 could not be loaded either.
        let mut bad = snap.clone();
        let at = bad.iter().position(|&b| b == b'/').expect("a key");
        bad[at] = 0xff;
        assert!(check_snapshot(&bad).is_err(), "a key that is not UTF-8");
        assert!(
            KvStore::new(mpsc::channel(1).0)
                .recover_from_snapshot(&bad)
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_garbage_entry_stops_the_store_with_an_error() {
        let (tx, _rx) = mpsc::channel(1);
        let kvs = KvStore::new(tx);
        let (commit_tx, commit_rx) = mpsc::channel(1);
        let (done_tx, _done_rx) = oneshot::channel();
        commit_tx
            .send(Commit::Entries {
                data: vec![Bytes::from_static(&[0xff; 3])],
                index: 1,
                apply_done: done_tx,
            })
            .await
            .expect("send");
        drop(commit_tx);
        let err = kvs.read_commits(commit_rx).await.expect_err("must fail");
        assert!(
            matches!(err, KvError::BadEntry { position: 0, .. }),
            "{err}"
        );
    }
}
