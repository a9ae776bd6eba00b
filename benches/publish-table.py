#!/usr/bin/env python3
"""Summarise benches/run-publish.sh: the durable-publish results table.

Reads JSON lines on stdin. A "round" line starts a round of one backend; in it, NanoChat's
result is its best run with p99 ack <= 50 ms (0 if none passed), compared with the naive and
batch (ceiling) runs of the same round. Prints one row per round and a median row per
backend, then every NanoChat load's median, so the effect of the load stays visible.
Usage:
  benches/run-publish.sh | tee publish.jsonl
  benches/publish-table.py < publish.jsonl
"""
import json
import statistics
import sys

from machine import caption

P99_LIMIT_MS = 50.0


def rounds(lines):
    """[(backend, round, {"naive": run, "batch": run, "nanochat": [runs]})] in input order, and
    the machine records (benches/machine.py)."""
    found, machines = [], []
    for line in lines:
        if not line.strip().startswith("{"):
            continue
        r = json.loads(line)
        if r.get("scenario") == "machine":
            machines.append(r)
        elif r.get("scenario") == "round":
            found.append((r["backend"], r["round"], {"nanochat": []}))
        elif r.get("scenario") == "publish" and found:
            group = found[-1][2]
            if r["target"] == "nanochat":
                group["nanochat"].append(r)
            else:
                group[r["target"]] = r
    return found, machines


def best(runs):
    passing = [r for r in runs if r["p99_ms"] <= P99_LIMIT_MS]
    return max(passing, key=lambda r: r["acked_per_s"], default=None)


def main():
    found, machines = rounds(sys.stdin)
    for line in caption(machines):
        print(line)
        print()
    print("| backend | round | naive/s | ceiling/s | NanoChat/s | load | p99 ms | / ceiling | / naive |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    ratios = {}
    for backend, rnd, g in found:
        if "naive" not in g or "batch" not in g:
            continue
        naive, ceiling, top = g["naive"]["acked_per_s"], g["batch"]["acked_per_s"], best(g["nanochat"])
        got = top["acked_per_s"] if top else 0.0
        load = f'{top["senders"]} × {top["window"]}' if top else "none ≤ 50 ms"
        p99 = f'{top["p99_ms"]:.0f}' if top else ""
        ratios.setdefault(backend, []).append((naive, ceiling, got))
        print(f"| {backend} | {rnd} | {naive:,.0f} | {ceiling:,.0f} | {got:,.0f} | {load} | {p99} "
              f"| {got / ceiling:.0%} | {got / naive:.1f}× |".replace(",", " "))
    for backend, rows in ratios.items():
        med = [statistics.median(c) for c in zip(*rows)]
        of_ceiling = statistics.median(g / c for _, c, g in rows)
        of_naive = statistics.median(g / n for n, _, g in rows)
        print(f"| **{backend}** | median | {med[0]:,.0f} | {med[1]:,.0f} | **{med[2]:,.0f}** | | "
              f"| **{of_ceiling:.0%}** | **{of_naive:.1f}×** |".replace(",", " "))
    print()
    print("| backend | load | in flight | acked/s (median) | p99 ms (median) | runs with p99 ≤ 50 ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    loads = {}
    for backend, _, g in found:
        for r in g["nanochat"]:
            loads.setdefault((backend, r["senders"], r["window"]), []).append(r)
    for (backend, senders, window), runs in loads.items():
        ok = sum(r["p99_ms"] <= P99_LIMIT_MS for r in runs)
        print(f'| {backend} | {senders} × {window} | {senders * window} '
              f'| {statistics.median(r["acked_per_s"] for r in runs):,.0f} '
              f'| {statistics.median(r["p99_ms"] for r in runs):.0f} | {ok} of {len(runs)} |'
              .replace(",", " "))


if __name__ == "__main__":
    main()
