#!/usr/bin/env bash
# Times the two slow paths of a node's life, on loopback, with the real binaries:
#
#   tests/recovery-timing.sh catchup [KEYS]   (default 100000)
#       3-node cluster; node 3 is stopped, KEYS keys are written through nodes 1 and 2 (so the
#       leader compacts its log past node 3 and must send a snapshot), then node 3 is started
#       again. Prints the time from node 3's start until it serves the last key written.
#   tests/recovery-timing.sh restart [KEYS]   (default 1000000)
#       1-node cluster; KEYS keys are written, the node is stopped (SIGTERM) and started again.
#       Prints the time from the restart until it serves the last key (snapshot + WAL tail
#       replayed and applied), and the node's peak RSS before and after.
#
# Default snapshot policy (--snapshot-count 10000). Ports as tests/bench-cluster.sh (12379..,
# 12380..). Environment: RAFTEXAMPLE_BIN, BENCH_BIN as there; KEEP_DIRS=1 keeps the data.
set -euo pipefail

BIN=$(realpath "${RAFTEXAMPLE_BIN:-target/release/raftexample}")
BENCH=$(realpath "${BENCH_BIN:-target/release/raftexample-bench}")
MODE=${1:?usage: recovery-timing.sh catchup|restart [KEYS]}
WORK=$(mktemp -d -t raftexample-recovery.XXXXXX)
declare -A PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ ${KEEP_DIRS:-0} == 1 ]]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_node() { # id cluster
    mkdir -p "$WORK/node$1"
    (cd "$WORK/node$1" && exec "$BIN" --id "$1" --cluster "$2" --port "${1}2380") \
        >>"$WORK/node$1/node.log" 2>&1 &
    PIDS[$1]=$!
}
stop_node() { kill "${PIDS[$1]}"; wait "${PIDS[$1]}" 2>/dev/null || true; unset "PIDS[$1]"; }
now() { date +%s.%N; }
# Waits until GET $1 on node $2 answers $3; fails after $4 seconds.
wait_value() {
    local deadline=$((SECONDS + $4))
    until [[ $(curl -s --max-time 2 "http://127.0.0.1:${2}2380$1" || true) == "$3" ]]; do
        ((SECONDS < deadline)) || { echo "timeout waiting for $1 on node $2" >&2; tail "$WORK"/node*/node.log >&2; exit 2; }
        sleep 0.01
    done
}
hwm() { awk '/^VmHWM/ {print $2, $3}' "/proc/${PIDS[$1]}/status"; }

case $MODE in
catchup)
    KEYS=${2:-100000}
    CLUSTER=http://127.0.0.1:12379,http://127.0.0.1:22379,http://127.0.0.1:32379
    for id in 1 2 3; do start_node "$id" "$CLUSTER"; done
    curl -s -X PUT -d up http://127.0.0.1:12380/probe >/dev/null || true
    wait_value /probe 3 up 60 || true
    stop_node 3
    "$BENCH" --conns 64 --total "$KEYS" --endpoints http://127.0.0.1:12380,http://127.0.0.1:22380 \
        --key-prefix catchup- --no-verify
    curl -s -X PUT -d last http://127.0.0.1:12380/catchup-last >/dev/null
    wait_value /catchup-last 1 last 60
    t0=$(now)
    start_node 3 "$CLUSTER"
    wait_value /catchup-last 3 last 300
    t1=$(now)
    echo "catch-up: node 3 serves all $KEYS keys $(echo "$t1 - $t0" | bc) s after its start"
    grep -E "snapshot" "$WORK/node3/node.log" | tail -3 || true
    ;;
restart)
    KEYS=${2:-1000000}
    CLUSTER=http://127.0.0.1:12379
    start_node 1 "$CLUSTER"
    # Linearizable, so it answers once the node has elected itself: the write phase's latency
    # figures then measure writing, not the election.
    until curl -sf -X PUT -d up -H 'X-Linearizable: true' --max-time 2 \
        http://127.0.0.1:12380/probe >/dev/null; do sleep 0.1; done
    "$BENCH" --conns 64 --total "$KEYS" --endpoints http://127.0.0.1:12380 --key-prefix restart- \
        --no-verify
    curl -s -X PUT -d last -H 'X-Linearizable: true' http://127.0.0.1:12380/restart-last >/dev/null
    echo "before restart: peak RSS $(hwm 1), data: $(du -sh "$WORK/node1" | cut -f1)"
    stop_node 1
    t0=$(now)
    start_node 1 "$CLUSTER"
    wait_value /restart-last 1 last 300
    t1=$(now)
    echo "restart: node serves all $KEYS keys $(echo "$t1 - $t0" | bc) s after its start; peak RSS $(hwm 1)"
    ;;
*) echo "usage: recovery-timing.sh catchup|restart [KEYS]" >&2; exit 2 ;;
esac
