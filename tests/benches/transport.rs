//! Throughput of one msgapp stream between two transports on loopback: how many
//! `MsgAppend`s per second, and how many payload MB/s, one peer can push to another.
//!
//! The sender keeps the stream's queue from overflowing (it waits while more than
//! half of it is queued), so every message is delivered and the figure is what the
//! stream sustains, not how fast messages can be dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use raft::SnapshotStatus;
use raft::eraftpb::{Entry, Message, MessageType};
use raftexample::rafthttp::{ProcessError, Raft, Transport, TransportConfig, serve};

/// Counts what arrives.
#[derive(Default)]
struct Counter {
    msgs: AtomicU64,
    entries: AtomicU64,
    unreachable: AtomicU64,
}

impl Raft for Counter {
    fn process(&self, m: Message) -> BoxFuture<'static, Result<(), ProcessError>> {
        self.entries
            .fetch_add(m.entries.len() as u64, Ordering::Relaxed);
        self.msgs.fetch_add(1, Ordering::Relaxed);
        Box::pin(async { Ok(()) })
    }
    fn is_id_removed(&self, _: u64) -> bool {
        false
    }
    fn report_unreachable(&self, _: u64) {
        self.unreachable.fetch_add(1, Ordering::Relaxed);
    }
    fn report_snapshot(&self, _: u64, _: SnapshotStatus) {}
}

struct Case {
    name: &'static str,
    entries_per_msg: usize,
    entry_bytes: usize,
    msgs: u64,
}

pub fn run() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let (a, b, b_count, a_count) = pair().await;
        println!("transport: one msgapp stream, two transports on 127.0.0.1, 2 tokio workers");
        println!(
            "{:<28} {:>10} {:>12} {:>12} {:>10}",
            "case", "msgs", "msgs/s", "entries/s", "MB/s"
        );
        let cases = [
            Case {
                name: "1 x 128 B entry / msg",
                entries_per_msg: 1,
                entry_bytes: 128,
                msgs: 400_000,
            },
            Case {
                name: "64 x 128 B entries / msg",
                entries_per_msg: 64,
                entry_bytes: 128,
                msgs: 20_000,
            },
            Case {
                name: "1 x 4 KiB entry / msg",
                entries_per_msg: 1,
                entry_bytes: 4096,
                msgs: 100_000,
            },
            Case {
                name: "16 x 64 KiB entries / msg",
                entries_per_msg: 16,
                entry_bytes: 65536,
                msgs: 1_000,
            },
        ];
        let mut index = 0u64;
        for c in cases {
            let before = (
                b_count.msgs.load(Ordering::Relaxed),
                b_count.entries.load(Ordering::Relaxed),
            );
            let start = Instant::now();
            let data = Bytes::from(vec![b'x'; c.entry_bytes]);
            let mut sent = 0u64;
            while sent < c.msgs {
                // Keep at most half the stream queue (4096) filled.
                while a.peer_status(2).map_or(0, |s| s.queued) > 2048 {
                    tokio::task::yield_now().await;
                }
                let batch: Vec<Message> = (0..256.min(c.msgs - sent))
                    .map(|_| {
                        let m = append(index, c.entries_per_msg, &data);
                        index += c.entries_per_msg as u64;
                        m
                    })
                    .collect();
                sent += batch.len() as u64;
                a.send(batch);
            }
            let want = before.0 + c.msgs;
            while b_count.msgs.load(Ordering::Relaxed) < want {
                assert!(start.elapsed() < Duration::from_secs(120), "bench stalled");
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            let secs = start.elapsed().as_secs_f64();
            let entries = b_count.entries.load(Ordering::Relaxed) - before.1;
            let mb = (entries * c.entry_bytes as u64) as f64 / 1e6;
            println!(
                "{:<28} {:>10} {:>12.0} {:>12.0} {:>10.1}",
                c.name,
                c.msgs,
                c.msgs as f64 / secs,
                entries as f64 / secs,
                mb / secs
            );
        }
        let dropped = a_count.unreachable.load(Ordering::Relaxed);
        assert_eq!(dropped, 0, "the bench must not drop messages");
        a.stop();
        b.stop();
    });
}

/// A steady-state append: it continues where the previous one ended, so the
/// msgappv2 encoder sends it in the compact AppEntries form.
fn append(index: u64, n: usize, data: &Bytes) -> Message {
    let mut m = Message::new();
    (
        m.msg_type, m.from, m.to, m.term, m.log_term, m.index, m.commit,
    ) = (MessageType::MsgAppend, 1, 2, 1, 1, index, index);
    for i in 0..n as u64 {
        let mut e = Entry::new();
        (e.term, e.index, e.data) = (1, index + 1 + i, data.clone());
        m.entries.push(e);
    }
    m
}

async fn pair() -> (Transport, Transport, Arc<Counter>, Arc<Counter>) {
    let (ra, rb) = (Arc::new(Counter::default()), Arc::new(Counter::default()));
    let a = Transport::new(
        TransportConfig {
            id: 1,
            cluster_id: 0x1000,
        },
        ra.clone(),
    );
    let b = Transport::new(
        TransportConfig {
            id: 2,
            cluster_id: 0x1000,
        },
        rb.clone(),
    );
    let mut urls = Vec::new();
    for t in [&a, &b] {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        urls.push(format!("http://{}", l.local_addr().expect("local addr")));
        tokio::spawn(serve(
            l,
            t.handler(),
            raftexample::http_server::Limits::default(),
            std::future::pending(),
        ));
    }
    a.add_peer(2, &urls[1..]);
    b.add_peer(1, &urls[..1]);
    let start = Instant::now();
    while !a.peer_status(2).is_some_and(|s| s.msgapp_stream) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "stream did not attach"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (a, b, rb, ra)
}
