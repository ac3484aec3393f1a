"""``hybridnas doctor``: what this machine runs. Versions (python, torch, triton, optuna, CUDA), devices, the
backend each op gets on each device, and the Triton self-checks of :mod:`layers.ops.dispatch` (on CUDA always;
on CPU only with ``--interpret``, under ``TRITON_INTERPRET=1``, since the interpreter is slow and auto never
picks Triton on CPU). Exit code 1 when a Triton path failed its self-check (it falls back to chunked).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys
from collections.abc import Callable

import torch

from layers.ops import dispatch

#: dtypes checked per device: what training runs in (fp32 on CPU; fp32 and bf16 autocast on CUDA)
CHECK_DTYPES = {"cpu": (torch.float32,), "cuda": (torch.float32, torch.bfloat16)}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "optuna": _version("optuna"),
        "cuda": (f"{torch.version.cuda} ({torch.cuda.device_count()} device(s))" if torch.version.cuda
                 and torch.cuda.is_available() else f"{torch.version.cuda or 'none'} (no CUDA device available)"),
    }


def devices() -> list[torch.device]:
    return [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def op_rows(device: torch.device, interpret: bool) -> list[tuple[str, str, str]]:
    """(op, backend chosen, what the self-check found) for every op on ``device``; runs the self-checks."""
    rows = []
    for op, table in sorted(dispatch.import_ops().items()):
        try:
            chosen = dispatch.choose(op, table, device)
        except dispatch.BackendError as e:
            rows.append((op, "error", str(e)))
            continue
        if "triton" not in table:
            rows.append((op, chosen, "no triton kernel"))
            continue
        if device.type == "cpu" and not interpret:
            rows.append((op, chosen, "triton is not used on CPU (--interpret checks the kernels under "
                                     "TRITON_INTERPRET=1)"))
            continue
        if not dispatch.triton_usable(device):
            rows.append((op, chosen, "triton unusable here"))
            continue
        notes = []
        for dtype in CHECK_DTYPES.get(device.type, (torch.float32,)):
            ok = dispatch.self_check(op, table, device, dtype)
            key = dispatch._key(op, device, dtype)
            notes.append(f"{key[2]} ok" if ok else f"{key[2]} FALLBACK to chunked: {dispatch.FALLBACKS.get(key)}")
        if chosen == "triton" and not dispatch._CHECKED.get(dispatch._key(op, device, torch.float32), True):
            chosen = "chunked (triton failed its check)"
        rows.append((op, chosen, "self-check " + "; ".join(notes)))
    return rows


def run(interpret: bool = False, out: Callable[[str], None] = print) -> int:
    late = False
    if interpret:
        # before triton is first imported: @triton.jit (triton's own helpers too) then builds interpreted kernels
        late = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
        os.environ["TRITON_INTERPRET"] = "1"
    for name, value in versions().items():
        out(f"{name:8s} {value}")
    cxx = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    out(f"{'c++':8s} {cxx or 'not found (torch.compile with inductor cannot build CPU kernels)'}")
    forced = os.environ.get(dispatch.ENV)
    if forced:
        out(f"{dispatch.ENV}={forced} (forces every op's backend)")
    out("train.compile auto: torch.compile on CUDA, eager on CPU")
    if late:
        out("note: triton was imported before TRITON_INTERPRET=1 was set; CPU self-checks may fail for that reason "
            "alone (run `hybridnas doctor --interpret` in a fresh process)")
    failed = False
    for device in devices():
        out("")
        out(f"device {device_name(device)}")
        rows = op_rows(device, interpret)
        width = max(len(r[0]) for r in rows)
        bwidth = max(len(r[1]) for r in rows)
        for op, chosen, note in rows:
            out(f"  {op:{width}s}  {chosen:{bwidth}s}  {note}")
            failed |= "FALLBACK" in note
    return 1 if failed else 0
