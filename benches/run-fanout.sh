#!/usr/bin/env bash
# Fan-out benchmark: for each room shape, the highest rate each server sustains with no loss
# and p99 delivery <= 200 ms (a sweep of fan-out runs, 25% steps, fresh server each run):
# NanoChat (SQLite, persisting every message), the bare tokio + tungstenite ceiling and a plain
# Node.js `ws` server, in the same command. Loopback only; every run is bounded by --secs.
# Prints one JSON line per run and a "sweep" summary per target and shape; the chart is
#   benches/run-fanout.sh | tee fanout.jsonl && benches/fanout-chart.py < fanout.jsonl > benches/fanout.svg
#   benches/run-fanout.sh [secs]        (Postgres one vs two processes: NANOCHAT_BENCH_PG=<url>)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-4}
cargo build --release --bins -q
[ -d benches/node-ws/node_modules/ws ] || npm ci --prefix benches/node-ws --no-audit --no-fund
load=target/release/nanochat-load
# rooms, members, starting rate (messages/s)
for shape in "1 1000 40" "100 10 4000" "1000 2 2000"; do
    set -- $shape
    for target in bare node nanochat; do
        "$load" sweep --target "$target" --rooms "$1" --members "$2" --rate "$3" --secs "$secs" --steps 20
    done
done
if [ -n "${NANOCHAT_BENCH_PG:-}" ]; then
    for nodes in 1 2; do
        "$load" fanout --target nanochat --postgres "$NANOCHAT_BENCH_PG" --nodes "$nodes" \
            --rooms 100 --members 10 --rate 1000 --secs "$secs"
    done
fi
