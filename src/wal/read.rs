//! Replaying the log (etcd `ReadAll` and `ValidSnapshotEntries`).

use std::fs::File;
use std::path::{Path, PathBuf};

use raft::eraftpb::{Entry, HardState};

use super::decoder::{DecodeError, Decoder, Frame};
use super::error::WalError;
use super::record::{self, RecordType};
use super::{WalSnapshot, pb, util};

/// What a replay found.
pub struct Replayed {
    /// Metadata (identical in every segment).
    pub metadata: Vec<u8>,
    /// The last hard state.
    pub state: HardState,
    /// Entries after the start snapshot, overwrites applied.
    pub ents: Vec<Entry>,
    /// Index of the last entry record read.
    pub enti: u64,
    /// Whether the start snapshot's marker was found.
    pub matched: bool,
    /// A torn tail in the last segment: (offset, what was found), to be repaired.
    pub torn: Option<(u64, String)>,
    /// Running CRC after the last valid record.
    pub last_crc: u32,
    /// Offset after the last valid frame of the last segment.
    pub last_offset: u64,
}

/// `Corrupt` for a record whose CRC is right but whose payload does not decode.
fn undecodable(paths: &[PathBuf], frame: &Frame<'_>, e: pb::PbError) -> WalError {
    WalError::Corrupt {
        path: paths[frame.segment].clone(),
        offset: frame.offset,
        reason: format!(
            "{:?} record passed its crc check but does not decode ({e})",
            frame.rec_type
        ),
    }
}

/// Reads `segments` (the first one is the log's first segment if `from_log_start`) from the
/// snapshot `start` on (etcd `ReadAll`'s loop).
pub fn replay(
    segments: Vec<(PathBuf, File)>,
    from_log_start: bool,
    start: &WalSnapshot,
) -> Result<Replayed, WalError> {
    let paths: Vec<PathBuf> = segments.iter().map(|(p, _)| p.clone()).collect();
    let mut dec = Decoder::new(segments, from_log_start);
    let mut metadata: Option<Vec<u8>> = None;
    let mut r = Replayed {
        metadata: Vec::new(),
        state: HardState::default(),
        ents: Vec::new(),
        enti: 0,
        matched: false,
        torn: None,
        last_crc: 0,
        last_offset: 0,
    };
    loop {
        let frame = match dec.next() {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(DecodeError::Torn { offset, reason }) => {
                r.torn = Some((offset, reason));
                break;
            }
            Err(DecodeError::Fatal(e)) => return Err(e),
        };
        let bad = |e| undecodable(&paths, &frame, e);
        match frame.rec_type {
            RecordType::Entry => {
                let e = pb::decode_entry(frame.data).map_err(bad)?;
                r.enti = e.index;
                if e.index > start.index {
                    // A later entry at index i replaces everything from i on.
                    let up = e.index - start.index - 1;
                    if up > r.ents.len() as u64 {
                        return Err(WalError::EntryGap {
                            path: paths[frame.segment].clone(),
                            offset: frame.offset,
                            index: e.index,
                            have: r.ents.len(),
                            snap_index: start.index,
                        });
                    }
                    r.ents.truncate(up as usize);
                    r.ents.push(e);
                }
            }
            RecordType::State => r.state = pb::decode_hard_state(frame.data).map_err(bad)?,
            RecordType::Metadata => match &metadata {
                Some(m) if m.as_slice() != frame.data => {
                    return Err(WalError::MetadataConflict {
                        path: paths[frame.segment].clone(),
                        offset: frame.offset,
                    });
                }
                Some(_) => {}
                None => metadata = Some(frame.data.to_vec()),
            },
            RecordType::Crc => {} // checked and applied by the decoder
            RecordType::Snapshot => {
                let s = record::decode_wal_snapshot(frame.data).map_err(bad)?;
                if s.index == start.index {
                    if s.term != start.term {
                        return Err(WalError::SnapshotMismatch {
                            path: paths[frame.segment].clone(),
                            offset: frame.offset,
                            index: s.index,
                            want_term: start.term,
                            found_term: s.term,
                        });
                    }
                    r.matched = true;
                }
            }
        }
    }
    r.metadata = metadata.unwrap_or_default();
    r.last_crc = dec.last_crc();
    r.last_offset = dec.last_offset();
    Ok(r)
}

/// etcd `ValidSnapshotEntries`: the snapshot markers of the log whose index is at most the
/// commit index of the last hard state, i.e. the snapshots a restart may start from (a marker
/// beyond the durable commit index could name a snapshot raft cannot accept). Reads every
/// segment without locking; a torn tail simply ends the read.
pub fn valid_snapshot_entries(dir: &Path) -> Result<Vec<WalSnapshot>, WalError> {
    let names = util::read_wal_names(dir)?;
    let Some(first) = names.first() else {
        return Err(WalError::FileNotFound { dir: dir.into() });
    };
    if let Some((prev, next)) = util::first_seq_gap(&names) {
        return Err(WalError::SequenceGap {
            dir: dir.into(),
            prev: prev.name.clone(),
            next: next.name.clone(),
        });
    }
    let from_log_start = first.seq == 0;
    let mut segments = Vec::with_capacity(names.len());
    for n in &names {
        let path = dir.join(&n.name);
        let f = File::open(&path).map_err(WalError::io("open segment", &path))?;
        segments.push((path, f));
    }
    let paths: Vec<PathBuf> = segments.iter().map(|(p, _)| p.clone()).collect();
    let mut dec = Decoder::new(segments, from_log_start);
    let mut snaps = Vec::new();
    let mut state = HardState::default();
    loop {
        let frame = match dec.next() {
            Ok(Some(f)) => f,
            Ok(None) | Err(DecodeError::Torn { .. }) => break,
            Err(DecodeError::Fatal(e)) => return Err(e),
        };
        let bad = |e| undecodable(&paths, &frame, e);
        match frame.rec_type {
            RecordType::Snapshot => {
                snaps.push(record::decode_wal_snapshot(frame.data).map_err(bad)?)
            }
            RecordType::State => state = pb::decode_hard_state(frame.data).map_err(bad)?,
            _ => {}
        }
    }
    snaps.retain(|s| s.index <= state.commit);
    Ok(snaps)
}
