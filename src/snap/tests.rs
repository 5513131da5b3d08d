use super::*;
use bytes::Bytes;

fn snapshot(term: u64, index: u64, data: &'static [u8]) -> Snapshot {
    let mut s = Snapshot {
        data: Bytes::from_static(data),
        ..Default::default()
    };
    let m = s.mut_metadata();
    m.term = term;
    m.index = index;
    m.mut_conf_state().voters = vec![1];
    s
}

/// reference.md B.10: etcd's bytes for `Snapshot{Data:'{"k":"v"}', Meta{Voters:[1], Index 1, Term 1}}`.
const GOLDEN: &[u8] = &[
    0x08, 0xa3, 0x84, 0xe0, 0xec, 0x0a, 0x12, 0x17, 0x0a, 0x09, 0x7b, 0x22, 0x6b, 0x22, 0x3a, 0x22,
    0x76, 0x22, 0x7d, 0x12, 0x0a, 0x0a, 0x04, 0x08, 0x01, 0x28, 0x00, 0x10, 0x01, 0x18, 0x01,
];

#[test]
fn golden_bytes() {
    let s = snapshot(1, 1, br#"{"k":"v"}"#);
    assert_eq!(encode_snap_file(&s), GOLDEN);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(snap_name(1, 1));
    std::fs::write(&p, GOLDEN).unwrap();
    assert_eq!(read(&p).unwrap(), s);
    assert_eq!(crc32c::crc32c(&GOLDEN[8..]), 0xad98_0223);
}

#[test]
fn save_load_round_trip_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let ss = Snapshotter::new(dir.path().join("snap"));
    assert!(matches!(ss.load(), Err(SnapError::NoSnapshot { .. })));
    ss.save_snap(&snapshot(0, 0, b"ignored")).unwrap();
    assert!(!ss.dir().exists(), "an empty snapshot is not written");
    let s = snapshot(2, 0x1234, b"{}");
    ss.save_snap(&s).unwrap();
    assert!(
        ss.dir()
            .join("0000000000000002-0000000000001234.snap")
            .exists()
    );
    assert_eq!(ss.load().unwrap(), s);
    let newer = snapshot(3, 0x2000, b"{\"a\":\"b\"}");
    ss.save_snap(&newer).unwrap();
    assert_eq!(ss.load().unwrap(), newer);
}

#[test]
fn corrupt_newest_falls_back_and_is_renamed() {
    type Damage = fn(&Path);
    let damages: [(&str, Damage); 5] = [
        ("empty file", |p| std::fs::write(p, b"").unwrap()),
        ("flipped data bit", |p| {
            let mut b = std::fs::read(p).unwrap();
            let last = b.len() - 3;
            b[last] ^= 0x10;
            std::fs::write(p, b).unwrap();
        }),
        ("truncated", |p| {
            let b = std::fs::read(p).unwrap();
            std::fs::write(p, &b[..b.len() / 2]).unwrap();
        }),
        ("zero crc", |p| {
            let s = read(p).unwrap();
            let mut data = Vec::new();
            pb::encode_snapshot(&mut data, &s);
            let mut out = vec![0x08, 0x00];
            pb::put_bytes_field(&mut out, 2, &data);
            std::fs::write(p, out).unwrap();
        }),
        ("garbage", |p| std::fs::write(p, [0xffu8; 40]).unwrap()),
    ];
    for (what, damage) in damages {
        let dir = tempfile::tempdir().unwrap();
        let ss = Snapshotter::new(dir.path());
        let old = snapshot(1, 10, b"old");
        let new = snapshot(1, 20, b"new");
        ss.save_snap(&old).unwrap();
        ss.save_snap(&new).unwrap();
        let newest = dir.path().join(snap_name(1, 20));
        damage(&newest);
        assert_eq!(ss.load().unwrap(), old, "{what}");
        assert!(!newest.exists(), "{what}");
        assert!(
            dir.path()
                .join(format!("{}.broken", snap_name(1, 20)))
                .exists(),
            "{what}"
        );
    }
}

#[test]
fn nothing_valid_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let ss = Snapshotter::new(dir.path());
    ss.save_snap(&snapshot(1, 5, b"x")).unwrap();
    std::fs::write(dir.path().join(snap_name(1, 5)), b"").unwrap();
    let err = ss.load().unwrap_err();
    assert!(matches!(err, SnapError::NoSnapshot { .. }));
    assert!(err.to_string().contains("no available snapshot"), "{err}");
}

#[test]
fn newest_available_only_accepts_wal_markers() {
    let dir = tempfile::tempdir().unwrap();
    let ss = Snapshotter::new(dir.path());
    for i in [10, 20, 30] {
        ss.save_snap(&snapshot(2, i, b"d")).unwrap();
    }
    let marker = |index, term| WalSnapshot {
        index,
        term,
        conf_state: None,
    };
    let got = ss
        .load_newest_available(&[marker(0, 0), marker(10, 2), marker(20, 2)])
        .unwrap();
    assert_eq!(got.get_metadata().index, 20);
    // Same index, other term: not a match.
    assert!(matches!(
        ss.load_newest_available(&[marker(30, 1)]),
        Err(SnapError::NoSnapshot { .. })
    ));
    // Non-matching readable files are not renamed.
    assert!(dir.path().join(snap_name(2, 30)).exists());
}

#[test]
fn keeps_at_most_n_files() {
    let dir = tempfile::tempdir().unwrap();
    let ss = Snapshotter::new(dir.path()).with_max_snapshots(Some(3));
    for i in 1..=6 {
        ss.save_snap(&snapshot(1, i, b"d")).unwrap();
    }
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [snap_name(1, 4), snap_name(1, 5), snap_name(1, 6)]);
    let all = Snapshotter::new(dir.path()).with_max_snapshots(None);
    for i in 7..=12 {
        all.save_snap(&snapshot(1, i, b"d")).unwrap();
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 9);
}

/// The file written in pieces (head, borrowed data, tail) is byte for byte the straightforward
/// encoding: raftpb.Snapshot marshaled into one buffer, wrapped in snappb.Snapshot.
#[test]
fn pieces_equal_the_one_buffer_encoding() {
    for data in [&b""[..], &b"x"[..], &[7u8; 300][..]] {
        let mut s = snapshot(3, 0x99, b"");
        s.data = Bytes::copy_from_slice(data);
        let mut inner = Vec::new();
        pb::encode_snapshot(&mut inner, &s);
        let mut want = Vec::new();
        pb::put_varint_field(&mut want, 1, u64::from(crc32c::crc32c(&inner)));
        pb::put_bytes_field(&mut want, 2, &inner);
        assert_eq!(encode_snap_file(&s), want, "{} data bytes", data.len());
    }
}
