//! On-disk compatibility with etcd v3.4.23: fixtures written by etcd's own Go `wal` and `snap`
//! packages (tests/data/, see tests/data/README.md) are read exactly, and the same saves made
//! through our `Wal` produce byte-identical segment files.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use protobuf::Message;
use raft::eraftpb::{ConfChange, ConfChangeType, Entry, EntryType, HardState};
use raftexample::snap::{self, Snapshotter};
use raftexample::wal::{Wal, WalOptions, WalSnapshot, valid_snapshot_entries};

/// Segment size the Go generator set (`wal.SegmentSizeBytes = 1024`).
const FIXTURE_SEGMENT_SIZE: u64 = 1024;
const CC_URL: &[u8] = b"http://127.0.0.1:42379";

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// Copies a fixture directory: opening a WAL locks, may repair and creates preallocated files.
fn copy_fixture(name: &str, to: &Path) -> PathBuf {
    let dst = to.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(data_dir().join(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

fn entry(term: u64, index: u64, data: &[u8]) -> Entry {
    Entry {
        term,
        index,
        data: Bytes::copy_from_slice(data),
        ..Default::default()
    }
}

fn hs(term: u64, vote: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote,
        commit,
        ..Default::default()
    }
}

fn marker(index: u64, term: u64) -> WalSnapshot {
    WalSnapshot {
        index,
        term,
        conf_state: None,
    }
}

/// The ConfChange entry payload as gogo marshals `ConfChange{Type: AddNode, NodeID: 4,
/// Context: CC_URL}` (ID and Type are written although zero).
fn conf_change_bytes() -> Vec<u8> {
    let mut b = vec![0x08, 0x00, 0x10, 0x00, 0x18, 0x04, 0x22, CC_URL.len() as u8];
    b.extend_from_slice(CC_URL);
    b
}

/// The saves the Go generator made, in order (`None` = a save_snapshot).
fn fixture_saves() -> Vec<(HardState, Vec<Entry>, Option<WalSnapshot>)> {
    let mut saves = Vec::new();
    for i in 1..=30u64 {
        let e = entry(1, i, format!("put key{i} value{i}").as_bytes());
        saves.push((hs(1, 1, i - 1), vec![e], None));
    }
    saves.push((
        hs(2, 2, 27),
        vec![entry(2, 28, b"t2-28"), entry(2, 29, b"t2-29")],
        None,
    ));
    let mut cc = entry(2, 30, &conf_change_bytes());
    cc.entry_type = EntryType::EntryConfChange;
    saves.push((hs(2, 2, 29), vec![cc], None));
    saves.push((HardState::default(), vec![], Some(marker(20, 1))));
    saves.push((hs(2, 2, 30), vec![entry(2, 31, b"")], None));
    saves.push((hs(2, 2, 31), vec![], None));
    saves
}

/// What `read_all` must return from the fixture opened at no snapshot.
fn fixture_entries() -> Vec<Entry> {
    let mut ents: Vec<Entry> = (1..=27u64)
        .map(|i| entry(1, i, format!("put key{i} value{i}").as_bytes()))
        .collect();
    ents.push(entry(2, 28, b"t2-28"));
    ents.push(entry(2, 29, b"t2-29"));
    let mut cc = entry(2, 30, &conf_change_bytes());
    cc.entry_type = EntryType::EntryConfChange;
    ents.push(cc);
    ents.push(entry(2, 31, b""));
    ents
}

#[test]
fn etcd_written_wal_reads_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("etcd-wal", tmp.path());
    assert_eq!(
        valid_snapshot_entries(&dir).unwrap(),
        vec![marker(0, 0), marker(20, 1)]
    );

    let mut w = Wal::open(&dir, &marker(0, 0)).unwrap();
    let (metadata, state, ents) = w.read_all().unwrap();
    assert_eq!(metadata, b"etcd-fixture");
    assert_eq!(state, hs(2, 2, 31));
    assert_eq!(ents, fixture_entries());
    let cc = ConfChange::parse_from_bytes(&ents[29].data).unwrap();
    assert_eq!(cc.change_type, ConfChangeType::AddNode);
    assert_eq!((cc.node_id, cc.context.as_ref()), (4, CC_URL));
    w.close().unwrap();

    let mut w = Wal::open(&dir, &marker(20, 1)).unwrap();
    let (_, state, ents) = w.read_all().unwrap();
    assert_eq!(state, hs(2, 2, 31));
    assert_eq!(ents, fixture_entries()[20..].to_vec());
    // The log is appendable where etcd left it.
    w.save(&hs(2, 2, 32), &[entry(2, 32, b"from rust")])
        .unwrap();
    w.close().unwrap();
    let mut w = Wal::open(&dir, &marker(20, 1)).unwrap();
    let (_, _, ents) = w.read_all().unwrap();
    assert_eq!(ents.last().unwrap(), &entry(2, 32, b"from rust"));
}

#[test]
fn our_segments_are_byte_identical_to_etcds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("wal");
    let opts = WalOptions {
        segment_size: FIXTURE_SEGMENT_SIZE,
    };
    let mut w = Wal::create_with(&dir, b"etcd-fixture", opts).unwrap();
    for (state, ents, snap) in fixture_saves() {
        match snap {
            Some(s) => w.save_snapshot(&s).unwrap(),
            None => w.save(&state, &ents).unwrap(),
        }
    }
    w.close().unwrap();

    let list = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    let theirs = data_dir().join("etcd-wal");
    assert_eq!(list(&dir), list(&theirs));
    for name in list(&theirs) {
        let a = std::fs::read(dir.join(&name)).unwrap();
        let b = std::fs::read(theirs.join(&name)).unwrap();
        let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
        assert!(
            a == b,
            "{name}: ours {} bytes, etcd {} bytes, first difference at {first_diff:?}",
            a.len(),
            b.len()
        );
    }
}

#[test]
fn etcd_written_snapshot_reads_and_reencodes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = copy_fixture("etcd-snap", tmp.path());
    let ss = Snapshotter::new(&dir);
    let s = ss.load().unwrap();
    assert_eq!(s.data.as_ref(), br#"{"key1":"value1","key2":"value2"}"#);
    let m = s.get_metadata();
    assert_eq!((m.index, m.term), (20, 1));
    assert_eq!(m.get_conf_state().voters, vec![1, 2, 3]);
    assert_eq!(
        ss.load_newest_available(&[marker(0, 0), marker(20, 1)])
            .unwrap(),
        s
    );

    let name = snap::snap_name(1, 20);
    let theirs = std::fs::read(dir.join(&name)).unwrap();
    assert_eq!(snap::encode_snap_file(&s), theirs);
    let ours = Snapshotter::new(tmp.path().join("ours"));
    ours.save_snap(&s).unwrap();
    assert_eq!(std::fs::read(ours.dir().join(&name)).unwrap(), theirs);
}

/// CRC-32C digest of a replayed log: for each entry, index and term (u64 LE), type (u32 LE)
/// and data. The Go checker (tests/data/README.md) computes the same.
fn digest(ents: &[Entry]) -> u32 {
    let mut crc = 0;
    for e in ents {
        crc = crc32c::crc32c_append(crc, &e.index.to_le_bytes());
        crc = crc32c::crc32c_append(crc, &e.term.to_le_bytes());
        crc = crc32c::crc32c_append(crc, &(e.entry_type as u32).to_le_bytes());
        crc = crc32c::crc32c_append(crc, &e.data);
    }
    crc
}

/// Writes a WAL and a snapshot with our code for etcd's Go decoder to check (run by hand, see
/// tests/data/README.md): `WAL_INTEROP_DIR=/tmp/x cargo test --test it -- --ignored
/// --nocapture write_wal_for_etcd_check`. Prints the summary the Go checker must reproduce.
#[test]
#[ignore = "produces files for the Go checker; run by hand"]
fn write_wal_for_etcd_check() {
    let Some(out) = std::env::var_os("WAL_INTEROP_DIR") else {
        eprintln!("WAL_INTEROP_DIR not set: nothing to do");
        return;
    };
    let out = PathBuf::from(out);
    let _ = std::fs::remove_dir_all(&out);
    let dir = out.join("rust-wal");
    let opts = WalOptions {
        segment_size: 256 * 1024,
    };
    let mut w = Wal::create_with(&dir, b"rust-writer", opts).unwrap();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut index, mut term, mut commit) = (0u64, 1u64, 0u64);
    for round in 0..400u64 {
        if round % 97 == 96 {
            term += 1; // leader change: overwrite the last 3 uncommitted entries
            index -= 3;
        }
        let n = 1 + next() % 8;
        let mut ents = Vec::new();
        for _ in 0..n {
            index += 1;
            let len = (next() % 3000) as usize;
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let mut e = entry(term, index, &data);
            if index % 50 == 0 {
                e.entry_type = EntryType::EntryConfChange;
                e.context = Bytes::from_static(b"raft-rs context, skipped by etcd");
            }
            ents.push(e);
        }
        if round == 200 {
            ents.push(entry(term, index + 1, &vec![0xab; 5 << 20]));
            index += 1;
        }
        commit = commit.max(index.saturating_sub(4));
        w.save(&hs(term, 1, commit), &ents).unwrap();
        if round % 50 == 49 {
            let cs = raft::eraftpb::ConfState {
                voters: vec![1, 2, 3],
                ..Default::default()
            };
            let s = WalSnapshot {
                index: commit,
                term,
                conf_state: Some(cs),
            };
            w.save_snapshot(&s).unwrap();
        }
        w.save(&hs(term, 1, index), &[]).unwrap(); // commit only
        commit = index;
    }
    w.close().unwrap();

    let mut snapshot = raft::eraftpb::Snapshot {
        data: Bytes::from_static(br#"{"k":"v"}"#),
        ..Default::default()
    };
    snapshot.mut_metadata().index = 42;
    snapshot.mut_metadata().term = 2;
    snapshot.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
    Snapshotter::new(out.join("rust-snap"))
        .save_snap(&snapshot)
        .unwrap();

    let mut w = Wal::open(&dir, &marker(0, 0)).unwrap();
    let (md, st, ents) = w.read_all().unwrap();
    w.close().unwrap();
    let snaps = valid_snapshot_entries(&dir).unwrap();
    println!("metadata={}", String::from_utf8_lossy(&md));
    println!(
        "hardstate term={} vote={} commit={}",
        st.term, st.vote, st.commit
    );
    println!(
        "entries={} first={} last={}",
        ents.len(),
        ents[0].index,
        ents[ents.len() - 1].index
    );
    println!("digest={:08x}", digest(&ents));
    let pairs: Vec<String> = snaps
        .iter()
        .map(|s| format!("{}/{}", s.index, s.term))
        .collect();
    println!("snapshots={}", pairs.join(","));
}
