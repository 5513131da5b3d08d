//! Crash recovery at the process level: a child process appends to a WAL and reports every
//! save that returned; the parent kills it with SIGKILL at an arbitrary point and checks that
//! the reopened log holds every acknowledged entry.
//!
//! The child is this same test binary, re-executed with `WAL_WRITER_DIR` set so that the
//! ignored test `writer_child` runs the write loop.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use raft::eraftpb::{Entry, HardState};
use raftexample::wal::{Wal, WalOptions, WalSnapshot};

const WRITER_ENV: &str = "WAL_WRITER_DIR";
const SEGMENT_SIZE: u64 = 64 * 1024;

fn opts() -> WalOptions {
    WalOptions {
        segment_size: SEGMENT_SIZE,
    }
}

/// The data of entry `index` (its size varies so that frames cross sectors and segments).
fn payload(index: u64) -> Vec<u8> {
    let len = (index * 7919 % 1500) as usize + 1;
    let mut d = format!("entry-{index}:").into_bytes();
    d.resize(len.max(d.len()), (index % 251) as u8);
    d
}

/// The child's write loop: open (or create) the WAL, then save batches forever, printing
/// `ack <last index>` after each save returns.
#[test]
#[ignore = "child process of kill_9_loses_no_acknowledged_entry"]
fn writer_child() {
    let Some(dir) = std::env::var_os(WRITER_ENV) else {
        eprintln!("{WRITER_ENV} not set: nothing to do");
        return;
    };
    let dir = Path::new(&dir);
    let (mut w, mut last) = if Wal::exist(dir).unwrap() {
        let mut w = Wal::open_with(dir, &WalSnapshot::default(), opts()).unwrap();
        let (_, _, ents) = w.read_all().unwrap();
        let last = ents.last().map_or(0, |e| e.index);
        (w, last)
    } else {
        (Wal::create_with(dir, b"", opts()).unwrap(), 0)
    };
    loop {
        let n = last % 5 + 1;
        let ents: Vec<Entry> = (last + 1..=last + n)
            .map(|i| Entry {
                term: 1,
                index: i,
                data: Bytes::from(payload(i)),
                ..Default::default()
            })
            .collect();
        last += n;
        let hs = HardState {
            term: 1,
            vote: 1,
            commit: last,
            ..Default::default()
        };
        w.save(&hs, &ents).unwrap();
        println!("ack {last}");
    }
}

/// Runs one child until it has acknowledged `acks` saves, kills it, and returns the highest
/// acknowledged index.
fn run_and_kill(dir: &Path, acks: usize) -> u64 {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "wal_recovery::writer_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(WRITER_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(i) = line.strip_prefix("ack ")
                && tx.send(i.parse::<u64>().unwrap()).is_err()
            {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = 0;
    let mut last = 0;
    while seen < acks {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(i) => {
                last = i;
                seen += 1;
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("writer child stopped acknowledging after {seen} saves: {e}");
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap();
    // Acknowledgements printed before the kill count too.
    while let Ok(i) = rx.try_recv() {
        last = i;
    }
    last
}

#[test]
fn kill_9_loses_no_acknowledged_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let mut acked = 0;
    // Kill at different points; each round reopens the log the previous one left.
    for (round, acks) in [37, 150, 91].into_iter().enumerate() {
        acked = run_and_kill(&dir, acks);
        let mut w = Wal::open_with(&dir, &WalSnapshot::default(), opts()).unwrap();
        let (_, hs, ents) = w
            .read_all()
            .unwrap_or_else(|e| panic!("round {round}: reopening after kill -9 failed: {e}"));
        w.close().unwrap();
        assert!(
            ents.len() as u64 >= acked,
            "round {round}: {acked} acknowledged, {} replayed",
            ents.len()
        );
        for (i, e) in ents.iter().enumerate() {
            assert_eq!(e.index, i as u64 + 1, "round {round}");
            assert_eq!(
                e.data.as_ref(),
                payload(e.index).as_slice(),
                "round {round}"
            );
        }
        assert!(hs.commit >= acked, "round {round}: hard state {hs:?}");
    }
    let segments = std::fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".wal"))
        })
        .count();
    assert!(
        segments > 1,
        "the loop should have cut segments ({acked} entries)"
    );
}
