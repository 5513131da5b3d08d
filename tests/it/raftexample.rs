//! Ports of etcd's `raftexample_test.go`, on in-process clusters.

use std::time::Duration;

use raftexample::kvstore::KvStore;
use raftexample::raft_node::{Commit, NodeInputs};
use raftexample::{httpapi, raft_node};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::support::cluster::{Cluster, bind_peers, test_config};
use crate::support::{http, http_with_headers, init_tracing, wait_for_value};

/// Three nodes feed every commit they see back as a new proposal, 100 rounds each. A node
/// blocked on proposing must not stop raft from making progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propose_on_commit() {
    let mut clus = Cluster::new(3).await;
    let (done_tx, mut done_rx) = mpsc::channel::<()>(3);
    for n in &mut clus.nodes {
        let ptx = n.propose_tx.clone().expect("open proposer");
        let mut crx = n.commit_rx.take().expect("commit channel");
        let done = done_tx.clone();
        tokio::spawn(async move {
            // One message of feedback per node starts the game.
            let _ = ptx.send(b"foo".to_vec()).await;
            let mut rounds = 0;
            while rounds < 100 {
                match crx.recv().await {
                    // Batches without data (no-ops, conf changes) do not count, as in Go
                    // where they are not published.
                    Some(Commit::Entries {
                        data, apply_done, ..
                    }) if !data.is_empty() => {
                        let _ = apply_done.send(());
                        rounds += 1;
                        if ptx.send(data[0].to_vec()).await.is_err() {
                            return;
                        }
                    }
                    Some(_) => {}
                    None => return,
                }
            }
            drop(ptx);
            let _ = done.send(()).await;
            // Keep acknowledging commits from the other nodes so raft goes on.
            while let Some(c) = crx.recv().await {
                if let Commit::Entries { apply_done, .. } = c {
                    let _ = apply_done.send(());
                }
            }
        });
    }
    drop(done_tx);
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(60), done_rx.recv())
            .await
            .expect("every node sees 100 rounds of commits within 60 s")
            .expect("a node's feedback task ended early");
    }
    clus.close_no_errors().await;
}

/// Closing the proposer right after start, before any replay, stops the node cleanly.
#[tokio::test]
async fn close_proposer_before_replay() {
    let clus = Cluster::new(1).await;
    clus.close_no_errors().await;
}

/// Closing the proposer while proposals are in flight stops the node cleanly, after the
/// first one committed.
#[tokio::test]
async fn close_proposer_inflight() {
    let mut clus = Cluster::new(1).await;
    // A clone: the cluster's own proposer stays open until `close`, as in Go.
    let ptx = clus.nodes[0].propose_tx.clone().expect("proposer");
    let sender = tokio::spawn(async move {
        ptx.send(b"foo".to_vec()).await.expect("propose foo");
        ptx.send(b"bar".to_vec()).await.expect("propose bar");
    });
    let crx = clus.nodes[0].commit_rx.as_mut().expect("commits");
    let first = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match crx.recv().await {
                Some(Commit::Entries { data, .. }) if data.is_empty() => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("a commit within 20 s");
    match first {
        Some(Commit::Entries {
            data, apply_done, ..
        }) => {
            assert_eq!(&data[0][..], b"foo");
            let _ = apply_done.send(());
        }
        other => panic!("expected foo to commit first, got {other:?}"),
    }
    sender.await.expect("sender");
    clus.close_no_errors().await;
}

/// A PUT through the HTTP API is readable with a GET once committed.
#[tokio::test]
async fn put_and_get_key_value() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut listeners, peers) = bind_peers(1).await;
    let (ptx, propose_rx) = mpsc::channel(16);
    let (ctx, conf_change_rx) = mpsc::channel(16);
    let (rtx, read_index_rx) = mpsc::channel(16);
    let kvs = KvStore::new(ptx).with_read_index(rtx);
    let snap_src = kvs.clone();
    let node = raft_node::start(
        test_config(1, &peers, dir.path()),
        listeners.remove(0),
        NodeInputs {
            propose_rx,
            conf_change_rx,
            read_index_rx,
        },
        std::sync::Arc::new(move |out| snap_src.write_snapshot(out)),
    )
    .await
    .expect("node starts");
    tokio::spawn(kvs.clone().read_commits(node.commit_rx));
    let kv_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!(
        "http://{}/test-key",
        kv_listener.local_addr().expect("addr")
    );
    tokio::spawn(httpapi::serve(
        kv_listener,
        httpapi::router(kvs, ctx, Duration::from_secs(5), Some(node.status.clone())),
        raftexample::http_server::Limits::default(),
        std::future::pending(),
    ));

    let put = http("PUT", &url, b"test-value").await.expect("PUT");
    assert_eq!(put.status, 204);
    wait_for_value(&url, b"test-value", Duration::from_secs(20)).await;

    // Beyond the Go original: linearizable writes and reads on the same node.
    let lin = [("X-Linearizable", "true")];
    let put = http_with_headers("PUT", &url, b"v2", &lin)
        .await
        .expect("PUT");
    assert_eq!(put.status, 204, "{put:?}");
    let get = http_with_headers("GET", &url, b"", &lin)
        .await
        .expect("GET");
    assert_eq!((get.status, &get.body[..]), (200, &b"v2"[..]));
}

/// Followers hear of a new commit index right away, not at the next heartbeat: the node
/// skips raft-rs's empty commit broadcasts and sends the commit itself when no append
/// carried it (`send_pending_commits`). With a 250 ms tick (one heartbeat per tick) each write
/// would otherwise reach the last follower's store some 150 ms after it committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_apply_without_waiting_for_a_heartbeat() {
    init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let (listeners, peers) = bind_peers(3).await;
    let mut nodes = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let mut cfg = test_config(i as u64 + 1, &peers, dir.path());
        cfg.tick_interval = Duration::from_millis(250);
        nodes.push(crate::support::cluster::start_node(cfg, l, std::sync::Arc::new(|_| {})).await);
    }
    // Every node reports each payload it applies, with the node's index.
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(usize, Vec<u8>)>();
    for (i, n) in nodes.iter_mut().enumerate() {
        let mut crx = n.commit_rx.take().expect("commit channel");
        let seen = seen_tx.clone();
        tokio::spawn(async move {
            while let Some(c) = crx.recv().await {
                if let Commit::Entries {
                    data, apply_done, ..
                } = c
                {
                    for d in data {
                        let _ = seen.send((i, d.to_vec()));
                    }
                    let _ = apply_done.send(());
                }
            }
        });
    }
    let ptx = nodes[0].propose_tx.clone().expect("proposer");
    // Returns how long until `payload` was applied on all three nodes.
    let mut round = async |payload: Vec<u8>, limit: Duration| {
        let started = tokio::time::Instant::now();
        ptx.send(payload.clone()).await.expect("propose");
        let mut on = [false; 3];
        while !on.iter().all(|x| *x) {
            let (i, d) = tokio::time::timeout_at(started + limit, seen_rx.recv())
                .await
                .expect("the write applies on every node in time")
                .expect("appliers run");
            if d == payload {
                on[i] = true;
            }
        }
        started.elapsed()
    };
    // The first write waits for an election (10-20 ticks of 250 ms).
    round(b"warm-up".to_vec(), Duration::from_secs(30)).await;
    let mut took = Vec::new();
    for k in 0..9 {
        took.push(round(format!("w{k}").into_bytes(), Duration::from_secs(10)).await);
    }
    took.sort();
    let median = took[took.len() / 2];
    assert!(
        median < Duration::from_millis(100),
        "a write took {median:?} (median of {took:?}) to apply on every node; followers seem \
         to learn the commit from heartbeats only"
    );
    for n in &mut nodes {
        n.propose_tx = None;
    }
    drop(ptx);
    for n in &mut nodes {
        if let Some(rx) = n.error_rx.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), rx).await;
        }
    }
}
