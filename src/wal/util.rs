//! Segment names and selection (etcd `wal/util.go`).
//!
//! A segment is named `%016x-%016x.wal`: its sequence number, then the raft index of the first
//! entry expected in it. Fixed-width hex makes the lexicographic order the numeric order.

use std::path::Path;

use super::error::WalError;

/// One segment file name, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentName {
    /// The file name (no directory).
    pub name: String,
    /// Sequence number, +1 per segment.
    pub seq: u64,
    /// Raft index of the first entry expected in the segment.
    pub index: u64,
}

/// `walName`: the file name of segment `seq` starting at raft index `index`.
pub fn wal_name(seq: u64, index: u64) -> String {
    format!("{seq:016x}-{index:016x}.wal")
}

/// `parseWALName`: `Some((seq, index))` for a well-formed segment name.
pub fn parse_wal_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".wal")?;
    let (seq, index) = stem.split_once('-')?;
    if seq.len() != 16 || index.len() != 16 {
        return None;
    }
    let hex = |s: &str| {
        if s.bytes().all(|b| b.is_ascii_hexdigit()) {
            u64::from_str_radix(s, 16).ok()
        } else {
            None
        }
    };
    Some((hex(seq)?, hex(index)?))
}

/// `readWALNames`: the segment files of `dir`, sorted. Other files are ignored: `*.tmp`
/// (the file pipeline's preallocated files) silently, anything else with a debug log.
pub fn read_wal_names(dir: &Path) -> Result<Vec<SegmentName>, WalError> {
    let rd = std::fs::read_dir(dir).map_err(WalError::io("read directory", dir))?;
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry.map_err(WalError::io("read directory", dir))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        match parse_wal_name(&name) {
            Some((seq, index)) => names.push(SegmentName { name, seq, index }),
            None if name.ends_with(".tmp") => {}
            None => {
                tracing::debug!(dir = %dir.display(), file = %name, "ignored file in WAL directory")
            }
        }
    }
    names.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(names)
}

/// `Exist`: whether `dir` holds at least one segment file. Unlike etcd's, a directory that
/// cannot be read is an error, not "no WAL": taking it for empty would create a new log over
/// one that might hold data (and delete it, if the directory could be removed).
pub fn exist(dir: &Path) -> Result<bool, WalError> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(WalError::io("inspect", dir)(e)),
        Ok(_) => Ok(!read_wal_names(dir)?.is_empty()),
    }
}

/// `searchIndex`: position of the last segment whose first index is `<= index`.
pub fn search_index(names: &[SegmentName], index: u64) -> Option<usize> {
    names.iter().rposition(|n| n.index <= index)
}

/// `isValidSeq`, stricter than etcd's (which skips the check after sequence 0): every
/// sequence number must be the previous one plus one. Returns the first gap.
pub fn first_seq_gap(names: &[SegmentName]) -> Option<(&SegmentName, &SegmentName)> {
    names
        .windows(2)
        .find(|w| w[0].seq.checked_add(1) != Some(w[1].seq))
        .map(|w| (&w[0], &w[1]))
}

/// Selects the segments to read when opening at snapshot index `index` (etcd `selectWALFiles`).
pub fn select_wal_files(dir: &Path, index: u64) -> Result<Vec<SegmentName>, WalError> {
    let names = read_wal_names(dir)?;
    let Some(first) = names.first() else {
        return Err(WalError::FileNotFound { dir: dir.into() });
    };
    let Some(start) = search_index(&names, index) else {
        return Err(WalError::NoSegmentForIndex {
            dir: dir.into(),
            index,
            oldest: first.name.clone(),
        });
    };
    let names = names[start..].to_vec();
    if let Some((prev, next)) = first_seq_gap(&names) {
        return Err(WalError::SequenceGap {
            dir: dir.into(),
            prev: prev.name.clone(),
            next: next.name.clone(),
        });
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(seq: u64, index: u64) -> SegmentName {
        SegmentName {
            name: wal_name(seq, index),
            seq,
            index,
        }
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(wal_name(0, 0), "0000000000000000-0000000000000000.wal");
        assert_eq!(wal_name(1, 0x21), "0000000000000001-0000000000000021.wal");
        assert_eq!(parse_wal_name(&wal_name(7, u64::MAX)), Some((7, u64::MAX)));
        for bad in [
            "0.tmp",
            "0000000000000000-0000000000000000.wal.broken",
            "000000000000000-0000000000000000.wal",
            "000000000000000g-0000000000000000.wal",
            "+000000000000000-0000000000000000.wal",
        ] {
            assert_eq!(parse_wal_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn search_and_gaps() {
        let names = vec![n(0, 0), n(1, 10), n(2, 20)];
        assert_eq!(search_index(&names, 0), Some(0));
        assert_eq!(search_index(&names, 15), Some(1));
        assert_eq!(search_index(&names, 20), Some(2));
        assert_eq!(first_seq_gap(&names), None);
        let gap = vec![n(0, 0), n(2, 20)];
        assert_eq!(
            first_seq_gap(&gap).map(|(a, b)| (a.seq, b.seq)),
            Some((0, 2))
        );
        assert_eq!(search_index(&[n(3, 10)], 5), None);
    }
}
