"""``hybridnas bench``: time a registered mixer's forward and forward+backward over backends and lengths
(``--decode``: whole patterns decoding after a context, in :mod:`hybridnas.bench_decode`).

Each backend (``naive``, ``chunked``, ``triton``; see ``layers.ops.dispatch``) is forced in turn on the same
layer (built once per length with a fixed seed, from ``registry.get(symbol).build(d_model, params)``).
Optional *peers* are outside implementations timed at the same shape, time only (never compared for
outputs): ``mamba3-ssm`` (PyPI ``mamba3-ssm``, pure PyTorch loops; symbol ``M``, variant ``mamba3``) runs only
when that package imports; ``mamba3-ssm-proj`` is that layer's dense projections alone, a floor no backend beats.
GPU kernel peers (flash-linear-attention, mamba_ssm, PyTorch SDPA flash) are in
:mod:`hybridnas.bench_peers`; every peer is an optional import, and a missing or unusable one is a row error.
``device`` and ``dtype`` (``--device cuda --dtype bf16``) place the layer, the peers and the input.

Timing: ``warmup`` untimed runs, then the median of ``repeat`` timed runs. ``fwd`` runs under ``no_grad``;
``fwd+bwd`` runs the forward with autograd and backpropagates a fixed random output gradient into the
parameters. Ratios are speed-ups against the first backend listed (``t_first / t``).

FLOPs: each row's work is counted once by ``torch.utils.flop_counter.FlopCounterMode`` on the eager layer with
the row's backend (``fwd`` under ``no_grad``; ``fwd+bwd`` as timed; a ``+compile`` row counts its eager twin's):
the matmul-type ops it knows (mm, bmm, addmm, baddbmm, convolution, attention), not element-wise work or FFTs;
a convolution's backward as one forward convolution per gradient (torch's formula ignores ``groups`` there).
Beside the times each row prints the achieved GFLOP/s (counted FLOPs / time) and ``time / floor``, where the
floor is those FLOPs at this machine's GEMM peak, measured in the same run right before the rows (the best of a
few ``peak_size``-square matmuls in the bench's dtype; printed in the header). ``time / floor`` = 1 would be a
layer that is nothing but matmuls at peak speed.

``compile`` (``--compile``) adds, under each backend's row, the same layer through ``torch.compile`` (inductor by
default, ``--compile-backend``) as ``<backend>+compile``: eager and compiled side by side. The compile happens
in the warm-up (at least one untimed run per mode), so the times are those of compiled steps.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import yaml
from torch import nn

from hybridnas import bench_peers

MODES = ("fwd", "fwd+bwd")


class BenchError(ValueError):
    pass


def parse_params(text: str | None) -> dict[str, Any]:
    """``"variant=mamba3,mimo_rank=2"`` -> ``{"variant": "mamba3", "mimo_rank": 2}`` (values as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"--params item {item!r} is not key=value")
        out[key.strip()] = yaml.safe_load(value.strip())
    return out


def _mamba3_ssm(d_model: int, params: dict[str, Any]) -> nn.Module:
    from mamba3_ssm import Mamba3  # optional, never a requirement

    if params.get("variant", "mamba3") != "mamba3":
        raise BenchError("mamba3-ssm implements only variant mamba3")
    rank = int(params.get("mimo_rank", 1))
    return Mamba3(d_model, d_state=params.get("d_state", 128), expand=params.get("expand", 2),
                  headdim=params.get("headdim", 64), rope_fraction=params.get("rope_fraction", 0.5),
                  is_mimo=rank > 1, mimo_rank=rank)


class _Projections(nn.Module):
    """Only a Mamba-3 layer's ``in_proj`` and ``out_proj`` (the first ``d_inner`` columns feed ``out_proj``)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.out_proj(self.layer.in_proj(x)[..., :self.layer.d_inner])


def _mamba3_ssm_proj(d_model: int, params: dict[str, Any]) -> nn.Module:
    """The ``mamba3-ssm`` layer's own dense projections and nothing between them: work every Mamba-3 layer of this
    shape does, whatever its scan, so ``t(mamba3-ssm) / t(mamba3-ssm-proj)`` bounds the speed-up any backend can
    reach against ``mamba3-ssm`` (at most that, with a scan and gating that cost nothing)."""
    return _Projections(_mamba3_ssm(d_model, params))


#: peer name -> (symbol it stands in for, importable module, factory(d_model, params) -> module)
PEERS: dict[str, tuple[str, str, Callable[[int, dict[str, Any]], nn.Module]]] = {
    "mamba3-ssm": ("M", "mamba3_ssm", _mamba3_ssm),
    "mamba3-ssm-proj": ("M", "mamba3_ssm", _mamba3_ssm_proj),
    **bench_peers.PEERS,
}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def peer_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(PEERS[name][1]) is not None


@dataclass
class Row:
    seq_len: int
    backend: str
    fwd_s: float | None = None
    fwd_bwd_s: float | None = None
    fwd_speedup: float | None = None
    fwd_bwd_speedup: float | None = None
    error: str | None = None
    compiled: bool = False
    fwd_flops: int | None = None  # counted by FlopCounterMode (matmul-type ops)
    fwd_bwd_flops: int | None = None
    fwd_gflops: float | None = None  # achieved: counted FLOPs / time
    fwd_bwd_gflops: float | None = None
    fwd_over_floor: float | None = None  # time / (counted FLOPs at the measured GEMM peak)
    fwd_bwd_over_floor: float | None = None


@dataclass
class BenchResult:
    mixer: str
    params: dict[str, Any]
    batch: int
    d_model: int
    repeat: int
    warmup: int
    threads: int
    budget: float | None = None
    compile_backend: str | None = None  # torch.compile backend of the +compile rows; None: no such rows
    peak_gflops: float | None = None  # GEMM peak measured before the rows
    peak_size: int | None = None  # of its square matmuls
    torch: str = torch.__version__
    machine: str = field(default_factory=lambda: f"{platform.machine()}, {os.cpu_count()} cpus")
    rows: list[Row] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _once(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _time(fn: Callable[[], None], warmup: int, repeat: int, budget: float | None = None) -> float:
    """Median of ``repeat`` runs after ``warmup``; with ``budget`` (seconds per cell) a slow path stops early:
    a warm-up run longer than the budget is itself the measurement, and repeats stop once they sum past it."""
    for _ in range(warmup):
        t = _once(fn)
        if budget is not None and t > budget:
            return t
    times: list[float] = []
    for _ in range(max(repeat, 1)):
        times.append(_once(fn))
        if budget is not None and sum(times) > budget:
            break
    return statistics.median(times)


def gemm_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, repeat: int = 3) -> float:
    """GFLOP/s of the fastest of ``repeat`` ``size x size`` matmuls (after one untimed): this machine's GEMM peak
    as the bench sees it, measured in the same run as the rows (a shared or throttled machine lowers both)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(device, dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for i in range(repeat + 1):
        sync()
        t = _once(lambda: (torch.mm(a, b), sync()))
        if i:
            best = min(best, t)
    return 2 * size ** 3 / best / 1e9


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """``convolution_backward``: each gradient asked for (input, weight) costs one forward convolution. torch's own
    formula leaves ``groups`` out of the weight gradient, counting a depthwise conv's as a dense one."""
    from torch.utils.flop_counter import conv_flop_count

    fwd = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return fwd * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(module: nn.Module, x: torch.Tensor, modes: tuple[str, ...],
                 backend: str | None) -> tuple[int | None, int | None]:
    """FLOPs of one ``fwd`` (no_grad) and one ``fwd+bwd`` as :func:`_measure` runs them (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    from layers.ops import dispatch

    grad = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    out: list[int | None] = []
    with dispatch.force(backend):
        for mode in MODES:
            if mode not in modes:
                out.append(None)
                continue
            with FlopCounterMode(display=False,
                                 custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops}) as counter:
                if mode == "fwd":
                    with torch.no_grad():
                        module(x)
                else:
                    module.zero_grad(set_to_none=True)
                    module(x).backward(grad)
            out.append(int(counter.get_total_flops()))
    module.zero_grad(set_to_none=True)
    return out[0], out[1]


def _measure(module: nn.Module, x: torch.Tensor, modes: tuple[str, ...], warmup: int, repeat: int,
             backend: str | None, budget: float | None) -> tuple[float | None, float | None]:
    from layers.ops import dispatch

    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x)

    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)  # time the kernels, not their launch

    def fwd() -> None:
        with torch.no_grad():
            module(x)
        sync()

    def fwd_bwd() -> None:
        module.zero_grad(set_to_none=True)
        module(x).backward(grad)
        sync()

    with dispatch.force(backend):
        t_fwd = _time(fwd, warmup, repeat, budget) if "fwd" in modes else None
        t_fb = _time(fwd_bwd, warmup, repeat, budget) if "fwd+bwd" in modes else None
    return t_fwd, t_fb


def run_bench(mixer: str, params: dict[str, Any], backends: list[str], seq_lens: list[int], *, batch: int = 8,
              d_model: int = 128, repeat: int = 3, warmup: int = 1, modes: tuple[str, ...] = MODES,
              budget: float | None = None, seed: int = 0, log: Callable[[str], None] | None = None,
              device: str = "cpu", dtype: str = "float32", compile: bool = False,
              compile_backend: str = "inductor", peak_size: int = 2048) -> BenchResult:
    """Time ``mixer`` (a registry symbol) with ``params`` over ``backends`` x ``seq_lens``; ``budget`` caps the
    timed seconds per cell (see :func:`_time`); ``device`` and ``dtype`` place the modules and the input.
    ``compile``: each backend (not the peers) also runs through ``torch.compile(layer, backend=compile_backend)``
    in a ``<backend>+compile`` row below its eager one. ``peak_size``: the square matmul timed for the GEMM peak
    (see the module docstring: FLOPs, GFLOP/s and time / floor per row)."""
    from hybridnas import registry
    from layers.ops import dispatch

    spec = registry.get(mixer)
    if not backends:
        raise BenchError("no backend given")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise BenchError(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    for b in backends:
        if b not in (*dispatch.BACKENDS, "auto", *PEERS):
            raise BenchError(f"unknown backend {b!r}; choose from auto, {', '.join(dispatch.BACKENDS)} or a peer "
                             f"({', '.join(PEERS)})")
        if b in PEERS and PEERS[b][0] != spec.symbol:
            raise BenchError(f"peer {b!r} stands in for symbol {PEERS[b][0]}, not {spec.symbol}")
    if dtype not in DTYPES:
        raise BenchError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    dev, dt = torch.device(device), DTYPES[dtype]
    spec.make_config(params)  # unknown keys fail before any timing
    result = BenchResult(mixer, dict(params), batch, d_model, repeat, warmup, torch.get_num_threads(), budget,
                         compile_backend if compile else None)
    if peak_size < 1:
        raise BenchError(f"peak size must be at least 1, got {peak_size}")
    result.peak_size = peak_size
    result.peak_gflops = gemm_peak(dev, dt, peak_size)
    if log is not None:
        log(f"GEMM peak {result.peak_gflops:.1f} GFLOP/s ({peak_size}x{peak_size} {dtype} matmul)")
    runs = [(b, False) for b in backends]
    if compile:
        runs = [r for b in backends for r in ([(b, False), (b, True)] if b not in PEERS else [(b, False)])]
    for seq_len in seq_lens:
        x = torch.randn(batch, seq_len, d_model, generator=torch.Generator().manual_seed(seed)).to(dev, dt)
        layer = None
        first: Row | None = None
        counted: dict[str, tuple[int | None, int | None]] = {}  # backend -> its eager FLOPs (compiled rows reuse)
        for backend, compiled in runs:
            row = Row(seq_len, f"{backend}+compile" if compiled else backend, compiled=compiled)
            try:
                torch.manual_seed(seed)
                if backend in PEERS:
                    if not peer_available(backend):
                        raise BenchError(f"package {PEERS[backend][1]!r} is not installed")
                    module, forced = PEERS[backend][2](d_model, params).to(dev, dt), None
                else:
                    if layer is None:
                        layer = spec.build(d_model, params).to(dev, dt)
                    module, forced = layer, backend
                if compiled:
                    torch._dynamo.reset()  # a fresh compile per row: no graph of another backend reused
                    module = torch.compile(layer, backend=compile_backend)
                row.fwd_s, row.fwd_bwd_s = _measure(module, x, modes, max(warmup, 1) if compiled else warmup,
                                                    repeat, forced, budget)
                if backend not in counted:
                    counted[backend] = count_flops(module, x, modes, forced)
                row.fwd_flops, row.fwd_bwd_flops = counted[backend]
            except Exception as e:  # one failing backend must not hide the others
                row.error = f"{type(e).__name__}: {e}"
            if first is None:
                first = row
            for attr, out in (("fwd_s", "fwd_speedup"), ("fwd_bwd_s", "fwd_bwd_speedup")):
                mine, ref = getattr(row, attr), getattr(first, attr)
                if mine and ref:
                    setattr(row, out, ref / mine)
            _flop_rates(row, result.peak_gflops)
            result.rows.append(row)
            if log is not None:
                log(format_row(row))
    return result


def _flop_rates(row: Row, peak_gflops: float) -> None:
    """Fill a row's achieved GFLOP/s and time / floor from its times and counted FLOPs."""
    for mode in ("fwd", "fwd_bwd"):
        t, flops = getattr(row, f"{mode}_s"), getattr(row, f"{mode}_flops")
        if t and flops:
            setattr(row, f"{mode}_gflops", flops / t / 1e9)
            setattr(row, f"{mode}_over_floor", t / (flops / (peak_gflops * 1e9)))


def _fmt_t(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.1f} ms" if t < 10 else f"{t:.1f} s"


def _fmt_r(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x" if r < 10 else f"{r:.0f}x"


def _fmt_g(g: float | None) -> str:
    return "-" if g is None else f"{g:.1f}" if g < 100 else f"{g:.0f}"


def format_row(row: Row) -> str:
    return (f"L={row.seq_len} {row.backend}: fwd {_fmt_t(row.fwd_s)}, fwd+bwd {_fmt_t(row.fwd_bwd_s)}"
            + (f", fwd+bwd {_fmt_g(row.fwd_bwd_gflops)} GFLOP/s = {_fmt_r(row.fwd_bwd_over_floor)} the floor"
               if row.fwd_bwd_over_floor else "")
            + (f" ({row.error})" if row.error else ""))


def format_table(result: BenchResult) -> str:
    """A plain-text table; ratios are speed-ups against the first backend listed."""
    first = result.rows[0].backend if result.rows else "-"
    params = ",".join(f"{k}={v}" for k, v in result.params.items())
    lines = [f"mixer {result.mixer} ({params or 'defaults'}), batch {result.batch}, d_model {result.d_model}, "
             f"median of {result.repeat} after {result.warmup} warm-up"
             + (f" (at most {result.budget:g} s per cell)" if result.budget else "")
             + f", {result.threads} threads, "
             f"torch {result.torch}"
             + (f"; +compile rows: torch.compile({result.compile_backend})" if result.compile_backend else "")
             + (f"; GEMM peak {result.peak_gflops:.1f} GFLOP/s ({result.peak_size}x{result.peak_size} matmul, "
                f"timed before the rows); floor = counted matmul FLOPs at that peak"
                if result.peak_gflops else "")]
    header = ["seq_len", "backend", "fwd", "fwd+bwd", f"fwd speed-up vs {first}", f"fwd+bwd speed-up vs {first}",
              "fwd GFLOP/s", "fwd+bwd GFLOP/s", "fwd / floor", "fwd+bwd / floor"]
    body = [[str(r.seq_len), r.backend, _fmt_t(r.fwd_s), _fmt_t(r.fwd_bwd_s), _fmt_r(r.fwd_speedup),
             _fmt_r(r.fwd_bwd_speedup), _fmt_g(r.fwd_gflops), _fmt_g(r.fwd_bwd_gflops), _fmt_r(r.fwd_over_floor),
             _fmt_r(r.fwd_bwd_over_floor) + (f"  error: {r.error}" if r.error else "")] for r in result.rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header) - 1)]
    for r in [header, *body]:
        lines.append("  ".join([c.ljust(w) for c, w in zip(r[:-1], widths)] + [r[-1]]).rstrip())
    return "\n".join(lines)


def _main_decode(args: Any) -> int:
    """``hybridnas bench --decode``: whole patterns decoding after each context length, or (with
    ``--conversation HISTORY+TURN``) a continued conversation from the state cache against re-prefilling it."""
    from hybridnas import bench_decode

    patterns = [p.strip() for p in (args.patterns or "").split(",") if p.strip()]
    layers = bench_decode.layer_params(parse_params(args.params))
    log = None if args.json or args.quiet else (lambda s: print(s, flush=True))
    common = dict(d_model=args.d_model, vocab_size=args.vocab_size, layers=layers, seed=args.seed, log=log)
    result: Any
    if args.conversation:
        history, plus, turn = args.conversation.partition("+")
        bad = BenchError(f"--conversation {args.conversation!r}: expected HISTORY+TURN token counts, e.g. 2048+16")
        try:
            h, t = int(history), int(turn)
        except ValueError:
            raise bad from None
        if not plus:
            raise bad
        result = bench_decode.run_conversation(patterns, h, t, rounds=args.rounds, **common)
        table = bench_decode.format_conversation_table
    else:
        contexts = [int(s) for s in args.contexts.split(",") if s.strip()]
        result = bench_decode.run_decode(patterns, contexts, decode_tokens=args.decode_tokens, warmup=args.warmup,
                                         prefill_repeat=args.prefill_repeat, **common)
        table = bench_decode.format_decode_table
    print(result.to_json() if args.json else table(result))
    return 0


def main(args: Any) -> int:
    """Entry point of ``hybridnas bench`` (``args`` from the CLI parser)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "decode", False):
        try:
            return _main_decode(args)
        except (BenchError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        if not args.mixer:
            raise BenchError("--mixer is required (or --decode to time whole patterns decoding)")
        params = parse_params(args.params)
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        seq_lens = [int(s) for s in args.seq_lens.split(",") if s.strip()]
        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        log = None if args.json or args.quiet else (lambda s: print(s, flush=True))
        result = run_bench(args.mixer, params, backends, seq_lens, batch=args.batch, d_model=args.d_model,
                           repeat=args.repeat, warmup=args.warmup, modes=modes, budget=args.budget, log=log,
                           device=getattr(args, "device", "cpu"), dtype=getattr(args, "dtype", "float32"),
                           compile=getattr(args, "compile", False),
                           compile_backend=getattr(args, "compile_backend", "inductor"),
                           peak_size=getattr(args, "peak_size", 2048))
    except (BenchError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.to_json() if args.json else format_table(result))
    return 0
