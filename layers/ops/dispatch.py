"""Which implementation of an op runs: ``naive`` (token loop, the oracle), ``chunked`` (PyTorch) or ``triton``.

Resolution order: a backend forced by :func:`force` (a context manager, used by ``hybridnas bench`` and tests),
then the ``HYBRIDNAS_BACKEND`` environment variable, then the layer's own ``backend`` config key, then ``auto``:
Triton on CUDA tensors when the op has a Triton path and ``triton`` imports, else chunked.

Every op package ``layers.ops.<op>`` keeps one table ``BACKENDS = {"naive": f0, "chunked": f1, "triton": f2}``
(all with one signature) and its entry function takes ``backend=`` (the layer's config key) and calls
``dispatch.run("<op>", BACKENDS, x, *args, backend=backend)``. A forced backend the op does not have, or one
that cannot run here (Triton without CUDA and without ``TRITON_INTERPRET=1``), raises :class:`BackendError`
naming the op and what is available.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

BACKENDS = ("naive", "chunked", "triton")
ENV = "HYBRIDNAS_BACKEND"
_forced: list[str] = []


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
    key (below a forced backend and the environment variable)."""
    return available[choose(op, available, x.device, backend)](x, *args, **kwargs)
