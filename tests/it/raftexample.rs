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
        Box::new(move || snap_src.get_snapshot()),
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
