"""Issue 7 measurements on a GPU: accuracy of the Triton kernels (fp32 and bf16) against the fp32 naive oracle,
then ``hybridnas bench`` speed of chunked vs triton vs the optional peers, at one realistic shape per mixer.

    python experiments/kernels/run_gpu.py                 # on a CUDA machine (H100): everything, ~10-20 min
    TRITON_INTERPRET=1 python experiments/kernels/run_gpu.py --smoke   # CPU, tiny: checks the script itself

Writes ``<out>/accuracy.json``, ``<out>/bench_*.json`` and ``<out>/summary.md`` (default out:
``experiments/kernels/results``). Accuracy is the relative error ``||got - ref|| / ||ref||`` per tensor (output,
final state, every input gradient), where ``ref`` is the naive token loop in fp32 on inputs already rounded to
the tested dtype, so only the kernel's own error is measured. Peers that are not installed are rows that say so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hybridnas import bench  # noqa: E402
from layers.ops import dispatch  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def mamba3_case(dev, dtype, t_len, r, h, p, n, seed=0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    s = n // 4
    dt = torch.nn.functional.softplus(torch.randn(2, t_len, h, generator=g) - 2.0)
    inp = {"x": torch.randn(2, t_len, h, p, generator=g), "q": torch.randn(2, t_len, r, h, n, generator=g) / n ** .5,
           "k": torch.randn(2, t_len, r, h, n, generator=g) / n ** .5,
           "a": -4 * torch.rand(2, t_len, h, generator=g) * dt, "dt": dt, "lam": torch.rand(2, t_len, h, generator=g),
           "dtheta": 0.3 * torch.randn(2, t_len, h, s, generator=g), "w_x": torch.randn(r, h, p, generator=g) / r}
    state = {"angle": 2 * math.pi * torch.rand(2, h, s, generator=g), "ssm": torch.randn(2, h, p, n, generator=g),
             "k": torch.randn(2, r, h, n, generator=g), "v": torch.randn(2, h, p, generator=g)}
    inp = {k: v.to(dev, dtype) for k, v in inp.items()}
    state = {k: v.to(dev, torch.float32 if k in ("angle", "ssm") else dtype) for k, v in state.items()}
    return inp, state


def mamba3_errors(dev, dtype, t_len, r, pairing, h=4, p=64, n=128, chunk=64) -> dict[str, float]:
    from layers.ops.mamba3.naive import mamba3_naive
    from layers.ops.mamba3.triton import mamba3_triton

    inp, state = mamba3_case(dev, dtype, t_len, r, h, p, n)
    names = ("x", "q", "k", "a", "dt", "lam", "dtheta")
    out = {}
    for tag, fn, cast in (("ref", mamba3_naive, torch.float32), ("tri", mamba3_triton, dtype)):
        leaves = {k: v.detach().to(cast).requires_grad_(True) for k, v in inp.items()}
        st = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in state.items()}
        y, new = fn(*(leaves[k] for k in names), st, leaves["w_x"], pairing=pairing, chunk_size=chunk)
        g = torch.Generator().manual_seed(7)
        loss = (y.float() * torch.randn(y.shape, generator=g).to(dev)).sum()
        loss = loss + (new["ssm"] * torch.randn(new["ssm"].shape, generator=g).to(dev)).sum()
        grads = torch.autograd.grad(loss, [*leaves.values(), st["ssm"]])
        out[tag] = {"y": y.float(), "final_state": new["ssm"],
                    **{f"d{k}": gr.float() for k, gr in zip([*leaves, "state.ssm"], grads)}}
    return {k: rel(out["tri"][k], out["ref"][k]) for k in out["ref"]}


def mamba2_errors(dev, dtype, t_len, h=8, p=64, n=128, chunk=64) -> dict[str, float]:
    from layers.ops.mamba2.naive import ssd_naive
    from layers.ops.mamba2.triton import ssd_triton

    g = torch.Generator().manual_seed(1)
    base = {"x": torch.randn(2, t_len, h, p, generator=g),
            "dt": torch.nn.functional.softplus(torch.randn(2, t_len, h, generator=g) - 2.0),
            "A": -torch.empty(h).uniform_(1.0, 16.0, generator=g),
            "B": torch.randn(2, t_len, 1, n, generator=g) / n ** .5,
            "C": torch.randn(2, t_len, 1, n, generator=g) / n ** .5, "state": torch.randn(2, h, p, n, generator=g)}
    base = {k: v.to(dev, torch.float32 if k == "state" else dtype) for k, v in base.items()}
    out = {}
    for tag, fn, cast in (("ref", ssd_naive, torch.float32), ("tri", ssd_triton, dtype)):
        leaves = {k: v.detach().to(torch.float32 if k == "state" else cast).requires_grad_(True)
                  for k, v in base.items()}
        y, s = fn(*leaves.values(), chunk_size=chunk)
        gen = torch.Generator().manual_seed(7)
        loss = (y.float() * torch.randn(y.shape, generator=gen).to(dev)).sum()
        loss = loss + (s * torch.randn(s.shape, generator=gen).to(dev)).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()))
        out[tag] = {"y": y.float(), "final_state": s, **{f"d{k}": gr.float() for k, gr in zip(leaves, grads)}}
    return {k: rel(out["tri"][k], out["ref"][k]) for k in out["ref"]}


def accuracy(dev, smoke: bool) -> dict[str, Any]:
    dtypes = [torch.float32] if dev.type == "cpu" else [torch.float32, torch.bfloat16]
    t_len = 37 if smoke else 1000  # not a multiple of the chunk: the partial last chunk is exercised
    dims = {"h": 2, "p": 16, "n": 16, "chunk": 16} if smoke else {}
    res: dict[str, Any] = {}
    for dtype in dtypes:
        dn = str(dtype).removeprefix("torch.")
        res[f"mamba2/{dn}"] = mamba2_errors(dev, dtype, t_len, **dims)
        for r, pairing, chunk in ((1, "interleaved", 64), (4, "half", 16)):
            d = {**dims} if smoke else {"chunk": chunk}
            res[f"mamba3-R{r}/{dn}"] = mamba3_errors(dev, dtype, t_len, r, pairing, **d)
    return res


BENCHES = [  # (name, symbol, params, backends)
    ("mamba3_siso", "M", "variant=mamba3,mimo_rank=1,d_state=128,headdim=64",
     "chunked,triton,mamba-ssm-mamba3,fla-simple-gla,mamba-ssm-ssd"),
    ("mamba3_mimo4", "M", "variant=mamba3,mimo_rank=4,d_state=128,headdim=64,chunk_size=16",
     "chunked,triton,mamba-ssm-mamba3"),
    ("mamba2", "M", "variant=mamba2,d_state=128,headdim=64", "chunked,triton,mamba-ssm-ssd,fla-simple-gla"),
    ("rwkv7", "R", "head_size=64", "chunked,triton,fla-rwkv7"),
    ("attention", "A", "n_heads=16", "auto,sdpa"),
]


def speed(dev, smoke: bool, out: Path, log) -> list[str]:
    lines = []
    for name, symbol, params, backends in BENCHES:
        kw: dict[str, Any] = ({"batch": 1, "d_model": 64, "repeat": 1, "warmup": 0} if smoke else
                              {"batch": 8, "d_model": 1024, "repeat": 10, "warmup": 3, "budget": 60.0})
        p = bench.parse_params(params)
        if smoke:  # tiny heads so the CPU interpreter finishes
            p.update({"d_state": 16, "headdim": 16} if symbol == "M" else {"head_size": 16} if symbol == "R"
                     else {"n_heads": 4})
        seq_lens = [33] if smoke else [512, 2048, 8192]
        res = bench.run_bench(symbol, p, backends.split(","), seq_lens, device=str(dev),
                              dtype="float32" if dev.type == "cpu" else "bf16", log=log, **kw)
        (out / f"bench_{name}.json").write_text(res.to_json())
        lines += [f"### {name}", "", "```", bench.format_table(res), "```", ""]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device (CPU: TRITON_INTERPRET=1)")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not args.smoke:
        print("no CUDA device: speed and bf16 accuracy need a GPU (use --smoke to check the script)", file=sys.stderr)
        return 2
    if not dispatch.triton_usable(dev):
        print("triton cannot run here (install triton; on CPU set TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    head = [f"# Issue 7 kernels: {when}, {gpu}, torch {torch.__version__}",
            f"TRITON_F32_DEFAULT={os.environ.get('TRITON_F32_DEFAULT', '(unset: tf32 dots in fp32)')}", ""]
    acc = accuracy(dev, args.smoke)
    (out / "accuracy.json").write_text(json.dumps(acc, indent=2))
    lines = [*head, "## Accuracy: relative error vs the fp32 naive oracle", "", "| case | worst tensor | error |",
             "|---|---|---|"]
    for case, errs in acc.items():
        worst = max(errs, key=errs.get)
        lines.append(f"| {case} | {worst} | {errs[worst]:.2e} |")
    lines += ["", "all tensors: accuracy.json", ""]
    print("\n".join(lines), flush=True)
    if not args.skip_speed:
        lines += ["## Speed (hybridnas bench; speed-ups vs the first backend)", ""]
        lines += speed(dev, args.smoke, out, lambda s: print(s, flush=True))
    lines.append(f"total {time.time() - t0:.0f} s")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
