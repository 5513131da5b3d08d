//! Snapshots and log compaction (Go: `TestSnapshot`, plus the catch-up and restart flows).

use std::time::Duration;

use raftexample::raft_node::Commit;
use tokio::sync::mpsc;

use crate::support::cluster::{Cluster, bind_peers, start_node, test_config};
use crate::support::process::{NodeProcess, ProcessCluster};
use crate::support::{free_port, init_tracing, metric, poll_until, put_range, wait_all_keys};

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
            Box::new(move |_| {
                let _ = tx.send(());
            })
        } else {
            Box::new(|_| {})
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
