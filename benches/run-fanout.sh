#!/usr/bin/env bash
# Fan-out benchmark: for each room shape, the highest rate each server sustains with no loss
# and p99 delivery <= 200 ms (a sweep of fan-out runs, 25% steps then two halvings of the last
# gap, fresh server each run): NanoChat (SQLite, persisting every message), the bare tokio +
# tungstenite ceiling (also with TCP_NODELAY on its sockets, as NanoChat's have) and a plain
# Node.js `ws` server, in the same command. The targets take turns, and the whole round is
# repeated (REPEATS, default 3) so that a ratio compares
# medians measured side by side, not one lucky or unlucky sweep. Loopback only; every run is
# bounded by --secs. Prints one JSON line per run and a "sweep" summary per target and shape:
#   benches/run-fanout.sh | tee fanout.jsonl
#   benches/fanout-chart.py < fanout.jsonl > benches/fanout.svg       (the chart, medians)
#   benches/fanout-chart.py --table < fanout.jsonl                     (the results table)
#   benches/run-fanout.sh [secs]        (Postgres one vs two processes: NANOCHAT_BENCH_PG=<url>)
# WARMUP (seconds, default 20) is how long each run sends before it measures: NanoChat's
# latency climbs as its database fills, so an empty one flatters it (benches/HISTORY.md,
# fan-out session 19). WARMUP=0 measures as the sweeps up to session 18 did.
# The first line says what it ran on (benches/machine.py).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-4}
repeats=${REPEATS:-3}
warmup=${WARMUP:-20}
cargo build --release --bins -q
[ -d benches/node-ws/node_modules/ws ] || npm ci --prefix benches/node-ws --no-audit --no-fund
load=target/release/nanochat-load
benches/machine.py   # what the numbers were measured on, first in the output
# rooms, members, then the starting rate (messages/s) for bare, bare-nodelay, node and
# nanochat: a little under what each reached after a warm-up before (sessions 18-20), so a
# sweep spends its runs near its maximum.
shapes=("1 1000 500 300 100 1500" "100 10 40000 16000 7000 60000" "1000 2 80000 50000 35000 40000")
for ((round = 1; round <= repeats; round++)); do
    for shape in "${shapes[@]}"; do
        set -- $shape
        rooms=$1 members=$2
        shift 2
        for target in bare bare-nodelay node nanochat; do
            "$load" sweep --target "$target" --rooms "$rooms" --members "$members" --rate "$1" \
                --secs "$secs" --warmup "$warmup" --steps 20
            shift
        done
    done
done
if [ -n "${NANOCHAT_BENCH_PG:-}" ]; then
    for nodes in 1 2; do
        "$load" fanout --target nanochat --postgres "$NANOCHAT_BENCH_PG" --nodes "$nodes" \
            --rooms 100 --members 10 --rate 1000 --secs "$secs"
    done
fi
