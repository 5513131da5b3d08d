//! The replicated key-value map (Go: `kvstore.go`).
//!
//! Writes never touch the map directly: [`KvStore::propose`] serializes the pair into
//! *proposeC*, and the map changes only when [`KvStore::read_commits`] sees the entry come
//! back committed. Reads are served from the local map, so a follower may answer with a value
//! a moment old, exactly as the Go original.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::raft_node::Commit;

/// One proposal: the key (the full request URI) and its value (Go: `kv{Key, Val}`, gob).
#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Kv<'a> {
    key: &'a str,
    #[serde(with = "serde_bytes")]
    val: &'a [u8],
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

/// The map plus the way to change it. Cheap to clone: clones share the map and the channel.
#[derive(Clone)]
pub struct KvStore {
    /// *proposeC*: serialized pairs for the raft node.
    propose_tx: mpsc::Sender<Vec<u8>>,
    /// A std lock, not tokio's: it is never held across an `.await`, and reads are short.
    map: Arc<RwLock<HashMap<String, Bytes>>>,
}

impl KvStore {
    /// An empty store that proposes into `propose_tx`. The raft node fills it through
    /// [`KvStore::read_commits`], starting with its snapshot if it has one.
    pub fn new(propose_tx: mpsc::Sender<Vec<u8>>) -> KvStore {
        KvStore {
            propose_tx,
            map: Arc::default(),
        }
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
            .send(encode(key, val))
            .await
            .map_err(|_| Stopped)
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
                Commit::Snapshot(data) => {
                    self.recover_from_snapshot(&data)?;
                    tracing::info!(keys = self.len(), "loaded a snapshot");
                }
                Commit::Entries { data, apply_done } => {
                    self.apply(&data)?;
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
        for (position, data) in batch.iter().enumerate() {
            let kv: Kv<'_> = bincode::deserialize(data)
                .map_err(|source| KvError::BadEntry { position, source })?;
            // The value keeps pointing into the entry's buffer: no copy.
            pairs.push((kv.key.to_owned(), data.slice_ref(kv.val)));
        }
        let mut map = self.write();
        for (k, v) in pairs {
            map.insert(k, v);
        }
        Ok(())
    }

    /// The whole map, serialized for a raft snapshot (Go: `getSnapshot`, JSON there).
    pub fn get_snapshot(&self) -> Vec<u8> {
        let map = self.read();
        let view: HashMap<&str, &[u8]> = map.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
        bincode::serialize(&SnapshotRef(view))
            .expect("invariant: serializing strings and bytes into memory cannot fail")
    }

    /// Replaces the map with a snapshot's (Go: `recoverFromSnapshot`).
    pub fn recover_from_snapshot(&self, data: &[u8]) -> Result<(), KvError> {
        let snap: SnapshotOwned = bincode::deserialize(data).map_err(KvError::BadSnapshot)?;
        let map = snap
            .0
            .into_iter()
            .map(|(k, v)| (k, Bytes::from(v.into_vec())))
            .collect();
        *self.write() = map;
        Ok(())
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, Bytes>> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts).
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, Bytes>> {
        self.map.write().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Serialize)]
struct SnapshotRef<'a>(#[serde(with = "bytes_map")] HashMap<&'a str, &'a [u8]>);

#[derive(Deserialize)]
struct SnapshotOwned(HashMap<String, serde_bytes::ByteBuf>);

/// Serializes map values as byte strings (not sequences of numbers).
mod bytes_map {
    use serde::ser::SerializeMap;
    use std::collections::HashMap;

    pub fn serialize<S: serde::Serializer>(
        map: &HashMap<&str, &[u8]>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(map.len()))?;
        for (k, v) in map {
            m.serialize_entry(k, serde_bytes::Bytes::new(v))?;
        }
        m.end()
    }
}

/// The bytes of one proposal.
pub fn encode(key: &str, val: &[u8]) -> Vec<u8> {
    bincode::serialize(&Kv { key, val })
        .expect("invariant: serializing a string and bytes into memory cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    #[tokio::test]
    async fn commits_are_applied_in_order_and_acknowledged() {
        let (tx, _rx) = mpsc::channel(1);
        let kvs = KvStore::new(tx);
        let (commit_tx, commit_rx) = mpsc::channel(4);
        let task = tokio::spawn(kvs.clone().read_commits(commit_rx));
        let (done_tx, done_rx) = oneshot::channel();
        let data = vec![
            Bytes::from(encode("/a", b"1")),
            Bytes::from(encode("/a", b"2")),
            Bytes::from(encode("/b", b"")),
        ];
        commit_tx
            .send(Commit::Entries {
                data,
                apply_done: done_tx,
            })
            .await
            .expect("send");
        done_rx.await.expect("applied");
        assert_eq!(kvs.lookup("/a").as_deref(), Some(&b"2"[..]));
        assert_eq!(kvs.lookup("/b").as_deref(), Some(&b""[..]));
        assert_eq!(kvs.lookup("/c"), None);
        drop(commit_tx);
        task.await.expect("join").expect("clean end");
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

    #[tokio::test]
    async fn a_garbage_entry_stops_the_store_with_an_error() {
        let (tx, _rx) = mpsc::channel(1);
        let kvs = KvStore::new(tx);
        let (commit_tx, commit_rx) = mpsc::channel(1);
        let (done_tx, _done_rx) = oneshot::channel();
        commit_tx
            .send(Commit::Entries {
                data: vec![Bytes::from_static(&[0xff; 3])],
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
