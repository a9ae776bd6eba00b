#!/usr/bin/env python3
"""What a benchmark ran on, as one JSON line ("scenario": "machine"): the date (UTC), the
commit ("-dirty" when the tree had uncommitted changes), the number of CPUs and their model,
and the kernel. benches/run-fanout.sh and benches/run-publish.sh print it before their runs;
fanout-chart.py and publish-table.py put it above what they draw, so a table pasted into
benches/README.md carries where its numbers come from.
Usage:
  benches/machine.py
"""
import json
import os
import platform
import subprocess
import time


def record():
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                text=True, check=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"scenario": "machine", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": commit, "cpus": os.cpu_count(), "cpu_model": model,
            "kernel": platform.release()}


def caption(records):
    """One sentence per distinct machine record (input order), for the top of a table or chart."""
    out = []
    for r in records:
        line = (f'Measured {r.get("date", "?")} at commit {r.get("commit", "?")} on '
                f'{r.get("cpus", "?")} CPUs ({r.get("cpu_model", "?")}), Linux {r.get("kernel", "?")}.')
        if line not in out:
            out.append(line)
    return out


if __name__ == "__main__":
    print(json.dumps(record()))
