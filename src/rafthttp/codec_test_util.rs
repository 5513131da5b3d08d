//! proptest strategies for raft messages, shared by the codec tests.

use bytes::Bytes;
use proptest::prelude::*;
use protobuf::ProtobufEnum;
use raft::eraftpb::{ConfState, Entry, EntryType, Message, MessageType, Snapshot};

fn arb_bytes() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

pub fn arb_entry() -> impl Strategy<Value = Entry> {
    (
        prop::sample::select(EntryType::values().to_vec()),
        any::<u64>(),
        any::<u64>(),
        arb_bytes(),
        arb_bytes(),
        any::<bool>(),
    )
        .prop_map(|(t, term, index, data, context, sync_log)| {
            let mut e = Entry::new();
            (e.entry_type, e.term, e.index, e.data, e.context, e.sync_log) =
                (t, term, index, data, context, sync_log);
            e
        })
}

fn arb_snapshot() -> impl Strategy<Value = Option<Snapshot>> {
    proptest::option::of(
        (
            arb_bytes(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u64>(), 0..4),
        )
            .prop_map(|(data, index, term, voters)| {
                let mut s = Snapshot::new();
                s.data = data;
                s.mut_metadata().index = index;
                s.mut_metadata().term = term;
                let mut cs = ConfState::new();
                cs.voters = voters;
                s.mut_metadata().set_conf_state(cs);
                s
            }),
    )
}

pub fn arb_message() -> impl Strategy<Value = Message> {
    (
        (
            prop::sample::select(MessageType::values().to_vec()),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        ),
        (
            proptest::collection::vec(arb_entry(), 0..3),
            any::<u64>(),
            any::<u64>(),
            arb_snapshot(),
            any::<bool>(),
            any::<u64>(),
            arb_bytes(),
            any::<i64>(),
        ),
    )
        .prop_map(
            |(
                (t, to, from, term, log_term, index),
                (entries, commit, commit_term, snapshot, reject, reject_hint, context, priority),
            )| {
                let mut m = Message::new();
                (m.msg_type, m.to, m.from, m.term, m.log_term, m.index) =
                    (t, to, from, term, log_term, index);
                m.entries = entries.into();
                (
                    m.commit,
                    m.commit_term,
                    m.reject,
                    m.reject_hint,
                    m.context,
                    m.priority,
                ) = (commit, commit_term, reject, reject_hint, context, priority);
                if let Some(s) = snapshot {
                    m.set_snapshot(s);
                }
                m
            },
        )
}
