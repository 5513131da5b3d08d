//! Linearizable reads through raft's ReadIndex (raft thesis 6.4): the leader confirms with a
//! quorum that it still leads, and the read is served once this node has applied up to the
//! commit index the leader had when the read arrived. Every request that arrives while one
//! round is in flight joins the next round, so a burst of reads costs one heartbeat round.

use std::time::{Duration, Instant};

use raft::ReadState;

use super::node::RaftNode;
use crate::kvstore::ReadIndexRequest;

/// raft-rs silently drops a ReadIndex request when no leader is known, or when the leader has
/// not yet committed an entry in its term; a round unanswered this long is asked again.
const RETRY_AFTER: Duration = Duration::from_millis(300);

/// One ReadIndex round: its context (a counter) and the clients waiting for its answer.
pub(super) struct ReadRound {
    ctx: u64,
    asked: Instant,
    waiters: Vec<ReadIndexRequest>,
}

/// Reads waiting to be asked, and rounds asked but not answered.
#[derive(Default)]
pub(super) struct Reads {
    waiting: Vec<ReadIndexRequest>,
    in_flight: Vec<ReadRound>,
    last_ctx: u64,
}

impl Reads {
    pub(super) fn push(&mut self, req: ReadIndexRequest) {
        self.waiting.push(req);
    }
}

impl RaftNode {
    /// Starts a round for the reads that arrived since the last one.
    pub(super) fn request_reads(&mut self) {
        if self.reads.waiting.is_empty() {
            return;
        }
        let waiters = std::mem::take(&mut self.reads.waiting);
        self.ask_read_index(waiters);
    }

    fn ask_read_index(&mut self, waiters: Vec<ReadIndexRequest>) {
        self.reads.last_ctx += 1;
        let ctx = self.reads.last_ctx;
        // The leader keys pending reads by context and ignores a duplicate, so the context
        // must be unique cluster-wide and across restarts: this process's origin + a counter.
        let mut rctx = self.proposer.origin().to_be_bytes().to_vec();
        rctx.extend_from_slice(&ctx.to_be_bytes());
        self.node.read_index(rctx);
        self.reads.in_flight.push(ReadRound {
            ctx,
            asked: Instant::now(),
            waiters,
        });
    }

    /// Re-asks rounds that got no answer (on every tick); drops clients that gave up.
    pub(super) fn retry_reads(&mut self) {
        let now = Instant::now();
        let (stale, fresh): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads.in_flight)
            .into_iter()
            .partition(|r| now.duration_since(r.asked) >= RETRY_AFTER);
        self.reads.in_flight = fresh;
        for round in stale {
            let waiters: Vec<_> = round
                .waiters
                .into_iter()
                .filter(|w| !w.is_closed())
                .collect();
            if !waiters.is_empty() {
                self.ask_read_index(waiters);
            }
        }
    }

    /// Answers the rounds raft confirmed (from `Ready::read_states`).
    pub(super) fn answer_reads(&mut self, states: Vec<ReadState>) {
        for rs in states {
            let Ok(rctx) = <[u8; 16]>::try_from(&rs.request_ctx[..]) else {
                continue;
            };
            let (origin, ctx) = rctx.split_at(8);
            if origin != self.proposer.origin().to_be_bytes() {
                continue;
            }
            let ctx = u64::from_be_bytes(ctx.try_into().expect("invariant: 8 bytes"));
            if let Some(pos) = self.reads.in_flight.iter().position(|r| r.ctx == ctx) {
                for w in self.reads.in_flight.swap_remove(pos).waiters {
                    let _ = w.send(rs.index);
                }
            }
        }
    }
}
