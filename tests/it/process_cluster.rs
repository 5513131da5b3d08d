//! The README flows, on real processes: replication, fault tolerance, restarts.

use std::time::Duration;

use crate::support::process::ProcessCluster;
use crate::support::{http, poll_until, wait_for_value};

const T: Duration = Duration::from_secs(30);

/// PUTs `key = val` on node `via` (retrying while the cluster elects its first leader).
async fn put(c: &mut ProcessCluster, via: u64, key: &str, val: &str) {
    let url = c.node(via).url(key);
    poll_until(T, &format!("PUT {url}"), || async {
        matches!(http("PUT", &url, val.as_bytes()).await, Ok(r) if r.status == 204).then_some(())
    })
    .await;
}

async fn wait_everywhere(c: &mut ProcessCluster, key: &str, val: &str) {
    for i in 0..c.nodes.len() {
        let url = c.nodes[i].url(key);
        if c.nodes[i].is_running() {
            wait_for_value(&url, val.as_bytes(), T).await;
        }
    }
}

/// A PUT on any node is readable from every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_every_put() {
    let mut c = ProcessCluster::start(3, &[]);
    for via in 1..=3 {
        let key = format!("/key-via-{via}");
        put(&mut c, via, &key, &format!("value-{via}")).await;
    }
    for via in 1..=3 {
        wait_everywhere(&mut c, &format!("/key-via-{via}"), &format!("value-{via}")).await;
    }
    // The rest of the API, on a live node.
    let r = http("GET", &c.node(2).url("/absent"), b"")
        .await
        .expect("GET");
    assert_eq!(r.status, 404);
    let r = http("PATCH", &c.node(2).url("/k"), b"")
        .await
        .expect("PATCH");
    assert_eq!(r.status, 405);
}

/// The Go README's fault-tolerance flow: stop node 2, write via 1, read via 3, restart 2 and
/// read the new value from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_tolerance_as_in_the_readme() {
    let mut c = ProcessCluster::start(3, &[]);
    put(&mut c, 1, "/my-key", "foo").await;
    wait_everywhere(&mut c, "/my-key", "foo").await;

    c.node(2).kill9();
    put(&mut c, 1, "/my-key", "bar").await;
    wait_for_value(&c.node(3).url("/my-key"), b"bar", T).await;

    c.node(2).start();
    wait_for_value(&c.node(2).url("/my-key"), b"bar", T).await;
}

/// Every committed key survives stopping all nodes, by SIGTERM and by kill -9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_restart_keeps_every_key() {
    let mut c = ProcessCluster::start(3, &[]);
    for i in 0..20 {
        put(&mut c, i % 3 + 1, &format!("/k{i}"), &format!("v{i}")).await;
    }
    for i in 0..20 {
        wait_everywhere(&mut c, &format!("/k{i}"), &format!("v{i}")).await;
    }

    for id in 1..=3 {
        let status = c.node(id).terminate(T);
        assert!(status.success(), "node {id} exit after SIGTERM: {status}");
    }
    for id in 1..=3 {
        c.node(id).start();
    }
    for i in 0..20 {
        wait_everywhere(&mut c, &format!("/k{i}"), &format!("v{i}")).await;
    }
    put(&mut c, 2, "/after-sigterm", "yes").await;
    wait_everywhere(&mut c, "/after-sigterm", "yes").await;

    for id in 1..=3 {
        c.node(id).kill9();
    }
    for id in 1..=3 {
        c.node(id).start();
    }
    for i in 0..20 {
        wait_everywhere(&mut c, &format!("/k{i}"), &format!("v{i}")).await;
    }
    wait_everywhere(&mut c, "/after-sigterm", "yes").await;
}

/// Messages that raft-rs would `fatal!` on, posted to the raft port by anyone who knows the
/// cluster id, are dropped: the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_raft_messages_do_not_stop_a_node() {
    use protobuf::Message as _;
    use raft::eraftpb::{Message, MessageType};
    let mut c = ProcessCluster::start(3, &[]);
    put(&mut c, 1, "/before", "1").await;
    wait_everywhere(&mut c, "/before", "1").await;
    let headers = [
        ("X-Etcd-Cluster-ID", "1000"),
        ("X-Server-Version", "3.4.23"),
        ("X-Min-Cluster-Version", "3.0.0"),
        ("X-Server-From", "2"),
        ("Content-Type", "application/protobuf"),
    ];
    let forged = |t: MessageType, to: u64, term: u64, commit: u64| {
        let mut m = Message::default();
        m.set_msg_type(t);
        m.to = to;
        m.from = 2;
        m.term = term;
        m.commit = commit;
        m.write_to_bytes().expect("encode")
    };
    for body in [
        forged(MessageType::MsgHeartbeat, 1, 1 << 40, u64::MAX),
        forged(MessageType::MsgAppend, 7, 1 << 40, 5),
        forged(MessageType::MsgPropose, 1, 0, 0),
    ] {
        let url = format!("{}/raft", c.peers[0]);
        let r = crate::support::http_with_headers("POST", &url, &body, &headers)
            .await
            .expect("answered");
        assert!(r.status < 500, "{r:?}");
    }
    put(&mut c, 1, "/after", "2").await;
    wait_everywhere(&mut c, "/after", "2").await;
    assert!(c.node(1).is_running(), "node 1 still runs");
}
