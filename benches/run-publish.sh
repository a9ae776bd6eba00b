#!/usr/bin/env bash
# Durable-publish benchmark: acknowledged (committed) messages/s with p99 ack <= 50 ms, against
# the database's own baselines in the same command: `naive` (one INSERT and commit per message,
# 16 connections) and `batch` (one writer inserting ready rows 1000 per statement: the
# ceiling). NanoChat runs at several loads (senders x window = messages in flight, windows
# within the default limits.max_inflight_sends of 64); its result is the best run whose p99 is
# at most 50 ms. The targets take turns and the round is repeated (REPEATS, default 3), so
# ratios compare medians measured side by side. SQLite always; Postgres too when
# NANOCHAT_BENCH_PG=<url> (a role with CREATEDB; every run works in a database of its own).
#   benches/run-publish.sh [secs] | tee publish.jsonl
#   benches/publish-table.py < publish.jsonl                           (the results table)
# WARMUP (seconds, default 20): every run writes that long before it measures, so NanoChat is
# measured with a database that has been filling (benches/HISTORY.md, session 19); WARMUP=0
# measures as runs up to session 18 did. BACKENDS="postgres" (or "sqlite", or both) runs only
# those. YESTERDAY=N (Postgres) stores N messages dated yesterday before every NanoChat run,
# so the replay lookup searches a full day's index, as on a server that has been running.
# The first line says what it ran on (benches/machine.py).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
repeats=${REPEATS:-3}
warmup=${WARMUP:-20}
cargo build --release --bins -q
load=target/release/nanochat-load
benches/machine.py   # what the numbers were measured on, first in the output
loads=("32 16" "32 32" "16 64" "24 64" "32 64")
backends=(sqlite)
[ -n "${NANOCHAT_BENCH_PG:-}" ] && backends+=(postgres)
if [ -n "${BACKENDS:-}" ]; then
    read -ra backends <<< "$BACKENDS"
    if [[ " ${backends[*]} " == *" postgres "* ]] && [ -z "${NANOCHAT_BENCH_PG:-}" ]; then
        echo "BACKENDS names postgres: set NANOCHAT_BENCH_PG too" >&2
        exit 1
    fi
fi
for ((round = 1; round <= repeats; round++)); do
    for backend in "${backends[@]}"; do
        db=()
        [ "$backend" = postgres ] && db=(--postgres "$NANOCHAT_BENCH_PG")
        echo "{\"scenario\":\"round\",\"round\":$round,\"backend\":\"$backend\"}"
        "$load" publish --target naive --senders 16 --secs "$secs" --warmup "$warmup" "${db[@]}"
        "$load" publish --target batch --secs "$secs" --warmup "$warmup" "${db[@]}"
        for l in "${loads[@]}"; do
            set -- $l
            history=()
            [ "$backend" = postgres ] && history=(--yesterday "${YESTERDAY:-0}")
            "$load" publish --target nanochat --senders "$1" --window "$2" --secs "$secs" \
                --warmup "$warmup" "${db[@]}" "${history[@]}"
        done
    done
done
