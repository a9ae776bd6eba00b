#!/usr/bin/env python3
"""Draw benches/fanout.svg from the sweep summaries of benches/run-fanout.sh.

Reads JSON lines on stdin, keeps those with "scenario": "sweep", and draws one group of bars
per room shape: the highest deliveries/s each server sustained with no loss and p99 <= 200 ms.
Usage: benches/run-fanout.sh | tee fanout.jsonl; benches/fanout-chart.py < fanout.jsonl > benches/fanout.svg
"""
import json
import sys

TARGETS = [("bare", "bare tokio + tungstenite", "#9e9e9e"),
           ("nanochat", "NanoChat (SQLite, every message stored)", "#1565c0"),
           ("node", "Node.js ws", "#ef6c00")]

rows = [json.loads(line) for line in sys.stdin if line.strip().startswith("{")]
best = {}
for r in rows:
    if r.get("scenario") == "sweep" and r.get("max_deliveries_per_s") is not None:
        best[(f'{r["rooms"]} x {r["members"]}', r["target"])] = r["max_deliveries_per_s"]
shapes = sorted({shape for shape, _ in best}, key=lambda s: -int(s.split(" x ")[1]))
top = max(best.values(), default=1)
W, H, left, bottom, plot_h = 720, 320, 70, 250, 200
group = (W - left - 20) / max(len(shapes), 1)
bar = group / (len(TARGETS) + 1)
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
       'font-family="sans-serif" font-size="11">', f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13">Fan-out: highest deliveries/s '
       'with no loss and p99 &#8804; 200 ms (higher is better)</text>']
for i in range(5):
    v = top * i / 4
    y = bottom - plot_h * i / 4
    out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{W - 20}" y2="{y:.1f}" stroke="#ddd"/>'
               f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{v / 1000:.0f}k</text>')
for g, shape in enumerate(shapes):
    x0 = left + g * group + bar / 2
    for t, (target, _, color) in enumerate(TARGETS):
        v = best.get((shape, target))
        if v is None:
            continue
        h = plot_h * v / top
        x = x0 + t * bar
        out.append(f'<rect x="{x:.1f}" y="{bottom - h:.1f}" width="{bar * 0.9:.1f}" height="{h:.1f}" '
                   f'fill="{color}"/><text x="{x + bar * 0.45:.1f}" y="{bottom - h - 4:.1f}" '
                   f'text-anchor="middle" font-size="10">{v / 1000:.0f}k</text>')
    out.append(f'<text x="{x0 + bar * 1.5:.1f}" y="{bottom + 16}" text-anchor="middle">rooms x members: '
               f'{shape}</text>')
x = left
for _, label, color in TARGETS:
    out.append(f'<rect x="{x}" y="{H - 30}" width="12" height="12" fill="{color}"/>'
               f'<text x="{x + 16}" y="{H - 20}">{label}</text>')
    x += 16 + 6.2 * len(label) + 24  # about 6 px per character at this size
out.append("</svg>")
print("\n".join(out))
