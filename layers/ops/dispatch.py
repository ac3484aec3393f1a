"""Which implementation of an op runs: ``naive`` (token loop, the oracle), ``chunked`` (PyTorch) or ``triton``.

Resolution order: a backend forced by :func:`force` (a context manager, used by ``hybridnas bench`` and tests),
then the ``HYBRIDNAS_BACKEND`` environment variable, then the layer's own ``backend`` config key, then ``auto``:
Triton on CUDA tensors when the op has a Triton path and ``triton`` imports, else chunked.

Every op package ``layers.ops.<op>`` keeps one table ``BACKENDS = {"naive": f0, "chunked": f1, "triton": f2}``
(all with one signature) and its entry function takes ``backend=`` (the layer's config key) and calls
``dispatch.run("<op>", BACKENDS, x, *args, backend=backend)``. A forced backend the op does not have, or one
that cannot run here (Triton without CUDA and without ``TRITON_INTERPRET=1``), raises :class:`BackendError`
naming the op and what is available.

Triton that checks itself: the first time ``run`` would call an op's ``triton`` path for a given (op, device,
dtype), it runs the kernel and the ``chunked`` path on a tiny input (the probe the op gave :func:`register`, else the
call's own arguments) and compares them. A compile or launch error, a non-finite value or a mismatch beyond
:data:`TOLERANCE` warns once and sends that (op, device, dtype) to ``chunked`` for the rest of the process; the
reason is kept in :data:`FALLBACKS` (``hybridnas search`` writes :func:`fallbacks` onto each trial's user attrs,
``hybridnas doctor`` prints them). A kernel that passes its check but raises on a later call falls back the same
way. Only the forward pass is compared.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

BACKENDS = ("naive", "chunked", "triton")
ENV = "HYBRIDNAS_BACKEND"
_forced: list[str] = []

#: relative error (norm of the difference over the norm of the chunked output) a Triton path may have in its check
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
LOW_PRECISION_TOLERANCE = 5e-2  # fp16, bf16
#: (op, device, dtype) -> why its Triton path is not used (failed self-check or a failed launch)
FALLBACKS: dict[tuple[str, str, str], str] = {}
_CHECKED: dict[tuple[str, str, str], bool] = {}  # (op, device, dtype) -> the Triton path passed its check
#: op -> its BACKENDS table and probe (``probe(device, dtype) -> (args, kwargs)``: a tiny input for the self-check)
_OPS: dict[str, tuple[dict[str, Callable[..., Any]], Callable[..., tuple[tuple, dict]] | None]] = {}


class BackendError(RuntimeError):
    pass


@contextlib.contextmanager
def force(backend: str | None) -> Iterator[None]:
    """Within the block every op runs ``backend`` (None or ``auto``: no forcing)."""
    if backend not in (None, "auto") and backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose from auto, {', '.join(BACKENDS)}")
    _forced.append(backend or "auto")
    try:
        yield
    finally:
        _forced.pop()


def triton_usable(device: torch.device) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def triton_backend(module: str, name: str) -> dict[str, Callable[..., Any]]:
    """``{"triton": f}`` where ``f`` imports ``module.name`` on first call, or ``{}`` when triton is not installed:
    an op's ``BACKENDS.update(...)`` line, so importing an op never imports triton (and a kernel module is
    decorated only when first used, after a test has set ``TRITON_INTERPRET``)."""
    if importlib.util.find_spec("triton") is None:
        return {}

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return {"triton": call}


def register(op: str, table: dict[str, Callable[..., Any]],
             probe: Callable[[torch.device, torch.dtype], tuple[tuple, dict]] | None = None) -> None:
    """Declare ``op``'s backend table (for ``hybridnas doctor``) and the tiny input its Triton self-check uses."""
    _OPS[op] = (table, probe)


def registered() -> dict[str, dict[str, Callable[..., Any]]]:
    """op -> its BACKENDS table, for the op packages imported so far (:func:`import_ops` imports them all)."""
    return {op: table for op, (table, _) in _OPS.items()}


def import_ops() -> dict[str, dict[str, Callable[..., Any]]]:
    """Import every ``layers.ops.<op>`` package so all ops are :func:`registered`."""
    import pkgutil

    import layers.ops

    for info in pkgutil.iter_modules(layers.ops.__path__):
        if info.ispkg:
            importlib.import_module(f"layers.ops.{info.name}")
    return registered()


def fallbacks() -> dict[str, str]:
    """``{"op/device/dtype": reason}`` for every Triton path sent to chunked in this process (JSON-friendly)."""
    return {"/".join(key): reason for key, reason in FALLBACKS.items()}


def reset_checks() -> None:
    """Forget every self-check and fallback (tests; ``hybridnas doctor`` re-checking)."""
    FALLBACKS.clear()
    _CHECKED.clear()


def _key(op: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str, str]:
    return op, str(device), str(dtype).removeprefix("torch.")


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _tensors(out[k])]
    if isinstance(out, list | tuple):
        return [t for v in out for t in _tensors(v)]
    return []


def compare(ref: Any, got: Any, dtype: torch.dtype) -> str | None:
    """None when ``got`` matches ``ref`` (every tensor in them, in order) within the dtype's tolerance, else why."""
    a, b = _tensors(ref), _tensors(got)
    if len(a) != len(b):
        return f"returned {len(b)} tensors, the chunked path {len(a)}"
    tol = TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE)
    for i, (r, g) in enumerate(zip(a, b)):
        if r.shape != g.shape:
            return f"output {i} has shape {tuple(g.shape)}, the chunked path {tuple(r.shape)}"
        r64, g64 = r.detach().double(), g.detach().double()
        if not bool(torch.isfinite(g64).all()):
            return f"output {i} holds non-finite values"
        err = float((g64 - r64).norm() / r64.norm().clamp_min(1e-12))
        if not err <= tol:
            return f"output {i} differs from the chunked path: relative error {err:.3g} > {tol:g}"
    return None


def _fall_back(key: tuple[str, str, str], reason: str) -> None:
    _CHECKED[key] = False
    if key not in FALLBACKS:
        FALLBACKS[key] = reason
        warnings.warn(f"op {key[0]!r} on {key[1]} {key[2]}: the triton backend {reason}; using chunked instead",
                      RuntimeWarning, stacklevel=4)


def self_check(op: str, available: dict[str, Callable[..., Any]], device: torch.device, dtype: torch.dtype,
               args: tuple = (), kwargs: dict | None = None) -> bool:
    """Whether ``op``'s Triton path may run on (device, dtype): checked against ``chunked`` once, then cached.
    ``args``/``kwargs`` (the call's own) serve as the input when the op registered no probe."""
    key = _key(op, device, dtype)
    if key in _CHECKED:
        return _CHECKED[key]
    if "chunked" not in available:  # nothing to compare with (and nothing to fall back to)
        _CHECKED[key] = True
        return True
    probe = _OPS.get(op, (None, None))[1]
    reason = None
    try:
        if probe is not None:
            args, kwargs = probe(device, dtype)
        with torch.no_grad():
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            ref = available["chunked"](*args, **(kwargs or {}))
            try:
                got = available["triton"](*args, **(kwargs or {}))
            except Exception as e:  # a compile or launch error: the kernel cannot run here
                reason = f"failed its self-check ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
            else:
                why = compare(ref, got, dtype)
                if why is not None:
                    reason = f"failed its self-check: {why}"
    except Exception as e:  # the probe or the chunked path itself: not the kernel's fault, do not judge it
        warnings.warn(f"op {op!r}: the triton self-check could not run ({type(e).__name__}: {e})", RuntimeWarning,
                      stacklevel=3)
        _CHECKED[key] = True
        return True
    if reason is not None:
        _fall_back(key, reason)
        return False
    _CHECKED[key] = True
    return True


_eager_self_check: list[Callable[..., bool]] = []


def _self_check_outside_graph(*args: Any) -> bool:
    """:func:`self_check` run eagerly from inside ``torch.compile`` (dynamo then sees only the cached answer).
    Wrapped on first use: ``torch.compiler.disable`` imports dynamo, which imports triton, and the Triton
    interpreter needs ``TRITON_INTERPRET`` set before triton is first imported."""
    if not _eager_self_check:
        _eager_self_check.append(torch.compiler.disable(self_check))
    return _eager_self_check[0](*args)


def requested(backend: str | None = None) -> str:
    """The backend asked for, before checking what the op offers: forced > env > config > auto."""
    if _forced and _forced[-1] != "auto":
        return _forced[-1]
    env = os.environ.get(ENV, "").strip().lower()
    if env and env != "auto":
        if env not in BACKENDS:
            raise BackendError(f"{ENV}={env!r} is not a backend; choose from auto, {', '.join(BACKENDS)}")
        return env
    if backend and backend != "auto":
        if backend not in BACKENDS:
            raise BackendError(f"backend {backend!r} is not one of auto, {', '.join(BACKENDS)}")
        return backend
    return "auto"


def choose(op: str, available: dict[str, Callable[..., Any]], device: torch.device,
           backend: str | None = None) -> str:
    want = requested(backend)
    if want == "auto":
        if "triton" in available and device.type == "cuda" and triton_usable(device):
            return "triton"
        return "chunked" if "chunked" in available else "naive"
    if want not in available:
        raise BackendError(f"op {op!r} has no {want!r} backend (forced by {ENV} or config); it has: "
                           f"{', '.join(available)}")
    if want == "triton" and not triton_usable(device):
        raise BackendError(f"op {op!r}: the triton backend needs a CUDA device (or TRITON_INTERPRET=1) and the "
                           f"triton package; tensors are on {device}")
    return want


def run(op: str, available: dict[str, Callable[..., Any]], x: torch.Tensor, *args: Any,
        backend: str | None = None, **kwargs: Any) -> Any:
    """Call the chosen implementation of ``op`` with ``(x, *args, **kwargs)``; ``backend`` is the layer's config
    key (below a forced backend and the environment variable). A Triton path runs only once it passed its
    :func:`self_check` on (device, dtype); one that fails it, or raises later, is replaced by ``chunked``."""
    name = choose(op, available, x.device, backend)
    if name != "triton" or "chunked" not in available:
        return available[name](x, *args, **kwargs)
    ok = _CHECKED.get(_key(op, x.device, x.dtype))
    if ok is None:
        check = _self_check_outside_graph if torch.compiler.is_compiling() else self_check
        ok = check(op, available, x.device, x.dtype, (x, *args), kwargs)
    if not ok:
        return available["chunked"](x, *args, **kwargs)
    try:
        return available["triton"](x, *args, **kwargs)
    except torch.cuda.OutOfMemoryError:  # the batch is too large, not the kernel broken: the caller decides
        raise
    except Exception as e:  # passed its check, fails on this input (shape, resources): chunked from now on
        out = available["chunked"](x, *args, **kwargs)  # raises too on a bad input: then nothing is recorded
        _fall_back(_key(op, x.device, x.dtype), f"raised {type(e).__name__}: {str(e)[:200]}")
        return out
