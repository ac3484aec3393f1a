"""Reduced MAD protocol on CPU: rank hybrid designs by the MAD composite, then bits per byte of the best and
worst on the shipped text. Run from the repository root:

    python experiments/mad_ranking/run.py [--designs AFAF,HFAF] [--steps 400] [--out experiments/mad_ranking]

Writes ``results.json`` and ``table.md`` in ``--out``; see README.md there for the protocol and the findings.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from hybridnas import patterns, registry
from hybridnas.config import ArchConfig, ModelConfig, TaskSpec, TrainConfig
from hybridnas.model import HybridLM
from hybridnas.tasks import build_task
from hybridnas.trainers import trainer_for

# name -> (pattern, what MAD calls it)
DESIGNS = {  # in order of expected cost, slowest first, so parallel workers finish together
    "MFMF": "Mamba (non-striped)",
    "RFRF": "RWKV-7 (non-striped)",
    "M-ME": "Mamba with MLP and MoE (Jamba-style)",
    "MFAF": "striped Mamba + attention",
    "HFHF": "Hyena (non-striped)",
    "HFAF": "striped Hyena + attention",
    "AFAF": "Transformer",
}
STRIPED = {"HFAF", "MFAF"}

# The reduced protocol: all six tasks at a shortened baseline, one setting each (see README.md).
MAD_TASK = {
    "common": {"num_train": 4000, "num_test": 256, "seed": 12345},
    "params": {
        "in_context_recall": {"seq_len": 32},
        "fuzzy_in_context_recall": {"seq_len": 32},
        "noisy_in_context_recall": {"seq_len": 32},
        "selective_copying": {"seq_len": 32, "num_tokens_to_copy": 4},
        "compression": {"seq_len": 16},
        "memorization": {"num_train": 256},
    },
}
LAYERS = {"A": {"n_heads": 4}, "F": {"expand": 2}, "E": {"n_experts": 4, "top_k": 2, "expand": 2}}
LM_TASK = {"path": "data/prose.txt", "seq_len": 128, "split_block": 1024, "valid_fraction": 0.1}


def train_cfg(steps: int, **kw) -> TrainConfig:
    # one torch thread: on a shared 2-core machine two threads spin against other processes (10x slower)
    return TrainConfig(**{"steps": steps, "batch_size": 16, "lr": 3e-3, "weight_decay": 0.0, "warmup_steps": 30,
                          "eval_every": max(steps // 4, 1), "target_accuracy": 0.999, "seed": 0, "device": "cpu",
                          "threads": 1, **kw})


def available(pattern: str) -> list[str]:
    known = set(registry.symbols())
    return [s for s in patterns.used_symbols(pattern) if s not in known]


def mad_row(name: str, d_model: int, steps: int) -> tuple[str, dict | str]:
    """Train one design on the reduced suite (in a worker process); a row, or why it did not run."""
    torch.set_num_threads(1)
    lacking = available(name)
    if lacking:
        return name, f"symbol(s) {lacking} not registered"
    task = TaskSpec("mad", MAD_TASK)
    data = build_task("mad", task.build_config())
    used = set(patterns.used_symbols(name))
    model = ModelConfig(vocab_size=data.vocab_size, d_model=d_model, pattern=name,
                        layers={k: v for k, v in LAYERS.items() if k in used})
    arch = ArchConfig(model, task, train_cfg(steps), name=name)
    t0 = time.perf_counter()
    try:
        res = trainer_for("mad")(arch, data, on_eval=lambda step, ev: print(
            f"  {name} step {step:5d}  running accuracy {ev['accuracy']:.3f}  {time.perf_counter() - t0:.0f} s",
            flush=True))
    except Exception as e:  # noqa: BLE001  (a layer still in progress must not sink the other rows)
        return name, f"{type(e).__name__}: {e}"[:300]
    return name, {"design": name, "kind": DESIGNS.get(name, ""), "composite": res.metrics["accuracy"],
                  "composite_macro": res.metrics["accuracy_macro"], "params": HybridLM.param_count(model),
                  "seconds": time.perf_counter() - t0,
                  **{k.split("/")[1]: v for k, v in res.attrs.items() if k.count("/") == 1}}


def lm_row(name: str, d_model: int, steps: int) -> tuple[str, dict]:
    torch.set_num_threads(1)
    lm_task = TaskSpec("lm", LM_TASK)
    lm_data = build_task("lm", lm_task.build_config())
    used = set(patterns.used_symbols(name))
    model = ModelConfig(vocab_size=lm_data.vocab_size, d_model=d_model, pattern=name,
                        layers={k: v for k, v in LAYERS.items() if k in used})
    arch = ArchConfig(model, lm_task, train_cfg(steps, target_accuracy=None, eval_every=max(steps // 3, 1)),
                      name=name)
    t0 = time.perf_counter()
    res = trainer_for("lm")(arch, lm_data)
    return name, {"bits_per_byte": res.metrics.get("bits_per_byte"), "loss": res.metrics["loss"],
                  "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--designs", default=",".join(DESIGNS))
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lm-steps", type=int, default=300)
    p.add_argument("--jobs", type=int, default=2, help="worker processes, one torch thread each")
    p.add_argument("--out", default="experiments/mad_ranking")
    p.add_argument("--lm-only", action="store_true", help="keep the MAD rows of --out/results.json, redo the LM runs")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    names = args.designs.split(",")
    rows, missing, mad_seconds = [], {}, None
    if args.lm_only:
        prev = json.loads((out / "results.json").read_text())
        rows, missing, mad_seconds = prev["rows"], prev["missing"], prev.get("mad_seconds", prev["wall_seconds"])
        names = []
    # slowest designs first so the two workers finish together
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        for name, row in pool.map(mad_row, names, [args.d_model] * len(names), [args.steps] * len(names)):
            if isinstance(row, str):
                missing[name] = row
                print(f"not run {name}: {row}", flush=True)
            else:
                rows.append(row)
                print(json.dumps(row), flush=True)
        rows.sort(key=lambda r: -r["composite"] if math.isfinite(r["composite"]) else math.inf)
        if mad_seconds is None:
            mad_seconds = time.perf_counter() - t_all
        lm = {}
        if rows and args.lm_steps > 0:
            picks = [rows[0]["design"]] + ([rows[-1]["design"]] if len(rows) > 1 else [])
            for name, v in pool.map(lm_row, picks, [args.d_model] * len(picks), [args.lm_steps] * len(picks)):
                lm[name] = v
                print(f"lm {name}: {v}", flush=True)

    wall = time.perf_counter() - t_all
    if args.lm_only:
        wall = mad_seconds + wall
    result = {"rows": rows, "missing": missing, "lm": lm, "wall_seconds": wall, "mad_seconds": mad_seconds,
              "d_model": args.d_model,
              "steps": args.steps, "lm_steps": args.lm_steps, "jobs": args.jobs, "mad_task": MAD_TASK,
              "lm_task": LM_TASK, "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cpus"}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "table.md").write_text(render(result))
    print(render(result))


TASK_COLS = [("in_context_recall", "CR"), ("fuzzy_in_context_recall", "FR"), ("noisy_in_context_recall", "NR"),
             ("selective_copying", "SC"), ("compression", "C"), ("memorization", "M")]


def render(result: dict) -> str:
    head = "| rank | design | kind | params | " + " | ".join(c for _, c in TASK_COLS) + " | composite | s |"
    lines = [head, "|" + "---|" * (len(TASK_COLS) + 6)]
    for i, r in enumerate(result["rows"], 1):
        cells = " | ".join(f"{r.get(t, math.nan):.3f}" for t, _ in TASK_COLS)
        lines.append(f"| {i} | `{r['design']}` | {r['kind']} | {r['params']:,} | {cells} | "
                     f"**{r['composite']:.3f}** | {r['seconds']:.0f} |")
    for name, why in result["missing"].items():
        lines.append(f"| - | `{name}` | {DESIGNS.get(name, '')} | - | " + " | ".join("-" for _ in TASK_COLS)
                     + f" | not run: {why} | - |")
    lines.append("")
    lines.append(f"Wall time: {result['wall_seconds']:.0f} s in all, {result['mad_seconds']:.0f} s of it the MAD rows.")
    for name, v in result["lm"].items():
        lines.append(f"LM on `{result['lm_task']['path']}`, `{name}`: {v['bits_per_byte']:.3f} bits per byte "
                     f"(validation loss {v['loss']:.3f} nats/byte, {v['seconds']:.0f} s).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
