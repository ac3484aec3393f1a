"""Every op folder follows one layout: naive.py, chunked.py (triton.py where a kernel exists) and an __init__ with
one backend table ``BACKENDS`` and an entry function taking ``backend=``, which reaches the table."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

from layers.ops import dispatch

OPS_DIR = Path(importlib.import_module("layers.ops").__file__).parent
#: op package -> its entry function. A new op folder fails test_every_op_folder_is_listed until added here.
ENTRIES = {"hyena": "long_conv", "mamba2": "ssd", "mamba3": "mamba3", "rwkv7": "rwkv7",
           "selective_scan": "selective_scan", "s4_kernel": "s4d_conv", "causal_conv1d": "causal_conv1d"}
SHARED = {"common"}  # pieces shared by several ops, not an op


def test_every_op_folder_is_listed():
    folders = {p.name for p in OPS_DIR.iterdir() if (p / "__init__.py").exists()}
    assert folders - SHARED == set(ENTRIES)


@pytest.mark.parametrize("op", sorted(ENTRIES))
def test_op_folder_layout_and_backend_table(op):
    files = {p.name for p in (OPS_DIR / op).glob("*.py")}
    assert {"__init__.py", "naive.py", "chunked.py"} <= files
    pkg = importlib.import_module(f"layers.ops.{op}")
    table = pkg.BACKENDS
    assert isinstance(table, dict) and {"naive", "chunked"} <= set(table) <= set(dispatch.BACKENDS)
    triton_here = "triton.py" in files and importlib.util.find_spec("triton") is not None
    assert ("triton" in table) == triton_here
    # one signature across backends: the same parameter names in the same order
    names = {b: list(inspect.signature(fn).parameters) for b, fn in table.items() if b != "triton"}
    assert len({tuple(v) for v in names.values()}) == 1, names


@pytest.mark.parametrize("op", sorted(ENTRIES))
def test_entry_function_forces_a_backend_with_backend_keyword(op, monkeypatch):
    pkg = importlib.import_module(f"layers.ops.{op}")
    entry = getattr(pkg, ENTRIES[op])
    param = inspect.signature(entry).parameters.get("backend")
    assert param is not None and param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is None
    calls = []
    for name in ("naive", "chunked"):
        monkeypatch.setitem(pkg.BACKENDS, name, lambda *a, _name=name, **k: calls.append(_name) or _name)
    n_args = sum(p.default is inspect.Parameter.empty for p in inspect.signature(entry).parameters.values())
    args = [torch.zeros(1)] * n_args  # the stand-ins ignore them; dispatch reads the first one's device
    assert entry(*args, backend="naive") == "naive" and entry(*args, backend="chunked") == "chunked"
    assert calls == ["naive", "chunked"]
