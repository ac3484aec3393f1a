"""``hybridnas bench`` GPU peers and the triton backend: a peer that is not installed, or cannot run here
(no CUDA), is reported in its row and never raised; the other rows still run. No timing is asserted."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest

from hybridnas import bench, bench_peers

TINY = {"d_state": 16, "headdim": 16, "chunk_size": 16}


def test_peers_are_registered_with_their_symbols():
    assert {"fla-simple-gla", "fla-rwkv7", "mamba-ssm-ssd", "mamba-ssm-mamba3", "sdpa"} <= set(bench.PEERS)
    assert bench.PEERS["fla-rwkv7"][0] == "R" and bench.PEERS["sdpa"][0] == "A"
    with pytest.raises(bench.BenchError, match="stands in for symbol R"):
        bench.run_bench("M", TINY, ["fla-rwkv7"], [4], batch=1, d_model=32)


@pytest.mark.parametrize("peer, symbol", [("fla-simple-gla", "M"), ("mamba-ssm-ssd", "M"),
                                          ("mamba-ssm-mamba3", "M"), ("fla-rwkv7", "R")])
def test_unavailable_peer_is_a_row_error(peer, symbol):
    params = TINY if symbol == "M" else {"head_size": 16}
    res = bench.run_bench(symbol, params, ["chunked", peer], [4], batch=1, d_model=32, repeat=1, warmup=0)
    assert res.rows[0].error is None and res.rows[0].fwd_s > 0
    err = res.rows[1].error
    assert err and res.rows[1].fwd_s is None and res.rows[1].fwd_bwd_speedup is None
    if importlib.util.find_spec(bench.PEERS[peer][1]) is None:
        assert "not installed" in err
    else:  # installed: on a CPU machine it must say it needs CUDA (or fail to import its CUDA parts)
        assert "needs CUDA" in err or "Error" in err


def test_sdpa_on_cpu_says_it_needs_cuda():
    res = bench.run_bench("A", {}, ["chunked", "sdpa"], [4], batch=1, d_model=32, repeat=1, warmup=0)
    assert res.rows[0].error is None
    assert "needs CUDA" in res.rows[1].error and "PeerUnavailable" in res.rows[1].error


def test_bad_dtype_is_a_clear_error():
    with pytest.raises(bench.BenchError, match="unknown dtype"):
        bench.run_bench("M", TINY, ["chunked"], [4], batch=1, d_model=32, dtype="int8")


def test_cli_accepts_device_and_dtype(capsys):
    from hybridnas.cli import main

    assert main(["bench", "--mixer", "M", "--params", "d_state=8,headdim=16", "--backends", "chunked,sdpa",
                 "--seq-lens", "4", "--batch", "1", "--d-model", "32", "--repeat", "1", "--warmup", "0",
                 "--device", "cpu", "--dtype", "float32", "--quiet"]) == 2  # sdpa stands in for A, not M
    assert "stands in for symbol A" in capsys.readouterr().err


@pytest.mark.triton
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_backend_runs_in_interpreter_mode(monkeypatch):
    """``--backends triton`` reaches the kernels (here through the interpreter: no GPU in CI)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mod = sys.modules.get("layers.ops.common.scalar_decay_triton")
    if mod is not None and type(mod._ssd_fwd_kernel).__name__ != "InterpretedFunction":
        importlib.reload(mod)  # decorated earlier without the interpreter: re-decorate under it
    res = bench.run_bench("M", {**TINY, "mimo_rank": 2}, ["chunked", "triton"], [5], batch=1, d_model=32,
                          repeat=1, warmup=0)
    assert [r.error for r in res.rows] == [None, None]
    assert res.rows[1].fwd_s > 0 and res.rows[1].fwd_bwd_s > 0
    assert bench_peers.PEERS["sdpa"][1] == "torch"
