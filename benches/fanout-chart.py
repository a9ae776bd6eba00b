#!/usr/bin/env python3
"""Summarise the sweeps of benches/run-fanout.sh: an SVG chart, or the results table.

Reads JSON lines on stdin and keeps those with "scenario": "sweep". A round of
run-fanout.sh sweeps every target once per room shape, and the script repeats the round, so
each (shape, target) usually has several sweeps: both outputs use their median, and the table
also shows the range and the median machine steal (CPU time the VM host took away).
Usage:
  benches/run-fanout.sh | tee fanout.jsonl
  benches/fanout-chart.py < fanout.jsonl > benches/fanout.svg
  benches/fanout-chart.py --table < fanout.jsonl
"""
import json
import statistics
import sys
from xml.sax.saxutils import escape

from machine import caption

TARGETS = [("bare", "bare tokio + tungstenite", "#9e9e9e"),
           ("bare-nodelay", "the same, TCP_NODELAY", "#cfcfcf"),
           ("nanochat", "NanoChat (SQLite, every message stored)", "#1565c0"),
           ("node", "Node.js ws", "#ef6c00")]


def sweeps(lines):
    """{(shape, target): [max deliveries/s of each sweep]}, the steal of each passing maximum,
    and the machine records (benches/machine.py). A sweep with no passing run counts as 0, so a
    failure pulls the median down."""
    found, steal, machines = {}, {}, []
    for line in lines:
        if not line.strip().startswith("{"):
            continue
        r = json.loads(line)
        if r.get("scenario") == "machine":
            machines.append(r)
        if r.get("scenario") != "sweep":
            continue
        key = (f'{r["rooms"]} x {r["members"]}', r["target"])
        found.setdefault(key, []).append(r.get("max_deliveries_per_s") or 0)
        if r.get("steal_pct_at_max") is not None:
            steal.setdefault(key, []).append(r["steal_pct_at_max"])
    return found, steal, machines


def shapes_of(found):
    return sorted({shape for shape, _ in found}, key=lambda s: -int(s.split(" x ")[1]))


def table(found, steal, machines):
    med = {k: statistics.median(v) for k, v in found.items()}
    # The bare server with TCP_NODELAY gets columns only when the sweeps include it.
    nodelay = any(t == "bare-nodelay" for _, t in found)
    extra = (" bare, `TCP_NODELAY` |", " NanoChat / bare-nodelay |") if nodelay else ("", "")
    out = [line + "\n" for line in caption(machines)]
    out += [f"| room shape | bare (deliveries/s) |{extra[0]} Node `ws` | NanoChat | NanoChat / bare |"
           f"{extra[1]} NanoChat / Node | sweeps | steal |",
           "| --- " * (8 + 2 * nodelay) + "|"]

    def cell(shape, target):
        v = found.get((shape, target))
        if not v:
            return "-"
        if len(v) == 1:
            return f"{med[(shape, target)]:,.0f}"
        return f"{med[(shape, target)]:,.0f} ({min(v):,.0f}–{max(v):,.0f})"

    def ratio(shape, a, b):
        x, y = med.get((shape, a)), med.get((shape, b))
        if not x or not y:
            return "-"
        return f"{x / y:.0%}" if b.startswith("bare") else f"{x / y:.1f}×"

    for shape in shapes_of(found):
        n = max(len(found.get((shape, t), [])) for t, _, _ in TARGETS)
        s = [x for t, _, _ in TARGETS for x in steal.get((shape, t), [])]
        st = f"{statistics.median(s):.0f}%" if s else "-"
        bare_nd = f" {cell(shape, 'bare-nodelay')} |" if nodelay else ""
        ratio_nd = f" {ratio(shape, 'nanochat', 'bare-nodelay')} |" if nodelay else ""
        out.append(f"| {shape} | {cell(shape, 'bare')} |{bare_nd} {cell(shape, 'node')} | "
                   f"{cell(shape, 'nanochat')} | **{ratio(shape, 'nanochat', 'bare')}** |{ratio_nd} "
                   f"**{ratio(shape, 'nanochat', 'node')}** | {n} | {st} |")
    return "\n".join(out)


def chart(found, machines):
    best = {k: statistics.median(v) for k, v in found.items()}
    shapes = shapes_of(found)
    top = max(best.values(), default=1) or 1
    targets = [t for t in TARGETS if any(k[1] == t[0] for k in best)]
    W, H, left, bottom, plot_h = 860, 320, 70, 250, 200
    group = (W - left - 20) / max(len(shapes), 1)
    bar = group / (len(targets) + 1)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="11">', f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13">Fan-out: highest deliveries/s '
           'with no loss and p99 &#8804; 200 ms (median of sweeps; higher is better)</text>']
    for i, line in enumerate(caption(machines)[:2]):
        out.append(f'<text x="{W / 2}" y="{32 + 11 * i}" text-anchor="middle" font-size="9" '
                   f'fill="#555">{escape(line)}</text>')
    for i in range(5):
        v = top * i / 4
        y = bottom - plot_h * i / 4
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{W - 20}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{v / 1000:.0f}k</text>')
    for g, shape in enumerate(shapes):
        x0 = left + g * group + bar / 2
        for t, (target, _, color) in enumerate(targets):
            v = best.get((shape, target))
            if v is None:
                continue
            h = plot_h * v / top
            x = x0 + t * bar
            out.append(f'<rect x="{x:.1f}" y="{bottom - h:.1f}" width="{bar * 0.9:.1f}" height="{h:.1f}" '
                       f'fill="{color}"/><text x="{x + bar * 0.45:.1f}" y="{bottom - h - 4:.1f}" '
                       f'text-anchor="middle" font-size="10">{v / 1000:.0f}k</text>')
        out.append(f'<text x="{x0 + bar * (len(targets) - 1) / 2 + bar * 0.45:.1f}" y="{bottom + 16}" '
                   'text-anchor="middle">rooms x members: '
                   f'{shape}</text>')
    x = left
    for _, label, color in targets:
        out.append(f'<rect x="{x}" y="{H - 30}" width="12" height="12" fill="{color}"/>'
                   f'<text x="{x + 16}" y="{H - 20}">{label}</text>')
        x += 16 + 6.2 * len(label) + 24  # about 6 px per character at this size
    out.append("</svg>")
    return "\n".join(out)


if __name__ == "__main__":
    found, steal, machines = sweeps(sys.stdin)
    print(table(found, steal, machines) if "--table" in sys.argv[1:] else chart(found, machines))
