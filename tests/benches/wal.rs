//! WAL figures: append throughput with one fsync per batch, and replay speed.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use raft::eraftpb::{Entry, HardState};
use raftexample::wal::{Wal, WalSnapshot};

const ENTRY_BYTES: usize = 128;
const REPLAY_ENTRIES: u64 = 1_000_000;

fn entries(first: u64, n: u64) -> Vec<Entry> {
    let data = Bytes::from(vec![0x5a; ENTRY_BYTES]);
    (first..first + n)
        .map(|index| Entry {
            term: 1,
            index,
            data: data.clone(),
            ..Default::default()
        })
        .collect()
}

fn hs(commit: u64) -> HardState {
    HardState {
        term: 1,
        vote: 1,
        commit,
        ..Default::default()
    }
}

/// Raw rate of `write(size bytes) + fdatasync`, appending into a preallocated file as the WAL
/// does: what the disk allows for a save of that size, whatever the encoding.
fn fsync_rate(dir: &Path, size: usize) -> f64 {
    let path = dir.join("fsync-probe");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .expect("create probe file");
    raftexample::fileutil::preallocate(&f, 64 * 1000 * 1000).expect("preallocate probe file");
    let buf = vec![1u8; size];
    let start = Instant::now();
    let mut written = 0;
    let mut n = 0u32;
    while start.elapsed() < Duration::from_secs(1) && written + size < 64 * 1000 * 1000 {
        f.write_all(&buf).expect("write probe");
        f.sync_data().expect("fdatasync probe");
        written += size;
        n += 1;
    }
    let rate = f64::from(n) / start.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(path);
    rate
}

/// Bytes of frames in a WAL directory (the tail's preallocated zeros excluded).
fn data_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).expect("list").flatten() {
        let b = std::fs::read(e.path()).expect("read segment");
        total += b
            .iter()
            .rposition(|&x| x != 0)
            .map_or(0, |p| (p as u64 + 8) & !7);
    }
    total
}

fn append(dir: &Path, batch: u64) {
    let wal_dir = dir.join(format!("append-{batch}"));
    let mut w = Wal::create(&wal_dir, b"").expect("create WAL");
    // Prepare all batches up front: the clock measures the WAL, not the test data.
    let budget = Duration::from_secs(3);
    let batches: Vec<Vec<Entry>> = (0..(400_000 / batch).clamp(50, 20_000))
        .map(|b| entries(1 + b * batch, batch))
        .collect();
    let before = data_bytes(&wal_dir);
    let start = Instant::now();
    let mut saved = 0u64;
    for ents in &batches {
        w.save(&hs(saved), ents).expect("save");
        saved += batch;
        if start.elapsed() > budget {
            break;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    w.close().expect("close");
    let saves = saved / batch;
    let per_save = (data_bytes(&wal_dir) - before) / saves;
    let raw = fsync_rate(dir, per_save as usize);
    let eps = saved as f64 / secs;
    let mbs = eps * ENTRY_BYTES as f64 / 1e6;
    let sps = saves as f64 / secs;
    println!(
        "append  batch {batch:>3}: {eps:>9.0} entries/s {mbs:>7.2} MB/s of entry data  \
         {sps:>5.0} saves/s of {per_save} B; raw write+fdatasync of {per_save} B: {raw:>5.0}/s \
         -> WAL at {:.0}% of the disk bound",
        100.0 * sps / raw
    );
    let _ = std::fs::remove_dir_all(wal_dir);
}

fn replay(dir: &Path) {
    let wal_dir = dir.join("replay");
    let mut w = Wal::create(&wal_dir, b"").expect("create WAL");
    let batch = 10_000;
    let mut i = 1;
    while i <= REPLAY_ENTRIES {
        w.save(&hs(i - 1), &entries(i, batch)).expect("save");
        i += batch;
    }
    w.close().expect("close");
    let on_disk: u64 = std::fs::read_dir(&wal_dir)
        .expect("list")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    let start = Instant::now();
    let mut w = Wal::open(&wal_dir, &WalSnapshot::default()).expect("open");
    let (_, _, ents) = w.read_all().expect("read_all");
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(ents.len() as u64, REPLAY_ENTRIES);
    w.close().expect("close");
    println!(
        "replay  {REPLAY_ENTRIES} entries of {ENTRY_BYTES} B ({:.0} MB in segments): {secs:.3} s \
         = {:.0} entries/s{}",
        on_disk as f64 / 1e6,
        REPLAY_ENTRIES as f64 / secs,
        if secs < 2.0 {
            ""
        } else {
            "  ** over the 2 s target **"
        }
    );
    let _ = std::fs::remove_dir_all(wal_dir);
}

pub fn run(base: Option<&Path>) {
    let tmp = match base {
        Some(b) => tempfile::tempdir_in(b),
        None => tempfile::tempdir(),
    }
    .expect("temporary directory");
    let dir = tmp.path();
    println!("WAL benchmarks in {}", dir.display());
    for batch in [1, 16, 256] {
        append(dir, batch);
    }
    replay(dir);
}
