//! Dynamic membership: adding and removing nodes (Go: `TestAddNewNode`, and the README flow).

use std::time::Duration;

use raft::eraftpb::{ConfChange, ConfChangeType};
use raftexample::raft_node::Commit;

use crate::support::cluster::{Cluster, bind_peers, start_node, test_config};
use crate::support::process::{NodeProcess, ProcessCluster};
use crate::support::{free_port, http, poll_until, put_range, wait_all_keys, wait_for_value};

const T: Duration = Duration::from_secs(60);

/// `POST <url>` with the new node's raft URL until it is accepted (204); the cluster may still
/// be electing its first leader.
async fn add_node(url: &str, raft_url: &str) {
    poll_until(T, &format!("POST {url} accepted"), || async {
        http("POST", url, raft_url.as_bytes())
            .await
            .ok()
            .filter(|r| r.status == 204)
    })
    .await;
}

/// Port of Go's TestAddNewNode: node 4 is added by a conf change and started with join; a
/// proposal made on node 4 commits on node 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_new_node() {
    let mut clus = Cluster::new(3).await;
    let (mut l, urls) = bind_peers(1).await;
    let mut cc = ConfChange::default();
    cc.set_change_type(ConfChangeType::AddNode);
    cc.node_id = 4;
    cc.context = urls[0].clone().into_bytes().into();
    clus.nodes[0]
        .conf_change_tx
        .as_ref()
        .expect("open")
        .send(cc)
        .await
        .expect("conf change");

    let mut peers = clus.peers.clone();
    peers.push(urls[0].clone());
    let mut cfg = test_config(4, &peers, clus.dir.path());
    cfg.join = true;
    let node4 = start_node(cfg, l.remove(0), std::sync::Arc::new(|_| {})).await;
    node4
        .propose_tx
        .as_ref()
        .expect("open")
        .send(b"foo".to_vec())
        .await
        .expect("propose on node 4");

    let crx = clus.nodes[0].commit_rx.as_mut().expect("commits");
    tokio::time::timeout(T, async {
        loop {
            match crx.recv().await.expect("node 1 publishes") {
                Commit::Entries {
                    data, apply_done, ..
                } => {
                    let _ = apply_done.send(());
                    if data.iter().any(|d| &d[..] == b"foo") {
                        return;
                    }
                }
                Commit::Snapshot { .. } => {}
            }
        }
    })
    .await
    .expect("node 4's proposal commits on node 1");
    clus.nodes.push(node4);
    clus.close_no_errors().await;
}

/// The Go README flow: add node 4 over HTTP and start it with --join; writes via 4 and via 1
/// are all readable from 4; DELETE node 3 and it exits by itself while 1, 2, 4 keep serving.
/// Then the joined node restarts without --join and still serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_add_and_remove_flow() {
    let mut c = ProcessCluster::start(3, &[]);
    put_range(&c.node(1).url(""), "before", 0..50, 4).await;

    let raft4 = format!("http://127.0.0.1:{}", free_port());
    let kv4 = free_port();
    add_node(&c.nodes[0].url("/4"), &raft4).await;
    let cluster4 = [c.peers.clone(), vec![raft4.clone()]].concat().join(",");
    let dir4 = c.dir.path().join("n4");
    std::fs::create_dir_all(&dir4).expect("dir");
    let mut n4 = NodeProcess::spawn(4, &cluster4, kv4, &dir4, &["--join"]);

    put_range(&n4.url(""), "via4", 0..50, 4).await;
    put_range(&c.node(1).url(""), "via1", 0..50, 4).await;
    for prefix in ["before", "via4", "via1"] {
        wait_all_keys(&n4.url(""), prefix, 0..50, T).await;
    }

    let r = http("DELETE", &c.node(1).url("/3"), b"")
        .await
        .expect("DELETE");
    assert_eq!(r.status, 204);
    let exit = c
        .node(3)
        .wait_exit(T)
        .expect("node 3 exits by itself after its removal");
    assert!(exit.success(), "node 3 exit status {exit}");
    assert!(c.node(3).logs().contains("removed from the cluster"));

    put_range(&c.node(2).url(""), "after-remove", 0..50, 4).await;
    for base in [c.node(1).url(""), c.node(2).url(""), n4.url("")] {
        wait_all_keys(&base, "after-remove", 0..50, T).await;
    }
    // The removed id cannot come back.
    let r = http("POST", &c.node(1).url("/3"), b"http://127.0.0.1:1")
        .await
        .expect("POST");
    assert_eq!(r.status, 409, "{:?}", String::from_utf8_lossy(&r.body));

    // A joined node restarted without --join comes back with the right membership.
    n4.kill9();
    let mut n4 = NodeProcess::spawn(4, &cluster4, kv4, &dir4, &[]);
    put_range(&c.node(1).url(""), "after-restart", 0..20, 2).await;
    wait_all_keys(&n4.url(""), "after-restart", 0..20, T).await;
    wait_for_value(&n4.url("/via4-0"), b"val-0", T).await;
    n4.kill9();
}

/// A 3-node cluster grows to 5 and shrinks back to 3 while a writer keeps writing; every
/// acknowledged write is on every remaining node at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_to_five_and_shrink_to_three_under_writes() {
    let mut c = ProcessCluster::start(3, &[]);
    let base1 = c.node(1).url("");
    put_range(&base1, "w", 0..1, 1).await;
    let writer = {
        let base = base1.clone();
        tokio::spawn(async move {
            for chunk in 0..20u64 {
                put_range(&base, "w", chunk * 50..(chunk + 1) * 50, 4).await;
            }
        })
    };
    let mut extra = Vec::new();
    let mut cluster = c.peers.clone();
    for id in 4..=5u64 {
        let raft = format!("http://127.0.0.1:{}", free_port());
        let kv = free_port();
        cluster.push(raft.clone());
        add_node(&c.nodes[0].url(&format!("/{id}")), &raft).await;
        let dir = c.dir.path().join(format!("n{id}"));
        std::fs::create_dir_all(&dir).expect("dir");
        let n = NodeProcess::spawn(id, &cluster.join(","), kv, &dir, &["--join"]);
        // Wait until the new member serves the first key: it has caught up.
        wait_for_value(&n.url("/w-0"), b"val-0", T).await;
        extra.push(n);
    }
    for id in [2u64, 3] {
        // One conf change at a time: raft ignores a second one while the first is pending.
        let r = http("DELETE", &c.node(1).url(&format!("/{id}")), b"")
            .await
            .expect("DELETE");
        assert_eq!(r.status, 204);
        c.node(id).wait_exit(T).expect("removed node exits");
    }
    writer.await.expect("writer");
    for base in [c.node(1).url(""), extra[0].url(""), extra[1].url("")] {
        wait_all_keys(&base, "w", 0..1000, T).await;
    }
}

/// A node that joins through a snapshot learns the membership changes committed after that
/// snapshot: node 3 is removed after the last snapshot, node 4 joins and gets that snapshot
/// plus the log after it, and must list 3 as removed, as every other node does. (With Go's
/// stamping of the leader's current configuration on the snapshot, node 4 replayed the removal
/// against a configuration that no longer had 3, skipped it, and kept 3 as a member.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joining_by_snapshot_learns_the_removals_after_it() {
    let mut c = ProcessCluster::start(
        3,
        &["--snapshot-count", "20", "--snapshot-catchup-entries", "2"],
    );
    put_range(&c.node(1).url(""), "k", 0..100, 4).await;
    wait_all_keys(&c.node(2).url(""), "k", 0..100, T).await;

    let r = http("DELETE", &c.node(1).url("/3"), b"")
        .await
        .expect("DELETE");
    assert_eq!(r.status, 204);
    c.node(3)
        .wait_exit(T)
        .expect("node 3 exits by itself after its removal");
    let raft4 = format!("http://127.0.0.1:{}", free_port());
    let kv4 = free_port();
    add_node(&c.nodes[0].url("/4"), &raft4).await;
    let cluster4 = [c.peers.clone(), vec![raft4.clone()]].concat().join(",");
    let dir4 = c.dir.path().join("n4");
    std::fs::create_dir_all(&dir4).expect("dir");
    let mut n4 = NodeProcess::spawn(4, &cluster4, kv4, &dir4, &["--join"]);
    // A write after the removal and the addition: once node 4 has it, it has applied both.
    put_range(&c.node(1).url(""), "after", 0..1, 1).await;
    wait_all_keys(&n4.url(""), "after", 0..1, T).await;
    wait_all_keys(&n4.url(""), "k", 0..100, T).await;

    let removed_on = |raft_url: String| async move {
        let r = http("GET", &format!("{raft_url}/status"), b"").await.ok()?;
        let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
        let removed: Vec<u64> = serde_json::from_value(v["removed"].clone()).ok()?;
        let peers: Vec<u64> = v["peers"]
            .as_array()?
            .iter()
            .filter_map(|p| p["id"].as_u64())
            .collect();
        Some((removed, peers))
    };
    let (removed1, _) = poll_until(T, "node 1's status", || removed_on(c.peers[0].clone())).await;
    assert_eq!(removed1, vec![3], "node 1 lists 3 as removed");
    assert!(
        crate::support::metric(&raft4, "raftexample_snapshots_received_total").await >= 1.0,
        "node 4 caught up through a snapshot"
    );
    let (removed4, peers4) = poll_until(T, "node 4's status", || removed_on(raft4.clone())).await;
    assert_eq!(
        removed4,
        vec![3],
        "node 4 lists 3 as removed, as node 1 does"
    );
    assert!(!peers4.contains(&3), "node 4 keeps no peer 3: {peers4:?}");
    n4.kill9();
}
