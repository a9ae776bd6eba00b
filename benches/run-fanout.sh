#!/usr/bin/env bash
# Fan-out benchmark: NanoChat (SQLite, persisting every message) against the bare broadcast
# ceiling, on the same machine in the same run, for each room shape at a series of open-loop
# rates. Loopback only; every run is bounded by --secs. Prints one JSON line per run.
#   benches/run-fanout.sh [secs]        (Postgres two-node runs: NANOCHAT_BENCH_PG=<url>)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
cargo build --release --bins -q
load=target/release/nanochat-load
for shape in "1 1000" "100 10" "1000 2"; do
    set -- $shape
    for rate in 200 500 1000 2000; do
        for target in bare nanochat; do
            "$load" fanout --target "$target" --rooms "$1" --members "$2" --rate "$rate" --secs "$secs"
        done
    done
done
if [ -n "${NANOCHAT_BENCH_PG:-}" ]; then
    for nodes in 1 2; do
        "$load" fanout --target nanochat --postgres "$NANOCHAT_BENCH_PG" --nodes "$nodes" \
            --rooms 100 --members 10 --rate 1000 --secs "$secs"
    done
fi
