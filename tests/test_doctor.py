"""``hybridnas doctor``: versions, devices, every op's backend per device, and the Triton self-checks (on CPU only
with ``--interpret``), a failed one reported with exit code 1."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridnas.cli import main
from layers.ops import dispatch
from layers.ops import mamba3 as mamba3_op

ROOT = Path(__file__).resolve().parents[1]
OPS = ("hyena_conv", "mamba2", "mamba3", "rwkv7", "s4_kernel", "selective_scan")


def test_doctor_prints_versions_devices_and_ops(capsys, monkeypatch):
    monkeypatch.delenv(dispatch.ENV, raising=False)
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for name in ("python", "torch", "triton", "optuna", "cuda"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), (name, out)
    assert "device cpu" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert set(OPS) <= set(rows), out
    assert "triton is not used on CPU" in rows["mamba2"]
    assert rows["hyena_conv"].split()[1] == "chunked"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_doctor_interpret_runs_the_real_self_checks():
    """A fresh process (kernels decorated under TRITON_INTERPRET=1): every kernel passes its check."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(dispatch.ENV, None)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "hybridnas.cli", "doctor", "--interpret"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("  ")}
    for op in ("mamba2", "mamba3", "rwkv7", "selective_scan"):
        assert "self-check float32 ok" in rows[op], proc.stdout


def test_doctor_reports_a_failing_kernel(capsys, monkeypatch):
    def wrong(*args, **kwargs):
        y, state = mamba3_op.mamba3_chunked(*args, **kwargs)
        return y + 1.0, state

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(dispatch.ENV, raising=False)
    monkeypatch.setitem(mamba3_op.BACKENDS, "triton", wrong)
    monkeypatch.setattr(dispatch, "triton_usable", lambda device: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for op in ("mamba2", "rwkv7", "selective_scan"):  # the others pass: keep this test off the interpreter
        table = dispatch.registered()[op]
        monkeypatch.setitem(table, "triton", table["chunked"])
    dispatch.reset_checks()
    try:
        with pytest.warns(RuntimeWarning, match="mamba3"):
            assert main(["doctor", "--interpret"]) == 1
    finally:
        dispatch.reset_checks()
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert "FALLBACK to chunked" in rows["mamba3"] and "relative error" in rows["mamba3"]
    assert "self-check float32 ok" in rows["mamba2"]
