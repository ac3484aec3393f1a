"""torch.compile against eager on CPU, in interleaved rounds: the chunked ``M`` layer (Mamba-3 SISO, Mamba-2,
Mamba-3 MIMO R=2) forward+backward at issue 15's shape, with time / floor, and the quickstart model's training
step (what ``train.compile`` would compile).

Layers: batch 8, length 1024, d_model 128, d_state 32, headdim 32 (expand 2, chunk 64), the ``chunked`` backend.
The floor is the FLOPs ``hybridnas bench`` counts (FlopCounterMode: the matmuls) at the GEMM peak measured at the
start of the run (best 2048x2048 fp32 matmul), as ``hybridnas bench`` prints it.

Model: the quickstart space's ``MA`` at d_model 64 (``M``: d_state 16, headdim 16; ``A``: 2 heads), vocab 64,
MQAR's length 32, batch 64: forward, the trainer's masked loss, backward, AdamW step. The compiled model is
``torch.compile(model)``, as the trainer compiles it; its first step (the compile) is timed apart.

Each round times every variant back to back (``--passes`` calls, median), the order alternating between rounds;
the figures are the median over rounds and the best round. The 1-minute load average is printed at the start
and after every round: on a shared machine the figures are only as good as that.

    python experiments/compile/bench_compile.py [--rounds 5] [--passes 5] [--only layers|model]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from hybridnas import bench, registry  # noqa: E402
from hybridnas.model import HybridLM  # noqa: E402
from hybridnas.runtime import tune_malloc  # noqa: E402
from hybridnas.schema import ModelConfig, TrainConfig  # noqa: E402
from hybridnas.train import make_optimizer  # noqa: E402

LAYERS = {
    "mamba3 SISO": {"d_state": 32, "headdim": 32, "backend": "chunked"},
    "mamba2": {"variant": "mamba2", "d_state": 32, "headdim": 32, "backend": "chunked"},
    "mamba3 MIMO R=2": {"d_state": 32, "headdim": 32, "mimo_rank": 2, "backend": "chunked"},
}
BATCH, SEQ, D_MODEL = 8, 1024, 128


def load() -> str:
    return f"load {os.getloadavg()[0]:.2f}"


def timed(fn, passes: int) -> float:
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleave(cells: dict, rounds: int, passes: int) -> tuple[dict[str, float], dict[str, float]]:
    """``cells``: name -> zero-argument callable; the median and the minimum over rounds of each one's median of
    passes (on a loaded machine the best round is the least disturbed one)."""
    out: dict[str, list[float]] = {k: [] for k in cells}
    names = list(cells)
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            out[name].append(timed(cells[name], passes))
        print(f"  round {i + 1}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in out.items()) + f"  ({load()})",
              flush=True)
    return {k: statistics.median(v) for k, v in out.items()}, {k: min(v) for k, v in out.items()}


def layer_rows(rounds: int, passes: int, peak: float) -> None:
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=torch.Generator().manual_seed(0))
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    for name, params in LAYERS.items():
        torch.manual_seed(0)
        layer = registry.get("M").build(D_MODEL, params)
        flops = bench.count_flops(layer, x, ("fwd+bwd",), None)[1]
        torch._dynamo.reset()
        compiled = torch.compile(layer)

        def step(module, owner=layer):
            def run() -> None:
                owner.zero_grad(set_to_none=True)
                module(x).backward(gy)
            return run

        t0 = time.perf_counter()
        step(compiled)()
        compile_s = time.perf_counter() - t0
        floor = flops / peak  # seconds
        print(f"{name}: {flops / 1e9:.2f} GFLOP fwd+bwd counted, floor {floor * 1e3:.1f} ms; "
              f"compile (first call) {compile_s:.0f} s", flush=True)
        res, best = interleave({"eager": step(layer), "compiled": step(compiled)}, rounds, passes)
        for label, r in (("median of rounds", res), ("best round", best)):
            e, c = r["eager"], r["compiled"]
            print(f"{name} ({label}): fwd+bwd eager {e * 1e3:.1f} ms ({e / floor:.2f}x the floor), compiled "
                  f"{c * 1e3:.1f} ms ({c / floor:.2f}x the floor), compiled {e / c:.2f}x faster", flush=True)


def model_rows(rounds: int, passes: int) -> None:
    cfg = ModelConfig(vocab_size=64, d_model=64, pattern="MA",
                      layers={"M": {"d_state": 16, "headdim": 16}, "A": {"n_heads": 2}})
    tcfg = TrainConfig(lr=3e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (64, 32), generator=g)
    labels = torch.where(torch.rand(64, 32, generator=g) < 0.2, torch.randint(0, 64, (64, 32), generator=g), -100)
    torch.manual_seed(0)
    eager = HybridLM(cfg).train()
    twin = copy.deepcopy(eager)
    opts = {"eager": make_optimizer(eager, tcfg), "compiled": make_optimizer(twin, tcfg)}
    torch._dynamo.reset()
    fwd = {"eager": eager, "compiled": torch.compile(twin)}

    def step(name):
        def run() -> None:
            logits = fwd[name](ids)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
        return run

    t0 = time.perf_counter()
    step("compiled")()
    compile_s = time.perf_counter() - t0
    print(f"quickstart MA d64 batch 64 length 32 training step: compile (first step) {compile_s:.0f} s", flush=True)
    res, best = interleave({"eager": step("eager"), "compiled": step("compiled")}, rounds, passes)
    for label, r in (("median of rounds", res), ("best round", best)):
        e, c = r["eager"], r["compiled"]
        gain = e - c
        even = f", compile repaid after {compile_s / gain:.0f} steps" if gain > 0 else ", compile never repaid"
        print(f"quickstart step ({label}): eager {e * 1e3:.2f} ms, compiled {c * 1e3:.2f} ms, compiled "
              f"{e / c:.2f}x faster{even} (a quickstart trial trains 600 steps, 3 rates for the first quarter)",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--model-passes", type=int, default=20)
    ap.add_argument("--only", choices=("layers", "model"))
    args = ap.parse_args()
    tune_malloc()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {load()}", flush=True)
    if args.only != "model":
        peak = bench.gemm_peak(torch.device("cpu"), torch.float32, 2048)
        print(f"GEMM peak {peak:.1f} GFLOP/s (2048x2048 fp32 matmul, best of 3)", flush=True)
        layer_rows(args.rounds, args.passes, peak * 1e9)
    if args.only != "layers":
        model_rows(args.rounds, args.model_passes)
    print(f"end: {load()}")


if __name__ == "__main__":
    main()
