//! Snapshots and log compaction (Go: `TestSnapshot`, plus the catch-up and restart flows).

use std::time::Duration;

use raftexample::raft_node::Commit;
use tokio::sync::mpsc;

use crate::support::cluster::{Cluster, bind_peers, start_node, test_config};
use crate::support::process::{NodeProcess, ProcessCluster};
use crate::support::{free_port, http, init_tracing, metric, poll_until, put_range, wait_all_keys};

/// Port of Go's TestSnapshot: with a snapshot count of 4, committing one proposal makes node 1
/// due for a snapshot, but it is not taken before the store signals that it applied the batch,
/// and it is taken right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_waits_for_apply_done() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let (listeners, peers) = bind_peers(3).await;
    let (snapped_tx, mut snapped_rx) = mpsc::unbounded_channel();
    let mut nodes = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let mut cfg = test_config(i as u64 + 1, &peers, dir.path());
        cfg.snapshot_count = 4;
        cfg.snapshot_catchup_entries = 4;
        let tx = snapped_tx.clone();
        let get_snapshot: raftexample::raft_node::GetSnapshot = if i == 0 {
            std::sync::Arc::new(move |_| {
                let _ = tx.send(());
            })
        } else {
            std::sync::Arc::new(|_| {})
        };
        nodes.push(start_node(cfg, l, get_snapshot).await);
    }
    let mut clus = Cluster { dir, peers, nodes };
    // Nodes 2 and 3: acknowledge everything.
    for n in &mut clus.nodes[1..] {
        let mut rx = n.commit_rx.take().expect("commits");
        tokio::spawn(async move {
            while let Some(c) = rx.recv().await {
                if let Commit::Entries { apply_done, .. } = c {
                    let _ = apply_done.send(());
                }
            }
        });
    }
    let ptx = clus.nodes[0].propose_tx.clone().expect("proposer");
    ptx.send(b"foo".to_vec()).await.expect("propose");
    let crx = clus.nodes[0].commit_rx.as_mut().expect("commits");
    let held = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match crx.recv().await.expect("node 1 publishes commits") {
                Commit::Entries {
                    data, apply_done, ..
                } if data.iter().any(|d| &d[..] == b"foo") => return apply_done,
                Commit::Entries { apply_done, .. } => {
                    let _ = apply_done.send(());
                }
                Commit::Snapshot { .. } => {}
            }
        }
    })
    .await
    .expect("foo commits on node 1 within 30 s");

    // Due, but the store has not applied the batch yet: no snapshot.
    let early = tokio::time::timeout(Duration::from_millis(300), snapped_rx.recv()).await;
    assert!(early.is_err(), "snapshot triggered before applying done");

    held.send(()).expect("node 1 waits for apply_done");
    tokio::time::timeout(Duration::from_secs(10), snapped_rx.recv())
        .await
        .expect("snapshot taken after apply_done")
        .expect("channel open");
    drop(ptx);
    clus.close_no_errors().await;
}

/// The store is serialized on the snapshot thread. Meanwhile node 1's Ready loop goes on (a new
/// proposal on node 1 commits on the other nodes), but no commit reaches node 1's store, which
/// must stay at the snapshot's index; once serialized, the held commits arrive, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_wait_while_the_store_is_serialized_but_the_loop_goes_on() {
    init_tracing();
    let t = Duration::from_secs(30);
    let dir = tempfile::tempdir().expect("tempdir");
    let (listeners, peers) = bind_peers(3).await;
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    // The snapshot thread of node 1 blocks until the test releases it (or fails: then the
    // sender is dropped and `recv` returns).
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let mut blocking = Some((started_tx, std::sync::Mutex::new(release_rx)));
    let mut nodes = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let mut cfg = test_config(i as u64 + 1, &peers, dir.path());
        cfg.snapshot_count = 4;
        let get_snapshot: raftexample::raft_node::GetSnapshot = match blocking.take() {
            Some((started, release)) if i == 0 => std::sync::Arc::new(move |_| {
                let _ = started.send(());
                if let Ok(rx) = release.lock() {
                    let _ = rx.recv();
                }
            }),
            other => {
                blocking = other;
                std::sync::Arc::new(|_| {})
            }
        };
        nodes.push(start_node(cfg, l, get_snapshot).await);
    }
    let mut clus = Cluster { dir, peers, nodes };
    let mut seen_rx = apply_on_nodes_2_and_3(&mut clus);
    let ptx = clus.nodes[0].propose_tx.clone().expect("proposer");
    let crx = clus.nodes[0].commit_rx.as_mut().expect("commits");
    let mut applied_on_1 = Vec::new();
    let apply = |c: Commit, applied: &mut Vec<Vec<u8>>| {
        if let Commit::Entries {
            data, apply_done, ..
        } = c
        {
            applied.extend(data.iter().map(|d| d.to_vec()));
            let _ = apply_done.send(());
        }
    };

    // Enough proposals to be due for a snapshot; apply on node 1 until the thread starts.
    for i in 0..6 {
        ptx.send(format!("v{i}").into_bytes())
            .await
            .expect("propose");
    }
    tokio::time::timeout(t, async {
        loop {
            tokio::select! {
                c = crx.recv() => apply(c.expect("node 1 publishes commits"), &mut applied_on_1),
                _ = started_rx.recv() => return,
            }
        }
    })
    .await
    .expect("node 1 starts a snapshot within 30 s");

    // The loop still proposes, and the cluster commits, while the store is being serialized.
    ptx.send(b"late".to_vec()).await.expect("propose");
    tokio::time::timeout(t, async {
        while seen_rx.recv().await.expect("nodes 2 and 3 apply") != b"late"[..] {}
    })
    .await
    .expect("a proposal made on node 1 during the serialization commits within 30 s");
    // ... but node 1's store, being serialized, gets nothing, even once node 1's loop knows
    // that "late" is committed (its `/status` is published after the turn's commits are).
    node_1_learns_the_commit_of_2_and_3(&clus.peers, t).await;
    match crx.try_recv() {
        Err(mpsc::error::TryRecvError::Empty) => {}
        other => panic!("a commit reached node 1's store during its serialization: {other:?}"),
    }

    // Serialized: what was held arrives, in order.
    release_tx.send(()).expect("the snapshot thread waits");
    tokio::time::timeout(t, async {
        while !applied_on_1.iter().any(|d| d == b"late") {
            apply(crx.recv().await.expect("commits"), &mut applied_on_1);
        }
    })
    .await
    .expect("the held commits reach node 1 within 30 s of the release");
    let want: Vec<Vec<u8>> = (0..6)
        .map(|i| format!("v{i}").into_bytes())
        .chain([b"late".to_vec()])
        .collect();
    assert_eq!(
        applied_on_1, want,
        "node 1 applied everything once, in order"
    );
    drop(ptx);
    clus.close_no_errors().await;
}

/// A snapshot that comes due while another is in flight is taken later, perhaps in a Ready
/// with no commits of its own, when the commits held back during the first one were only just
/// released to the store. It must still wait until the store has applied them, or its data is
/// an older store labelled with a newer index (etcd#12714). Every snapshot file node 1 writes
/// must hold the store as of exactly its index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_due_later_waits_for_the_commits_released_before_it() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    init_tracing();
    let t = Duration::from_secs(30);
    let dir = tempfile::tempdir().expect("tempdir");
    let (listeners, peers) = bind_peers(3).await;
    // Node 1's store: the index it has applied. Its snapshot source writes that index as the
    // store's bytes and reports it; the first snapshot blocks until the test releases it.
    let store_at = Arc::new(AtomicU64::new(0));
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<u64>();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = std::sync::Mutex::new(Some(release_rx));
    let source: raftexample::raft_node::GetSnapshot = {
        let store_at = Arc::clone(&store_at);
        Arc::new(move |out| {
            let at = store_at.load(Ordering::SeqCst);
            out.extend_from_slice(&at.to_le_bytes());
            let _ = started_tx.send(at);
            let first = release_rx.lock().ok().and_then(|mut r| r.take());
            if let Some(rx) = first {
                let _ = rx.recv();
            }
        })
    };
    let mut nodes = Vec::new();
    let mut snap_dir = None;
    for (i, l) in listeners.into_iter().enumerate() {
        let mut cfg = test_config(i as u64 + 1, &peers, dir.path());
        cfg.snapshot_count = 4;
        cfg.snapshot_catchup_entries = 4;
        let get_snapshot = if i == 0 {
            snap_dir = Some(cfg.snap_dir());
            Arc::clone(&source)
        } else {
            Arc::new(|_: &mut Vec<u8>| {}) as raftexample::raft_node::GetSnapshot
        };
        nodes.push(start_node(cfg, l, get_snapshot).await);
    }
    drop(source);
    let snap_dir = snap_dir.expect("node 1 configured");
    let mut clus = Cluster { dir, peers, nodes };
    let mut seen_rx = apply_on_nodes_2_and_3(&mut clus);
    let ptx = clus.nodes[0].propose_tx.clone().expect("proposer");
    let mut crx = clus.nodes[0].commit_rx.take().expect("commits");
    let apply = |c: Commit| match c {
        Commit::Entries {
            index, apply_done, ..
        } => {
            store_at.store(index, Ordering::SeqCst);
            let _ = apply_done.send(());
        }
        Commit::Snapshot { index, .. } => store_at.store(index, Ordering::SeqCst),
    };

    // Due for a snapshot: node 1 applies until the (blocked) first one starts.
    for i in 0..6 {
        ptx.send(format!("v{i}").into_bytes())
            .await
            .expect("propose");
    }
    let first_at = tokio::time::timeout(t, async {
        loop {
            tokio::select! {
                c = crx.recv() => apply(c.expect("node 1 publishes commits")),
                at = started_rx.recv() => return at.expect("node 1's snapshot source"),
            }
        }
    })
    .await
    .expect("node 1 starts a snapshot within 30 s");

    // Meanwhile enough commits for the next snapshot, held back from node 1's store.
    for i in 0..8 {
        ptx.send(format!("w{i}").into_bytes())
            .await
            .expect("propose");
    }
    tokio::time::timeout(t, async {
        while seen_rx.recv().await.expect("nodes 2 and 3 apply") != b"w7"[..] {}
    })
    .await
    .expect("the proposals made during the first snapshot commit within 30 s");
    node_1_learns_the_commit_of_2_and_3(&clus.peers, t).await;

    // Release the first snapshot; the held commits go to node 1's store, which is slow to
    // apply them. The second snapshot is due from the next Ready on (heartbeats make one
    // every tick): it must not start before the store has caught up.
    release_tx.send(()).expect("the snapshot thread waits");
    let early = tokio::time::timeout(Duration::from_secs(1), started_rx.recv()).await;
    if let Ok(Some(at)) = early {
        panic!(
            "the second snapshot started with the store at {at}, before it applied the released commits"
        );
    }
    // Now the store applies: the second snapshot follows.
    tokio::time::timeout(t, async {
        loop {
            tokio::select! {
                c = crx.recv() => apply(c.expect("node 1 publishes commits")),
                at = started_rx.recv() => return at.expect("node 1's snapshot source"),
            }
        }
    })
    .await
    .expect("the second snapshot starts within 30 s of the store catching up");
    let snap = poll_until(t, "node 1's second snapshot file", || {
        let dir = snap_dir.clone();
        async move {
            raftexample::snap::Snapshotter::new(dir)
                .load()
                .ok()
                .filter(|s| s.get_metadata().index > first_at)
        }
    })
    .await;
    let data = &snap.data[snap.data.len() - 8..];
    let store_index = u64::from_le_bytes(data.try_into().expect("8 bytes"));
    assert_eq!(
        store_index,
        snap.get_metadata().index,
        "the snapshot holds the store as of its index"
    );
    // Keep node 1's store applying while the cluster closes.
    tokio::spawn(async move {
        while let Some(c) = crx.recv().await {
            if let Commit::Entries { apply_done, .. } = c {
                let _ = apply_done.send(());
            }
        }
    });
    drop(ptx);
    clus.close_no_errors().await;
}

/// A follower that was down while the log moved past a compaction catches up through a
/// snapshot; then every key survives a kill -9 of the whole cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_follower_catches_up_by_snapshot_and_all_survive_kill9() {
    const N: u64 = 25_000;
    let t = Duration::from_secs(90);
    let mut c = ProcessCluster::start(3, &[]);
    let base = |c: &mut ProcessCluster, id| c.node(id).url("");
    let b1 = base(&mut c, 1);
    put_range(&b1, "warmup", 0..1, 1).await;
    wait_all_keys(&base(&mut c, 3), "warmup", 0..1, t).await;

    c.node(3).kill9();
    put_range(&b1, "k", 0..N, 32).await;
    wait_all_keys(&b1, "k", 0..N, t).await;
    let snaps = |dir: &std::path::Path| {
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".snap"))
                    .count()
            })
            .unwrap_or(0)
    };
    let snap_dir = c.dir.path().join("n1").join("raftexample-1-snap");
    assert!(
        snaps(&snap_dir) > 0,
        "node 1 took a snapshot after {N} entries"
    );

    c.node(3).start();
    wait_all_keys(&base(&mut c, 3), "k", 0..N, t).await;
    let raft3 = c.peers[2].clone();
    assert!(
        metric(&raft3, "raftexample_snapshots_received_total").await >= 1.0,
        "node 3 needed a snapshot: the log was compacted past it"
    );

    for id in 1..=3 {
        c.node(id).kill9();
    }
    for id in 1..=3 {
        c.node(id).start();
    }
    for id in 1..=3 {
        wait_all_keys(&base(&mut c, id), "k", 0..N, t).await;
    }
}

/// A corrupt newest snapshot file is set aside (`.broken`) and the node restarts from the
/// previous snapshot plus the WAL after it, losing no key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_newest_snapshot_falls_back_to_the_previous_one() {
    let t = Duration::from_secs(30);
    let dir = tempfile::tempdir().expect("tempdir");
    let raft = format!("http://127.0.0.1:{}", free_port());
    let mut n = NodeProcess::spawn(
        1,
        &raft,
        free_port(),
        dir.path(),
        &["--snapshot-count", "10"],
    );
    // In rounds, each applied before the next, so that they span several snapshots.
    for r in 0..6 {
        put_range(&n.url(""), "k", r * 10..r * 10 + 10, 1).await;
        wait_all_keys(&n.url(""), "k", r * 10..r * 10 + 10, t).await;
    }
    let snap_dir = dir.path().join("raftexample-1-snap");
    let snaps = || {
        let mut v: Vec<_> = std::fs::read_dir(&snap_dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "snap"))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    poll_until(t, "two snapshots", || async {
        (snaps().len() >= 2).then_some(())
    })
    .await;
    let status = n.terminate(t);
    assert!(status.success());

    let newest = snaps().pop().expect("a snapshot");
    let mut bytes = std::fs::read(&newest).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&newest, bytes).expect("corrupt");

    n.start();
    wait_all_keys(&n.url(""), "k", 0..60, t).await;
    let mut broken = newest.into_os_string();
    broken.push(".broken");
    assert!(
        std::path::Path::new(&broken).exists(),
        "the bad file is set aside"
    );
}

/// Nodes 2 and 3 apply everything; returns what they applied, in order.
fn apply_on_nodes_2_and_3(clus: &mut Cluster) -> mpsc::UnboundedReceiver<bytes::Bytes> {
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    for n in &mut clus.nodes[1..] {
        let mut rx = n.commit_rx.take().expect("commits");
        let seen = seen_tx.clone();
        tokio::spawn(async move {
            while let Some(c) = rx.recv().await {
                if let Commit::Entries {
                    data, apply_done, ..
                } = c
                {
                    for d in data {
                        let _ = seen.send(d);
                    }
                    let _ = apply_done.send(());
                }
            }
        });
    }
    seen_rx
}

/// Waits until node 1's loop knows the commit index that node 2 or 3 reports (`/status` is
/// published after the turn's commits are).
async fn node_1_learns_the_commit_of_2_and_3(peers: &[String], t: Duration) {
    let commit_of = |raft_url: String| async move {
        let r = http("GET", &format!("{raft_url}/status"), b"").await.ok()?;
        let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
        v["commit"].as_u64()
    };
    let committed = poll_until(t, "the commit index of node 2 or 3", || async {
        commit_of(peers[1].clone())
            .await
            .max(commit_of(peers[2].clone()).await)
    })
    .await;
    poll_until(t, "node 1 to learn the commit", || async {
        commit_of(peers[0].clone())
            .await
            .filter(|c| *c >= committed)
    })
    .await;
}
