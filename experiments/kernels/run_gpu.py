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
    return triton_vs_naive(base, ("state",), ssd_naive, ssd_triton, dtype, chunk_size=chunk)


def triton_vs_naive(base: dict[str, torch.Tensor], fp32_keys: tuple[str, ...], naive, triton_fn, dtype,
                    **kwargs) -> dict[str, float]:
    """Relative errors of ``triton_fn`` against ``naive`` (run in fp32) for the output, the final state and the
    gradient of every input, under one random weighting of ``y`` and the state: both take ``base``'s values as
    positional leaves (``fp32_keys`` stay fp32 for both, the rest are cast to ``dtype`` for the kernel) and
    return ``(y, state)``."""
    out = {}
    for tag, fn, cast in (("ref", naive, torch.float32), ("tri", triton_fn, dtype)):
        leaves = {k: v.detach().to(torch.float32 if k in fp32_keys else cast).requires_grad_(True)
                  for k, v in base.items()}
        y, s = fn(*leaves.values(), **kwargs)
        gen = torch.Generator().manual_seed(7)
        loss = (y.float() * torch.randn(y.shape, generator=gen).to(y.device)).sum()
        loss = loss + (s * torch.randn(s.shape, generator=gen).to(s.device)).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()))
        out[tag] = {"y": y.float(), "final_state": s, **{f"d{k}": gr.float() for k, gr in zip(leaves, grads)}}
    return {k: rel(out["tri"][k], out["ref"][k]) for k in out["ref"]}


def selective_scan_case(dev, dtype, bsz, t_len, d, n, seed=2) -> dict[str, torch.Tensor]:
    """Mamba-1 inputs: S4D-Real ``A = -(1..N)`` per channel, small positive Δ (softplus), B and C ~ N(0, 1/N);
    u, Δ, B, C in ``dtype``, A and the state fp32 (as the layer passes them)."""
    g = torch.Generator().manual_seed(seed)
    base = {"u": torch.randn(bsz, t_len, d, generator=g),
            "delta": torch.nn.functional.softplus(torch.randn(bsz, t_len, d, generator=g) - 3.0),
            "A": -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1),
            "B": torch.randn(bsz, t_len, n, generator=g) / n ** .5,
            "C": torch.randn(bsz, t_len, n, generator=g) / n ** .5,
            "state": torch.randn(bsz, d, n, generator=g)}
    return {k: v.to(dev, torch.float32 if k in ("A", "state") else dtype) for k, v in base.items()}


def selective_scan_errors(dev, dtype, t_len, d=512, n=16, chunk=16) -> dict[str, float]:
    from layers.ops.selective_scan.naive import selective_scan_naive
    from layers.ops.selective_scan.triton import selective_scan_triton

    base = selective_scan_case(dev, dtype, 2, t_len, d, n)
    return triton_vs_naive(base, ("A", "state"), selective_scan_naive, selective_scan_triton, dtype,
                           chunk_size=chunk)


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
        ss = {"d": 20, "n": 8} if smoke else {}  # Mamba-1: D 512 (d_model 256), N 16, chunk 16
        res[f"selective_scan/{dn}"] = selective_scan_errors(dev, dtype, t_len, **ss)
    return res


BENCHES = [  # (name, symbol, params, backends)
    ("mamba3_siso", "M", "variant=mamba3,mimo_rank=1,d_state=128,headdim=64",
     "chunked,triton,mamba-ssm-mamba3,fla-simple-gla,mamba-ssm-ssd"),
    ("mamba3_mimo4", "M", "variant=mamba3,mimo_rank=4,d_state=128,headdim=64,chunk_size=16",
     "chunked,triton,mamba-ssm-mamba3"),
    ("mamba2", "M", "variant=mamba2,d_state=128,headdim=64", "chunked,triton,mamba-ssm-ssd,fla-simple-gla"),
    ("rwkv7", "R", "head_size=64", "chunked,triton,fla-rwkv7"),
    ("mamba1", "M", "variant=mamba1,d_state=16", "chunked,triton"),
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


SS_BACKENDS = ("chunked", "triton", "mamba-ssm")


def _mamba_ssm_scan():
    """``mamba_ssm``'s CUDA selective scan as ``(u, Δ (B, D, T), A, B, C (B, N, T)) -> (y, last state)``, or None
    when the package is not installed."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return lambda u, delta, A, B, C: selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_softplus=False,
                                                       return_last_state=True)


def selective_scan_speed(dev, smoke: bool, out: Path, log) -> list[str]:
    """The op alone (Mamba-1 at d_model 512: D 1024, N 16; batch 8), forward and forward+backward of
    ``(y·g).sum() + (h_T·g').sum()``, median of 10 after 3 warm-ups (60 s cap per cell). mamba_ssm takes its
    channel-major layout, made before timing; it has no initial state, so none is passed to any backend."""
    from layers.ops.selective_scan import BACKENDS

    bsz, d, n = (1, 20, 8) if smoke else (8, 1024, 16)
    seq_lens = [33] if smoke else [512, 2048, 8192]
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    warmup, repeat, budget = (0, 1, None) if smoke else (3, 10, 60.0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    peer = _mamba_ssm_scan()
    rows: list[dict[str, Any]] = []
    for t_len in seq_lens:
        base = selective_scan_case(dev, dtype, bsz, t_len, d, n)
        del base["state"]
        gy = torch.randn(bsz, t_len, d, generator=torch.Generator().manual_seed(1)).to(dev, dtype)
        gs = torch.randn(bsz, d, n, generator=torch.Generator().manual_seed(2)).to(dev)
        first: dict[str, Any] | None = None
        for name in SS_BACKENDS:
            row: dict[str, Any] = {"seq_len": t_len, "backend": name}
            try:
                if name == "mamba-ssm":
                    if peer is None:
                        raise RuntimeError("package 'mamba_ssm' is not installed")
                    cm = {k: (v.transpose(1, 2) if k != "A" else v) for k, v in base.items()}  # (B, D|N, T)
                    leaves = {k: v.detach().contiguous().clone().requires_grad_(True) for k, v in cm.items()}
                    g_out = gy.transpose(1, 2)

                    def call(lv=leaves):
                        return peer(*lv.values())
                else:
                    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in base.items()}
                    g_out = gy

                    def call(lv=leaves, fn=BACKENDS[name]):
                        return fn(*lv.values())

                def fwd(call=call):
                    with torch.no_grad():
                        call()
                    sync()

                def fwd_bwd(call=call, lv=leaves, g_out=g_out, gs=gs):
                    for v in lv.values():
                        v.grad = None
                    y, s = call()
                    ((y * g_out).sum() + (s * gs).sum()).backward()
                    sync()

                row["fwd_s"] = bench._time(fwd, warmup, repeat, budget)
                row["fwd_bwd_s"] = bench._time(fwd_bwd, warmup, repeat, budget)
            except Exception as e:  # one failing backend must not hide the others
                row["error"] = f"{type(e).__name__}: {e}"
            if first is None:
                first = row
            for key, ratio in (("fwd_s", "fwd_speedup"), ("fwd_bwd_s", "fwd_bwd_speedup")):
                if row.get(key) and first.get(key):
                    row[ratio] = first[key] / row[key]
            rows.append(row)
            log(json.dumps(row))
    (out / "bench_selective_scan_op.json").write_text(json.dumps(
        {"batch": bsz, "d": d, "n": n, "dtype": str(dtype), "warmup": warmup, "repeat": repeat, "rows": rows},
        indent=2))

    def ms(row, key):
        return f"{row[key] * 1e3:.2f} ms" if row.get(key) else "-"

    def x(row, key):
        return f"{row[key]:.2f}x" if row.get(key) else "-"

    lines = [f"### selective_scan op (B {bsz}, D {d}, N {n}, {str(dtype).removeprefix('torch.')})", "",
             "| T | backend | fwd | speed-up | fwd+bwd | speed-up | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seq_len']} | {r['backend']} | {ms(r, 'fwd_s')} | {x(r, 'fwd_speedup')} | "
                     f"{ms(r, 'fwd_bwd_s')} | {x(r, 'fwd_bwd_speedup')} | {r.get('error', '')} |")
    return [*lines, ""]


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
        lines += selective_scan_speed(dev, args.smoke, out, lambda s: print(s, flush=True))
    lines.append(f"total {time.time() - t0:.0f} s")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
