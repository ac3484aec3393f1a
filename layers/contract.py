"""The layer contract of :mod:`layers.base`, checked: what a class must define and how a built layer must behave.

- :func:`check_class` - structure, run by :mod:`layers.registry` on every class it registers (a built-in when
  first loaded): a :class:`~layers.base.Layer` subclass with a ``Config`` dataclass that defines every method
  of :data:`REQUIRED` itself or through a real parent.
- :func:`check_behaviour` - the tiny numerical checks the test suite runs for every built-in, for any class:
  it builds, ``forward`` keeps the shape, ``step`` after ``prefill`` equals ``forward``, ``param_count`` equals
  the module's parameters, ``state_size`` is a byte count. ``hybridnas validate`` runs them on custom symbols.

Both return a list of problems (empty when the class passes) so callers choose how to report them.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from typing import Any

import torch
from torch import nn

from layers.base import Layer

#: Methods every layer needs. ``Layer`` declares them as ``NotImplementedError`` stubs; ``TokenwiseLayer``
#: provides ``prefill``, ``step`` and ``state_size`` for position-wise layers (MLP, MoE).
REQUIRED = ("param_count", "reset_parameters", "forward", "prefill", "step", "state_size")
#: Prompt lengths :func:`check_behaviour` prefills before stepping: one token, a short prompt, the whole sequence.
PREFILL_LENGTHS = (1, 5)
TOLERANCE = 1e-5


def _raises_not_implemented(fn: Any) -> bool:
    """True when ``fn``'s body (docstring aside) is only ``raise NotImplementedError``: a stub, not a method."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):  # no source (built dynamically, C): count it as defined
        return False
    func = tree.body[0]
    if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
        return False
    body = [s for s in func.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if len(body) != 1 or not isinstance(body[0], ast.Raise) or body[0].exc is None:
        return False
    exc = body[0].exc.func if isinstance(body[0].exc, ast.Call) else body[0].exc
    return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"


def missing_methods(cls: type) -> list[str]:
    """The names of :data:`REQUIRED` that ``cls`` does not really define: inherited only from ``Layer`` (or
    ``nn.Module``), abstract, or a stub that raises ``NotImplementedError``. A mixin parent counts."""
    missing = []
    for name in REQUIRED:
        owner = next((c for c in cls.__mro__ if name in vars(c)), None)
        if owner in (None, Layer, nn.Module, object):
            missing.append(name)
            continue
        fn = inspect.unwrap(getattr(vars(owner)[name], "__func__", vars(owner)[name]))
        if getattr(fn, "__isabstractmethod__", False) or _raises_not_implemented(fn):
            missing.append(name)
    return missing


def check_class(cls: Any) -> list[str]:
    """Structural problems of ``cls`` as a layer (empty when it may be registered)."""
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        return [f"{cls!r} is not a subclass of layers.base.Layer"]
    problems = []
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        problems.append(f"{cls.__name__} has no Config dataclass")
    missing = missing_methods(cls)
    if missing:
        problems.append(f"{cls.__name__} does not define {', '.join(missing)} (the layer contract needs "
                        f"{', '.join(REQUIRED)}; TokenwiseLayer provides prefill, step and state_size for "
                        f"position-wise layers)")
    return problems


def _error(what: str, e: Exception) -> str:
    return f"{what} raised {type(e).__name__}: {e}"


def _decode(layer: Layer, x: torch.Tensor, n_prefill: int) -> tuple[torch.Tensor, list[str]]:
    """``prefill`` on the first ``n_prefill`` tokens, then ``step`` token by token; the outputs concatenated."""
    y0, state = layer.prefill(x[:, :n_prefill], {})
    ys, problems = [y0], []
    for t in range(n_prefill, x.shape[1]):
        y_t, state = layer.step(x[:, t:t + 1], state, {})
        if y_t.shape != (x.shape[0], 1, x.shape[2]):
            problems.append(f"step returned shape {tuple(y_t.shape)}, expected {(x.shape[0], 1, x.shape[2])}")
            break
        ys.append(y_t)
    return torch.cat(ys, dim=1), problems


def _check_built(layer: Layer, cls: type, d_model: int, config: Any, batch: int, seq_len: int) -> list[str]:
    problems = []
    try:
        n = cls.param_count(d_model, config)
        actual = sum(p.numel() for p in layer.parameters())
        if n != actual:
            problems.append(f"param_count(d_model={d_model}) is {n} but the module has {actual} parameters")
    except Exception as e:
        problems.append(_error("param_count", e))
    if cls.kind not in ("mixer", "ffn"):
        problems.append(f"kind is {cls.kind!r}, expected 'mixer' or 'ffn'")
    try:
        size = layer.state_size(batch, seq_len, torch.float32)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            problems.append(f"state_size(batch={batch}, seq_len={seq_len}) is {size!r}, expected bytes (an int >= 0)")
    except Exception as e:
        problems.append(_error("state_size", e))
    return problems


def _check_forward(layer: Layer, x: torch.Tensor) -> list[str]:
    y = layer(x, {})
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype:
        got = (tuple(y.shape), y.dtype) if isinstance(y, torch.Tensor) else type(y).__name__
        return [f"forward returned {got}, expected shape {tuple(x.shape)} and dtype {x.dtype}"]
    if not torch.isfinite(y).all():
        return ["forward returned non-finite values"]
    aux = layer.aux_loss()
    if aux is not None and not (isinstance(aux, torch.Tensor) and aux.ndim == 0 and torch.isfinite(aux)):
        return [f"aux_loss returned {aux!r}, expected None or a finite scalar tensor"]
    return []


@torch.no_grad()
def _check_decode(layer: Layer, x: torch.Tensor, tol: float) -> list[str]:
    ref = layer(x, {})
    for n_prefill in sorted({min(n, x.shape[1]) for n in PREFILL_LENGTHS} | {x.shape[1]}):
        got, problems = _decode(layer, x, n_prefill)
        if problems:
            return problems
        err = (got - ref).abs().max().item()
        if not err <= tol:
            return [f"step after prefill of {n_prefill} token(s) differs from forward by {err:.3g} (> {tol})"]
    return []


def check_behaviour(cls: type, d_model: int, config: Any, *, batch: int = 2, seq_len: int = 12,
                    tol: float = TOLERANCE, seed: int = 0) -> list[str]:
    """Build ``cls(d_model, config)`` and run the contract's numerical checks on random inputs (fp32, CPU).

    Checks: ``param_count`` equals ``sum(p.numel())``; ``kind`` is mixer or ffn; ``state_size`` is an int >= 0;
    ``forward`` (training mode) keeps shape and dtype and is finite, ``aux_loss`` is None or a finite scalar;
    in eval mode, ``prefill`` of 1, 5 and all tokens followed by ``step`` matches ``forward`` within ``tol``.
    The global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            layer = cls(d_model, config, layer_idx=1, n_layers=2)
        except Exception as e:
            return [_error(f"building {cls.__name__}(d_model={d_model})", e)]
        problems = _check_built(layer, cls, d_model, config, batch, seq_len)
        x = torch.randn(batch, seq_len, d_model, generator=torch.Generator().manual_seed(seed + 1))
        for what, check in (("forward", lambda: _check_forward(layer.train(), x)),
                            ("prefill/step", lambda: _check_decode(layer.eval(), x, tol))):
            try:
                found = check()
            except Exception as e:
                found = [_error(what, e)]
            problems += found
            if found:
                break
    return problems
