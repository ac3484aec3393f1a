"""``hybridnas bench`` GPU peers and the triton backend: a peer that is not installed, or cannot run here
(no CUDA), is reported in its row and never raised; the other rows still run. No timing is asserted."""

from __future__ import annotations

import importlib
import importlib.util
import re
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
        assert err.startswith("BenchError: package") and "not installed" in err
    else:  # installed: on a CPU machine it must say it needs CUDA (or fail to import its CUDA parts)
        assert cpu_row_error_ok(err), err


# What an installed peer's row may say on a CPU machine: the peer's own "needs CUDA", or an import of its CUDA parts
# that fails. Not any error: every row error starts with an exception type name, most of them ending in "Error".
CPU_ROW_ERROR = re.compile(r"(PeerUnavailable: needs CUDA \(tensors are on cpu\)"
                           r"|(ImportError|ModuleNotFoundError|OSError): )")


def cpu_row_error_ok(err: str) -> bool:
    return CPU_ROW_ERROR.match(err) is not None


def test_cpu_row_error_rule():
    assert cpu_row_error_ok("PeerUnavailable: needs CUDA (tensors are on cpu)")
    assert cpu_row_error_ok("ImportError: libcudart.so.12: cannot open shared object file")
    for err in ("RuntimeError: Expected all tensors to be on the same device", "TypeError: bad argument",
                "BenchError: package 'fla' is not installed", "AssertionError: Error"):
        assert not cpu_row_error_ok(err), err


FAKE_PEERS = {  # just enough of each outside package for its peer to build; their kernels must never be called on cpu
    "fla/__init__.py": "",
    "fla/ops/__init__.py": "",
    "fla/ops/simple_gla.py": "def chunk_simple_gla(*a, **k):\n    raise RuntimeError('kernel called on ' + "
                             "str(a[0].device))\n",
    "fla/ops/rwkv7.py": "def chunk_rwkv7(*a, **k):\n    raise RuntimeError('kernel called on ' + str(a[0].device))\n",
    "mamba_ssm/__init__.py": "",
    "mamba_ssm/ops/__init__.py": "",
    "mamba_ssm/ops/triton/__init__.py": "",
    "mamba_ssm/ops/triton/ssd_combined.py": "def mamba_chunk_scan_combined(*a, **k):\n"
                                            "    raise RuntimeError('kernel called on ' + str(a[0].device))\n",
    "mamba_ssm/modules/__init__.py": "",
    "mamba_ssm/modules/mamba3.py": "import torch\n\n\nclass Mamba3(torch.nn.Module):\n"
                                   "    def __init__(self, d_model, **kw):\n        super().__init__()\n"
                                   "        self.proj = torch.nn.Linear(d_model, d_model)\n\n"
                                   "    def forward(self, x):\n"
                                   "        raise RuntimeError('kernel called on ' + str(x.device))\n",
}


@pytest.fixture
def fake_installed_peers(tmp_path, monkeypatch):
    """The GPU peers' packages "installed" (importable stand-ins), as on a machine that has them but no CUDA."""
    if any(importlib.util.find_spec(m) is not None for m in ("fla", "mamba_ssm")):
        pytest.skip("the real packages are installed: test_unavailable_peer_is_a_row_error checks them")
    for rel, text in FAKE_PEERS.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in [m for m in sys.modules if m.split(".")[0] in ("fla", "mamba_ssm")]:
        del sys.modules[name]


@pytest.mark.parametrize("peer, symbol", [("fla-simple-gla", "M"), ("mamba-ssm-ssd", "M"),
                                          ("mamba-ssm-mamba3", "M"), ("fla-rwkv7", "R")])
def test_installed_peer_on_cpu_says_it_needs_cuda(fake_installed_peers, peer, symbol):
    assert bench.peer_available(peer)
    params = TINY if symbol == "M" else {"head_size": 16}
    res = bench.run_bench(symbol, params, ["chunked", peer], [4], batch=1, d_model=32, repeat=1, warmup=0)
    err = res.rows[1].error
    assert err == "PeerUnavailable: needs CUDA (tensors are on cpu)", err
    assert cpu_row_error_ok(err)


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
