"""``hybridnas bench``: parameter parsing, the result rows and ratios, errors, table and JSON output (tiny sizes;
no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from hybridnas import bench
from hybridnas.cli import main

TINY = {"d_state": 8, "headdim": 16, "chunk_size": 4}


@pytest.fixture(autouse=True)
def small_gemm_peak(monkeypatch):
    """The GEMM peak of every run here from a 64x64 matmul (2048x2048 by default: a second per run on 2 cores)."""
    real = bench.gemm_peak
    monkeypatch.setattr(bench, "gemm_peak", lambda device, dtype, size=2048, repeat=3: real(device, dtype, 64))


def test_parse_params_types():
    got = bench.parse_params("variant=mamba3, mimo_rank=2,expand=1.5,backend=null,rope=true")
    assert got == {"variant": "mamba3", "mimo_rank": 2, "expand": 1.5, "backend": None, "rope": True}
    assert bench.parse_params("") == {}
    with pytest.raises(bench.BenchError):
        bench.parse_params("d_state")


def test_run_bench_rows_and_speedups():
    res = bench.run_bench("M", {**TINY, "mimo_rank": 2}, ["naive", "chunked"], [5, 9], batch=1, d_model=32,
                          repeat=1, warmup=0)
    assert [(r.seq_len, r.backend) for r in res.rows] == [(5, "naive"), (5, "chunked"), (9, "naive"), (9, "chunked")]
    for r in res.rows:
        assert r.error is None and r.fwd_s > 0 and r.fwd_bwd_s > 0
    assert res.rows[0].fwd_speedup == 1.0 and res.rows[0].fwd_bwd_speedup == 1.0
    assert res.rows[1].fwd_bwd_speedup == pytest.approx(res.rows[0].fwd_bwd_s / res.rows[1].fwd_bwd_s)
    table = bench.format_table(res)
    assert "speed-up vs naive" in table and "chunked" in table


def test_budget_limits_repeats():
    calls = []
    assert bench._time(lambda: calls.append(1), warmup=1, repeat=5, budget=0.0) >= 0
    assert len(calls) == 1  # the warm-up run exceeded the budget and is the measurement
    calls.clear()
    bench._time(lambda: calls.append(1), warmup=1, repeat=4, budget=None)
    assert len(calls) == 5


def test_generic_over_symbols_and_modes():
    res = bench.run_bench("A", {"n_heads": 2}, ["auto"], [4], batch=1, d_model=16, repeat=1, warmup=0,
                          modes=("fwd",))
    assert res.rows[0].fwd_s > 0 and res.rows[0].fwd_bwd_s is None


def test_errors():
    with pytest.raises(bench.BenchError, match="unknown backend"):
        bench.run_bench("M", TINY, ["fast"], [4], batch=1, d_model=32)
    with pytest.raises(bench.BenchError, match="stands in for symbol M"):
        bench.run_bench("A", {}, ["mamba3-ssm"], [4], batch=1, d_model=32)
    with pytest.raises(ValueError):  # unknown layer parameter, before any timing
        bench.run_bench("M", {"d_sate": 8}, ["chunked"], [4], batch=1, d_model=32)
    # a backend that cannot run is reported in its row; the others still run
    res = bench.run_bench("M", TINY, ["chunked", "triton"], [4], batch=1, d_model=32, repeat=1, warmup=0)
    assert res.rows[0].error is None and "BackendError" in res.rows[1].error


def test_missing_peer_is_a_row_error(monkeypatch):
    monkeypatch.setattr(bench, "peer_available", lambda name: False)
    res = bench.run_bench("M", TINY, ["chunked", "mamba3-ssm"], [4], batch=1, d_model=32, repeat=1, warmup=0)
    assert "not installed" in res.rows[1].error and res.rows[1].fwd_bwd_speedup is None


def test_cli_json_and_table(capsys):
    args = ["bench", "--mixer", "M", "--params", "variant=mamba2,d_state=8,headdim=16", "--backends",
            "naive,chunked", "--seq-lens", "6", "--batch", "1", "--d-model", "32", "--repeat", "1", "--warmup", "0"]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mixer"] == "M" and data["params"]["variant"] == "mamba2" and len(data["rows"]) == 2
    assert main([*args, "--quiet"]) == 0
    assert "fwd+bwd speed-up vs naive" in capsys.readouterr().out
    assert main(["bench", "--mixer", "M", "--params", "oops"]) == 2


def test_mamba3_ssm_peer_and_its_projection_floor(monkeypatch):
    """The ``mamba3-ssm`` peers with a stand-in package (the real one is optional and not installed in CI): the
    floor peer runs the very ``in_proj`` / ``out_proj`` of the layer the full peer builds, and only those."""
    import sys
    import types

    from torch import nn

    built, called = [], []

    class FakeMamba3(nn.Module):
        def __init__(self, d_model, *, d_state, expand, headdim, rope_fraction, is_mimo, mimo_rank):
            super().__init__()
            self.d_inner = int(expand * d_model)
            self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * d_state * mimo_rank, bias=False)
            self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
            self.in_proj.register_forward_hook(lambda *a: called.append("in_proj"))
            built.append((d_state, headdim, is_mimo, mimo_rank))

        def forward(self, u):
            called.append("full")
            return self.out_proj(self.in_proj(u)[..., :self.d_inner].tanh())

    monkeypatch.setitem(sys.modules, "mamba3_ssm", types.SimpleNamespace(Mamba3=FakeMamba3))
    monkeypatch.setattr(bench, "peer_available", lambda name: True)
    res = bench.run_bench("M", {**TINY, "mimo_rank": 2}, ["mamba3-ssm", "mamba3-ssm-proj"], [4], batch=1,
                          d_model=32, repeat=1, warmup=0, modes=("fwd+bwd",))
    assert [r.error for r in res.rows] == [None, None]
    assert built == [(8, 16, True, 2)] * 2
    # one timed and one FLOP-counted fwd+bwd per peer; the floor never runs the layer's forward
    assert called.count("full") == 2 and called.count("in_proj") == 4
    assert res.rows[1].fwd_bwd_speedup > 0
    res = bench.run_bench("M", {"variant": "mamba2", "d_state": 8, "headdim": 16}, ["mamba3-ssm-proj"], [4],
                          batch=1, d_model=32, repeat=1, warmup=0)
    assert "only variant mamba3" in res.rows[0].error


def test_bench_compile_prints_eager_and_compiled_rows(capsys):
    """``--compile``: a compiled row under each backend's eager row (aot_eager keeps this test fast; no timing
    is checked)."""
    argv = ["bench", "--mixer", "A", "--params", "n_heads=2", "--backends", "chunked,auto",
            "--seq-lens", "6", "--batch", "1", "--d-model", "32", "--repeat", "1", "--warmup", "0", "--quiet",
            "--modes", "fwd+bwd", "--compile", "--compile-backend", "aot_eager"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [r[1] for r in rows] == ["chunked", "chunked+compile", "auto", "auto+compile"], out
    assert "error" not in out and "torch.compile(aot_eager)" in out
    assert all(r[2] == "-" and r[3] != "-" for r in rows), out  # fwd+bwd timed in every row
    assert main(argv[:-3] + ["--json"]) == 0  # without --compile: no compiled rows
    res = json.loads(capsys.readouterr().out)
    assert [r["backend"] for r in res["rows"]] == ["chunked", "auto"] and res["compile_backend"] is None


def test_flops_of_a_known_layer_equal_the_formula():
    """``F`` (SwiGLU): three matmuls of ``2·B·T·d·ff`` FLOPs forward; backward (the input needs no gradient) adds
    the three weight gradients and the input gradient of ``w2``: seven in all."""
    from layers.ffn import ffn_hidden

    b, t, d = 2, 6, 32
    res = bench.run_bench("F", {}, ["auto"], [t], batch=b, d_model=d, repeat=1, warmup=0, peak_size=64)
    row = res.rows[0]
    unit = 2 * b * t * d * ffn_hidden(d, 4, 8)
    assert row.error is None and (row.fwd_flops, row.fwd_bwd_flops) == (3 * unit, 7 * unit)


def test_rows_print_achieved_gflops_and_time_over_the_matmul_floor(capsys):
    """Every row carries its counted FLOPs, the achieved GFLOP/s and time / floor, where the floor is the counted
    matmul FLOPs at the GEMM peak measured in the same run (printed in the header)."""
    res = bench.run_bench("M", TINY, ["naive", "chunked"], [8], batch=1, d_model=32, repeat=1, warmup=0,
                          peak_size=64)
    assert res.peak_gflops > 0 and res.peak_size == 64
    for r in res.rows:
        assert r.fwd_flops > 0 and r.fwd_bwd_flops > r.fwd_flops
        assert r.fwd_gflops == pytest.approx(r.fwd_flops / r.fwd_s / 1e9)
        assert r.fwd_bwd_over_floor == pytest.approx(r.fwd_bwd_s / (r.fwd_bwd_flops / (res.peak_gflops * 1e9)))
    table = bench.format_table(res)
    head = table.splitlines()[0]
    assert f"GEMM peak {res.peak_gflops:.1f} GFLOP/s" in head and "64x64" in head
    cols = table.splitlines()[1]
    for name in ("fwd GFLOP/s", "fwd+bwd GFLOP/s", "fwd / floor", "fwd+bwd / floor", "fwd+bwd speed-up vs naive"):
        assert name in cols
    row = table.splitlines()[3].split()
    assert row[1] == "chunked" and row[-1].endswith("x"), table
    argv = ["bench", "--mixer", "F", "--backends", "auto", "--seq-lens", "4", "--batch", "1", "--d-model", "16",
            "--repeat", "1", "--warmup", "0", "--peak-size", "32"]
    assert main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["peak_gflops"] > 0 and data["rows"][0]["fwd_bwd_flops"] > 0


def test_depthwise_conv_backward_counts_its_groups():
    """torch's FlopCounterMode formula for ``convolution_backward`` ignores ``groups``: a depthwise conv's weight
    gradient counted as a dense one (Mamba-2's conv: 6.7 GFLOP backward for 0.02 forward at batch 8, length 1024).
    The bench counts each gradient of a convolution as one forward convolution."""
    import torch
    from torch import nn

    b, c, t, k = 2, 48, 20, 3
    conv = nn.Conv1d(c, c, k, groups=c, padding=1, bias=False)
    x = torch.randn(b, c, t)
    fwd, fwd_bwd = bench.count_flops(conv, x, bench.MODES, None)
    assert fwd == 2 * b * c * t * k
    assert fwd_bwd == 2 * fwd  # the input needs no gradient: forward + weight gradient
    fwd, fwd_bwd = bench.count_flops(conv, x.requires_grad_(True), bench.MODES, None)
    assert fwd_bwd == 3 * fwd
