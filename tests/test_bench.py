"""``hybridnas bench``: parameter parsing, the result rows and ratios, errors, table and JSON output (tiny sizes;
no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from hybridnas import bench
from hybridnas.cli import main

TINY = {"d_state": 8, "headdim": 16, "chunk_size": 4}


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
