#!/usr/bin/env bash
# Start a 3-node raftexample cluster on loopback, run raftexample-bench against it, print each
# node's peak RSS, and stop the cluster again (always, via trap).
#
#   cargo build --release --bin raftexample --bin raftexample-bench
#   tests/bench-cluster.sh --conns 64 --total 50000
#   RAFTEXAMPLE_BIN=/path/to/other/raftexample tests/bench-cluster.sh --conns 1 --total 5000
#
# Any binary that takes raftexample's flags (--id N --cluster URLs --port N) works, so the same
# script measures our port and the Go original side by side. Each node runs in its own temporary
# working directory, because raftexample keeps raftexample-<id>/ (WAL) and raftexample-<id>-snap/
# in its cwd. Ports are raftexample's Procfile ones: raft 12379/22379/32379, KV 12380/22380/32380
# (the bench tool's default endpoints); the script refuses to start if one is taken.
#
# Environment: RAFTEXAMPLE_BIN (default target/release/raftexample), BENCH_BIN (default
# target/release/raftexample-bench), READY_TIMEOUT seconds to wait for the cluster (default 60),
# KEEP_DIRS=1 to keep the node directories and logs, NODE_ARGS extra flags for every node
# (e.g. NODE_ARGS="--snapshot-count 100000").
# Exit status: the bench tool's (0 ok, 1 acknowledged keys lost, ...), or 2 if the cluster never
# became ready.
set -euo pipefail

BIN=${RAFTEXAMPLE_BIN:-target/release/raftexample}
BENCH=${BENCH_BIN:-target/release/raftexample-bench}
READY_TIMEOUT=${READY_TIMEOUT:-60}
CLUSTER=http://127.0.0.1:12379,http://127.0.0.1:22379,http://127.0.0.1:32379

for exe in "$BIN" "$BENCH"; do
    [[ -x $exe ]] || { echo "bench-cluster: $exe is not an executable (build it first)" >&2; exit 2; }
done
BIN=$(realpath "$BIN")
for port in 12379 22379 32379 12380 22380 32380; do
    if ss -Htln "sport = :$port" | grep -q .; then
        echo "bench-cluster: port $port is already in use; stop whatever listens there" >&2
        exit 2
    fi
done

WORK=$(mktemp -d -t raftexample-bench.XXXXXX)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ ${KEEP_DIRS:-0} == 1 ]]; then
        echo "bench-cluster: node directories and logs kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for id in 1 2 3; do
    mkdir -p "$WORK/node$id"
    # shellcheck disable=SC2086 # NODE_ARGS is a list of flags
    (cd "$WORK/node$id" && exec "$BIN" --id "$id" --cluster "$CLUSTER" --port "${id}2380" ${NODE_ARGS:-}) \
        >"$WORK/node$id/node.log" 2>&1 &
    PIDS+=("$!")
done

# Ready = a value written through node 1 is readable on node 3 (a leader exists and replicates).
probe="/bench-cluster-ready-$$"
deadline=$((SECONDS + READY_TIMEOUT))
until [[ $(curl -s --max-time 2 http://127.0.0.1:32380$probe || true) == ready ]]; do
    if ((SECONDS >= deadline)); then
        echo "bench-cluster: cluster not ready after ${READY_TIMEOUT}s; node logs follow" >&2
        tail -n 20 "$WORK"/node*/node.log >&2
        exit 2
    fi
    for pid in "${PIDS[@]}"; do
        kill -0 "$pid" 2>/dev/null || { echo "bench-cluster: node pid $pid exited" >&2; tail -n 20 "$WORK"/node*/node.log >&2; exit 2; }
    done
    curl -s --max-time 2 -X PUT -d ready http://127.0.0.1:12380$probe >/dev/null || true
    sleep 0.2
done
echo "bench-cluster: $BIN cluster ready (pids ${PIDS[*]})" >&2

status=0
"$BENCH" "$@" || status=$?

# With --json, stdout stays pure JSON and the memory figures go to stderr.
rss_out=1
for arg in "$@"; do [[ $arg == --json ]] && rss_out=2; done
for i in 0 1 2; do
    hwm=$(awk '/^VmHWM/ {print $2, $3}' "/proc/${PIDS[$i]}/status" 2>/dev/null || echo "? (exited)")
    echo "node $((i + 1)) peak RSS (VmHWM): $hwm" >&"$rss_out"
done
exit "$status"
