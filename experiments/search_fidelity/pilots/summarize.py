"""Side by side: the two single-seed pilots of harder quickstart tasks (8 key-value pairs; the same with
Zoology's training mixture of 2/4/6/8 pairs), each architecture at lr 3e-3 and 1e-2 after 600 steps.

A "flip" is an architecture that solves the task (>= 0.9) at one rate and stays on the plateau (< 0.3) at the other:
the same design, the same seed, a neighbouring rate, and the outcome is all or nothing.

    python experiments/search_fidelity/pilots/summarize.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hybridnas.replay import load_table

HERE = Path(__file__).parent
PILOTS = {"kv8": HERE / "pilot_kv8.csv", "mix": HERE / "pilot_mix.csv"}


def main() -> None:
    tables = {name: [r for r in load_table(str(p)) if r.budget == 1.0] for name, p in PILOTS.items()}
    archs: dict[str, tuple[str, dict]] = {}
    for rows in tables.values():
        for r in rows:
            archs[r.arch_key] = (r.pattern, {k: v for k, v in r.params.items() if k != "pattern"})
    lrs = sorted({r.lr for rows in tables.values() for r in rows})
    head = f"{'pattern':7s} {'params':32s}" + "".join(f" {name}@{lr:g}".rjust(12) for name in tables for lr in lrs)
    print(head)
    flips = {name: 0 for name in tables}
    solved = {name: 0 for name in tables}
    for key, (pattern, params) in sorted(archs.items(), key=lambda kv: (kv[1][0], json.dumps(kv[1][1]))):
        line = f"{pattern:7s} {json.dumps(params):32s}"
        for name, rows in tables.items():
            scores = {r.lr: r.score for r in rows if r.arch_key == key}
            for lr in lrs:
                line += f" {scores[lr]:11.3f}" if lr in scores else f" {'-':>11s}"
            vals = list(scores.values())
            if vals and max(vals) >= 0.9:
                solved[name] += 1
                if min(vals) < 0.3:
                    flips[name] += 1
        print(line)
    for name in tables:
        print(f"{name}: {len({r.arch_key for r in tables[name]})} architectures, {solved[name]} solve at some rate, "
              f"{flips[name]} of those flip to the plateau (< 0.3) at the other rate")


if __name__ == "__main__":
    sys.exit(main())
