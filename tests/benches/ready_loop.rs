//! The Ready loop on its own: one in-process node (no HTTP), proposals of 128-byte values
//! from a few concurrent proposers, timed from the first proposal until the last one is
//! published on commitC. Each Ready writes its batch to the WAL with one fsync, so this shows
//! how batching turns the disk's fsync rate into entries per second.

use std::time::{Duration, Instant};

use raftexample::raft_node::{self, Commit, Config, NodeInputs};
use tokio::sync::mpsc;

const ENTRIES: usize = 50_000;

pub fn run() {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return eprintln!("ready_loop: no runtime: {e}"),
    };
    rt.block_on(async {
        for proposers in [1usize, 16, 256] {
            match once(proposers).await {
                Ok(elapsed) => println!(
                    "ready loop: {ENTRIES} x 128 B, {proposers:>3} proposers in flight: {:>8.0} entries/s ({:.2} s)",
                    ENTRIES as f64 / elapsed.as_secs_f64(),
                    elapsed.as_secs_f64()
                ),
                Err(e) => eprintln!("ready loop bench failed: {e}"),
            }
        }
    });
}

async fn once(proposers: usize) -> Result<Duration, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let url = format!(
        "http://{}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let mut cfg = Config::new(1, vec![url]);
    cfg.data_dir = dir.path().to_path_buf();
    cfg.tick_interval = Duration::from_millis(10);
    cfg.snapshot_count = u64::MAX / 2;
    let (ptx, propose_rx) = mpsc::channel(4096);
    let (_ctx, conf_change_rx) = mpsc::channel(1);
    let (_rtx, read_index_rx) = mpsc::channel(1);
    let mut node = raft_node::start(
        cfg,
        listener,
        NodeInputs {
            propose_rx,
            conf_change_rx,
            read_index_rx,
        },
        std::sync::Arc::new(|_| {}),
    )
    .await
    .map_err(|e| e.to_string())?;

    // `proposers` tasks, each with one proposal in flight at a time: it proposes the next once
    // its previous one was published (as a client waiting for a linearizable PUT would).
    let (done_tx, _) = tokio::sync::broadcast::channel::<usize>(ENTRIES);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..proposers {
        let ptx = ptx.clone();
        let mut done = done_tx.subscribe();
        tasks.push(tokio::spawn(async move {
            let mut i = p;
            while i < ENTRIES {
                let mut data = vec![0x5au8; 128];
                data[..8].copy_from_slice(&(i as u64).to_be_bytes());
                if ptx.send(data).await.is_err() {
                    return;
                }
                // Wait until entry i is published before proposing the next one.
                loop {
                    match done.recv().await {
                        Ok(n) if n == i => break,
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => return,
                    }
                }
                i += proposers;
            }
        }));
    }
    let mut seen = 0;
    while seen < ENTRIES {
        match node.commit_rx.recv().await {
            Some(Commit::Entries {
                data, apply_done, ..
            }) => {
                for d in &data {
                    let n = u64::from_be_bytes(d[..8].try_into().map_err(|_| "short entry")?);
                    let _ = done_tx.send(n as usize);
                    seen += 1;
                }
                let _ = apply_done.send(());
            }
            Some(Commit::Snapshot { .. }) => {}
            None => return Err("the node stopped".into()),
        }
    }
    let elapsed = started.elapsed();
    for t in tasks {
        let _ = t.await;
    }
    node.stop();
    let _ = node.error_rx.await;
    Ok(elapsed)
}
