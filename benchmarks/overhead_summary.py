"""Markdown table of interleaved overhead runs (``benchmarks/results/overhead/run_interleaved.sh``).

    python -m benchmarks.overhead_summary benchmarks/results/overhead

Every JSON there is one ``overhead.py`` invocation (one side, one round); each ratio is to the
unguarded run of the same invocation. Shown per side: the values of each round.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def main() -> None:
    folder = Path(sys.argv[1])
    cells: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(folder.glob("*.json")):
        side = path.stem.split("-")[1]  # smollm2-<side>-r<round>
        for mode, r in json.loads(path.read_text())["results"]["full"].items():
            base = json.loads(path.read_text())["results"]["full"]["unguarded"]
            cells[(mode, side)]["amortized"].append(r["mean_s"] / base["mean_s"])
            cells[(mode, side)]["per-step (median)"].append(r["median_s"] / base["median_s"])
            if "hot_mean_s" in r:
                cells[(mode, side)]["hot path (mean, no check)"].append(r["hot_mean_s"] / base["hot_mean_s"])
            cells[(mode, side)]["check steps"].append(r["check_steps"])
            cells[(mode, side)]["unguarded s/step"].append(base["median_s"])
    keys = ["unguarded s/step", "per-step (median)", "hot path (mean, no check)", "amortized", "check steps"]
    print("| mode | code | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for (mode, side), vals in sorted(cells.items(), key=lambda kv: (kv[0][0] != "unguarded", kv[0][0], kv[0][1] != "before")):
        row = [", ".join(f"{v:.3f}" for v in vals.get(k, [])) or "-" for k in keys]
        print(f"| {mode} | {side} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
