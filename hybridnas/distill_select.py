"""Which attention layers to keep under a budget: greedy and an exact mixed-integer program, and the layer costs.

Post-training search (``hybridnas distill-search``, :mod:`hybridnas.distill`) scores every attention position of
a trained model (the utility of keeping it as attention when the others become a student symbol such as ``M``)
and then chooses the positions to keep. This module makes that choice and prices it:

- :func:`select_layers` ``(scores, k, costs, budget, method)``: the indices to keep. ``"milp"`` is exact
  (``scipy.optimize.milp``, binary ``x``: maximise ``sum s_i x_i`` s.t. ``sum x_i = k`` and ``sum c_i x_i <= budget``,
  each when given), as Puzzle/Puzzletron choose blocks; ``"greedy"`` takes layers by score while they fit.
  :func:`brute_force` (every subset) has the same signature and rules and checks the MILP in the tests.
- :func:`layer_costs`: what keeping each position as attention costs over the student layer there, in decode state
  bytes (the layers' ``state_size``, as :meth:`HybridLM.state_size` adds them) or in measured decode milliseconds.
- :func:`base_cost` / :func:`kept_budget`: the state bytes of the all-student model, so a budget on the whole
  model's state turns into the budget over the kept layers: ``total = base_cost + sum(costs of the kept)``.

Rules shared by both methods (and :func:`brute_force`):

- ``k`` given: exactly ``k`` layers. ``budget`` given: their costs sum to at most ``budget`` (a relative tolerance
  of 1e-9 absorbs float rounding). At least one of them is required; a budget needs ``costs``.
- Only a budget (no ``k``): the most utility under the budget, and among equally good choices the fewest layers.
  So a layer of non-positive score is never kept when the costs are non-negative (as state bytes are whenever
  the student's state is smaller than the KV cache it replaces); with a negative cost it is kept only when the
  room it frees lets better layers in.
- Infeasible (no ``k`` layers fit, or even the cheapest choice exceeds the budget): :class:`ValueError` naming
  ``k``, the budget and the cheapest cost any allowed choice has.
- NaN or infinite scores, costs or budget are refused by index. Ties in utility may resolve to any optimal
  choice for ``"milp"``; scores are scaled to a largest magnitude of 1 and HiGHS stops within an absolute gap of
  1e-6, so utilities closer than a millionth of the largest score count as ties.
- After solving, a "trust but verify" pass (as Puzzletron's MIP does) rounds the solution, re-counts it, re-sums
  its cost against the budget and its utility against the solver's objective; a mismatch is a ``RuntimeError``
  (a budget overrun within the solver's feasibility tolerance is first re-solved under a tightened budget).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import time
from typing import Any

import numpy as np
import torch

from hybridnas import patterns, registry
from hybridnas.model import _layer_params
from hybridnas.schema import ModelConfig

METHODS = ("milp", "greedy")
METRICS = ("state_bytes", "decode_ms")
_REL_TOL = 1e-9


# ---------------------------------------------------------------------------------------------- checks


def _finite(value: Any, name: str, what: str) -> float:
    """``value`` as a finite float, else ValueError naming ``name`` (``what``: the rule, for the message)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} is {f}: {what}")
    return f


def _finite_list(values: Any, name: str) -> list[float]:
    return [_finite(v, f"{name}[{i}]", "scores and costs must be finite numbers") for i, v in enumerate(values)]


def _check(scores: Any, k: int | None, costs: Any, budget: float | None
           ) -> tuple[list[float], list[float] | None, float | None, float]:
    """Validated ``scores, costs, budget`` and the budget tolerance; raises ValueError (one line) on bad input."""
    s = _finite_list(scores, "scores")
    n = len(s)
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int | np.integer):
            raise ValueError(f"k must be an integer or None, got {k!r}")
        if not 0 <= k <= n:
            raise ValueError(f"k={k} is out of range: there are {n} candidate layers")
    c = None
    if costs is not None:
        c = _finite_list(costs, "costs")
        if len(c) != n:
            raise ValueError(f"costs has {len(c)} entries but scores has {n}: one cost per candidate layer")
    if budget is not None:
        budget = _finite(budget, "budget", "it must be a finite number")
        if c is None:
            raise ValueError("a budget needs costs: one cost per candidate layer")
    if k is None and budget is None:
        raise ValueError("give k or a budget (or both): nothing limits the choice otherwise")
    tol = 0.0
    if budget is not None:
        tol = _REL_TOL * max(1.0, abs(budget), sum(abs(x) for x in c))
    return s, c, budget, tol


def _cheapest(costs: list[float], k: int | None) -> float:
    """The least total cost any allowed choice has: the ``k`` cheapest, or (no ``k``) every negative cost."""
    if k is not None:
        return sum(sorted(costs)[:k])
    return sum(x for x in costs if x < 0)


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _require_feasible(costs: list[float] | None, k: int | None, budget: float | None, tol: float) -> None:
    if budget is None:
        return
    cheapest = _cheapest(costs, k)
    if cheapest > budget + tol:
        what = f"k={k} layers" if k is not None else "layers (k not set)"
        raise ValueError(f"no choice of {what} fits budget {_fmt(budget)}: the cheapest feasible cost is "
                         f"{_fmt(cheapest)}; raise the budget or lower k")


# ---------------------------------------------------------------------------------------------- solvers


def brute_force(scores: list[float], k: int | None, costs: list[float] | None = None,
                budget: float | None = None, method: str = "milp") -> list[int]:
    """Every subset tried (for tests, ``n <= ~15``): the same rules and errors as :func:`select_layers`'s MILP.
    ``method`` is accepted for the shared signature and ignored. Ties: the fewest layers, then the smallest
    indices."""
    del method
    s, c, budget, tol = _check(scores, k, costs, budget)
    _require_feasible(c, k, budget, tol)
    n = len(s)
    best: tuple[float, int] | None = None
    best_set: tuple[int, ...] = ()
    utol = _REL_TOL * max(1.0, sum(abs(x) for x in s))
    sizes = [k] if k is not None else range(n + 1)
    for size in sizes:
        for subset in itertools.combinations(range(n), size):
            if budget is not None and sum(c[i] for i in subset) > budget + tol:
                continue
            u = sum(s[i] for i in subset)
            if best is None or u > best[0] + utol:
                best, best_set = (u, size), subset
    return list(best_set)


def _greedy(s: list[float], k: int | None, c: list[float] | None, budget: float | None, tol: float) -> list[int]:
    order = sorted(range(len(s)), key=lambda i: (-s[i], i))
    chosen: list[int] = []
    spent = 0.0
    for i in order:
        if k is not None and len(chosen) == k:
            break
        if k is None and s[i] <= 0:
            break  # budget only: a layer adding no utility is not kept
        if budget is not None and spent + c[i] > budget + tol:
            continue
        chosen.append(i)
        spent += c[i] if c is not None else 0.0
    if k is not None and len(chosen) < k:
        raise ValueError(f"greedy kept only {len(chosen)} of k={k} layers within budget {_fmt(budget)} (taking "
                         f"them by score); method='milp' finds a choice of k layers that fits")
    return sorted(chosen)


def _solve(s: np.ndarray, k: int | None, c: np.ndarray | None, rhs: float | None,
           min_utility: float | None = None) -> tuple[np.ndarray, float] | None:
    """One HiGHS run: maximise ``s.x`` (or, with ``min_utility``, minimise the count subject to ``s.x >= it``);
    the solution and the objective the solver reports for it (None when it finds none)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    n = len(s)
    cons = []
    if k is not None:
        cons.append(LinearConstraint(np.ones((1, n)), k, k))
    if rhs is not None:
        cons.append(LinearConstraint(c[None, :], -np.inf, rhs))
    objective = -s
    if min_utility is not None:
        cons.append(LinearConstraint(s[None, :], min_utility, np.inf))
        objective = np.ones(n)
    res = milp(objective, integrality=np.ones(n), bounds=Bounds(0, 1), constraints=cons or None,
               options={"mip_rel_gap": 0.0})
    if res.status != 0 or res.x is None:
        return None
    return res.x, float(res.fun)


def _verify(x: np.ndarray, s: list[float], k: int | None, c: list[float] | None, budget: float | None,
            tol: float) -> tuple[list[int], float]:
    """Trust but verify: a binary solution with the right count; returns the chosen indices and their budget
    overrun (0 when within ``budget + tol``)."""
    if np.abs(x - np.round(x)).max(initial=0.0) > 1e-6:
        raise RuntimeError(f"the MILP solver returned a non-binary solution {x.tolist()}")
    chosen = [i for i, v in enumerate(np.round(x)) if v == 1]
    if k is not None and len(chosen) != k:
        raise RuntimeError(f"the MILP solver kept {len(chosen)} layers, not k={k}")
    over = 0.0
    if budget is not None:
        over = max(0.0, sum(c[i] for i in chosen) - (budget + tol))
    return chosen, over


def _milp(s: list[float], k: int | None, c: list[float] | None, budget: float | None, tol: float) -> list[int]:
    n = len(s)
    if n == 0 or k == 0:
        return []
    scale = max(abs(x) for x in s) or 1.0
    s_arr = np.asarray(s) / scale
    c_arr = np.asarray(c) if c is not None else None
    rhs = None if budget is None else budget + tol
    for _ in range(4):  # a budget overrun within HiGHS's feasibility tolerance: re-solve under a tighter budget
        solved = _solve(s_arr, k, c_arr, rhs)
        if solved is None:
            raise RuntimeError(f"the MILP solver found no solution although the k={k} cheapest layers fit "
                               f"budget {budget}")
        x, fun = solved
        chosen, over = _verify(x, s, k, c, budget, tol)
        if over == 0.0:
            break
        rhs -= over
    else:
        raise RuntimeError(f"the MILP solution exceeds budget {budget} by {over} after re-solving")
    utility = sum(s[i] for i in chosen)
    objective = -fun * scale  # what the solver claims; the chosen layers' utility re-summed must agree
    if not math.isclose(utility, objective, rel_tol=1e-6, abs_tol=1e-6 * scale):
        raise RuntimeError(f"the MILP objective {objective} does not match the chosen layers' utility {utility}")
    if k is None and budget is not None:
        # among the choices of the best utility, the fewest layers (a layer adding nothing is not kept)
        floor = utility / scale - _REL_TOL * max(1.0, float(np.abs(s_arr).sum()))
        solved = _solve(s_arr, None, c_arr, rhs, min_utility=floor)
        if solved is not None:
            fewer, over2 = _verify(solved[0], s, None, c, budget, tol)
            u2 = sum(s[i] for i in fewer)
            if over2 == 0.0 and len(fewer) <= len(chosen) and u2 >= utility - 1e-6 * scale:
                chosen = fewer
    return sorted(chosen)


def select_layers(scores: list[float], k: int | None, costs: list[float] | None = None,
                  budget: float | None = None, method: str = "milp") -> list[int]:
    """The sorted indices of the candidate layers to keep as attention.

    ``scores[i]``: utility of keeping candidate ``i`` (bigger is better; may be negative). ``k``: how many to keep
    (None: as many as the budget allows and pay). ``costs[i]``: its cost against ``budget`` (needed with a budget;
    may be negative). ``method``: ``"milp"`` (exact, scipy's HiGHS) or ``"greedy"`` (by score descending, ties by
    index, taking a layer while it fits the budget, until ``k``; with no ``k``, only positive scores). The rules
    and errors are in the module docstring.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    s, c, budget, tol = _check(scores, k, costs, budget)
    _require_feasible(c, k, budget, tol)
    if method == "greedy":
        return _greedy(s, k, c, budget, tol)
    return _milp(s, k, c, budget, tol)


# ---------------------------------------------------------------------------------------------- costs


def _student_params(cfg: ModelConfig, student_symbol: str, student_params: dict | None) -> dict[str, Any]:
    if student_params is not None:
        return dict(student_params)
    return dict(_layer_params(cfg).get(registry.primary(student_symbol), {}))


def _check_positions(symbols: list[str], positions: list[int]) -> None:
    seen = set()
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int | np.integer) or not 0 <= p < len(symbols):
            raise ValueError(f"position {p} is not a layer index of the {len(symbols)}-layer pattern")
        if p in seen:
            raise ValueError(f"position {p} is listed twice")
        seen.add(p)


def attention_positions(symbols: list[str]) -> list[int]:
    """Indices of the attention layers among a pattern's layer symbols."""
    a = registry.primary("A")
    return [i for i, sym in enumerate(symbols) if registry.primary(sym) == a]


def student_model_config(model_cfg: ModelConfig, kept: list[int], student_symbol: str,
                         student_params: dict | None = None, *, positions: list[int] | None = None) -> ModelConfig:
    """The model with every candidate position not in ``kept`` replaced by ``student_symbol``.

    ``positions``: the candidates (default: every attention position of the pattern). ``student_params``: the
    student symbol's parameters (None: the model's own for that symbol, else the layer's defaults). A model that
    already uses the student symbol elsewhere with other parameters is refused (one symbol, one parameter set).
    """
    symbols = patterns.layer_symbols(model_cfg.pattern)
    positions = attention_positions(symbols) if positions is None else list(positions)
    _check_positions(symbols, positions)
    _check_positions(symbols, list(kept))
    stray = sorted(set(kept) - set(positions))
    if stray:
        raise ValueError(f"kept position(s) {stray} are not among the candidate positions {positions}")
    student = registry.primary(student_symbol)
    params = _student_params(model_cfg, student_symbol, student_params)
    own = _layer_params(model_cfg).get(student, {})
    replaced = set(positions) - set(kept)
    others_use_it = any(registry.primary(sym) == student for i, sym in enumerate(symbols) if i not in replaced)
    spec = registry.get(student)
    if others_use_it and dataclasses.asdict(spec.make_config(own)) != dataclasses.asdict(spec.make_config(params)):
        raise ValueError(f"the model already uses {student_symbol} with parameters {own}; the student's {params} "
                         f"would change those layers too")
    new_symbols = [student_symbol if i in replaced else sym for i, sym in enumerate(symbols)]
    layers = {sym: dict(p or {}) for sym, p in (model_cfg.layers or {}).items() if registry.primary(sym) != student}
    if params or others_use_it or replaced:
        layers[student_symbol] = params
    return dataclasses.replace(model_cfg, pattern="".join(new_symbols), layers=layers)


def _build(symbol: str, params: dict[str, Any], d_model: int, idx: int, n: int, device: str | torch.device):
    return registry.get(symbol).build(d_model, params, layer_idx=idx, n_layers=n).to(device)


def _state_bytes(symbol: str, params: dict[str, Any], d_model: int, idx: int, n: int, batch: int, seq_len: int,
                 dtype: torch.dtype) -> int:
    """A layer's ``state_size``, built without memory on the meta device where the layer allows it."""
    spec = registry.get(symbol)  # outside the meta context: a first use imports the layer's module
    try:
        with torch.device("meta"):
            layer = spec.build(d_model, params, layer_idx=idx, n_layers=n)
    except (RuntimeError, NotImplementedError, TypeError):  # a layer whose init needs real values
        layer = spec.build(d_model, params, layer_idx=idx, n_layers=n)
    return int(layer.state_size(batch, seq_len, dtype))


@torch.no_grad()
def _decode_ms(layer: torch.nn.Module, d_model: int, batch: int, seq_len: int, repeats: int,
               device: torch.device) -> float:
    """Median ms of one ``step`` of one token after a ``seq_len``-token prefill (random inputs, eval mode)."""
    layer.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq_len, d_model, generator=gen).to(device)
    xt = torch.randn(batch, 1, d_model, generator=gen).to(device)
    _, state = layer.prefill(x, {})
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for r in range(repeats + 2):  # two warm-up steps; every step starts from the prefilled state (context seq_len)
        sync()
        t0 = time.perf_counter()
        layer.step(xt, state, {})
        sync()
        if r >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def layer_costs(model_cfg: ModelConfig, positions: list[int], student_symbol: str, student_params: dict | None,
                metric: str, seq_len: int, batch: int = 1, *, repeats: int = 7, device: str = "cpu",
                dtype: torch.dtype = torch.float32) -> list[float]:
    """What keeping each position in ``positions`` as it is costs over ``student_symbol`` there, one per position.

    - ``"state_bytes"``: the layer's ``state_size(batch, seq_len, dtype)`` minus the student layer's at the same
      index: exactly the difference of :meth:`HybridLM.state_size` between the model keeping that layer and the
      model replacing it (everything else equal), so the costs add up over any set of kept layers.
    - ``"decode_ms"``: measured on this machine (``device``): the median over ``repeats`` timed steps of one token
      after a ``seq_len``-token prefill of that layer alone, minus the student layer's, with random weights and
      inputs. Layers of the same symbol and parameters are timed once and share the figure (their cost is the
      same; timing each would add only noise). Figures differ between machines and with load: measure on the
      machine that will serve, and compare budgets in the same run.

    ``student_params``: None means the model's own parameters for the student symbol (else its defaults). The
    cost may be negative (a student whose state is bigger than a short KV cache).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if seq_len < 1 or batch < 1:
        raise ValueError(f"seq_len and batch must be >= 1, got seq_len={seq_len}, batch={batch}")
    symbols = patterns.layer_symbols(model_cfg.pattern)
    _check_positions(symbols, positions)
    params = _layer_params(model_cfg)
    sparams = _student_params(model_cfg, student_symbol, student_params)
    n, d = len(symbols), model_cfg.d_model
    costs: list[float] = []
    if metric == "state_bytes":
        for p in positions:
            sym = symbols[p]
            own = _state_bytes(sym, params.get(registry.primary(sym), {}), d, p, n, batch, seq_len, dtype)
            stu = _state_bytes(student_symbol, sparams, d, p, n, batch, seq_len, dtype)
            costs.append(float(own - stu))
        return costs
    dev = torch.device(device)
    timed: dict[tuple[str, str], float] = {}

    def ms(sym: str, p_: dict[str, Any], idx: int) -> float:
        key = (registry.primary(sym), repr(sorted(p_.items())))
        if key not in timed:
            timed[key] = _decode_ms(_build(sym, p_, d, idx, n, dev), d, batch, seq_len, repeats, dev)
        return timed[key]

    for p in positions:
        sym = symbols[p]
        costs.append(ms(sym, params.get(registry.primary(sym), {}), p) - ms(student_symbol, sparams, p))
    return costs


def base_cost(model_cfg: ModelConfig, positions: list[int], student_symbol: str, student_params: dict | None,
              seq_len: int, batch: int = 1, *, dtype: torch.dtype = torch.float32) -> int:
    """Decode state bytes of the model with every position in ``positions`` replaced by the student (the
    all-student model's :meth:`HybridLM.state_size`): the part of the state no choice of kept layers changes.
    Keeping a set ``K`` gives a model of ``base_cost + sum(layer_costs(..., "state_bytes")[K])`` bytes."""
    symbols = patterns.layer_symbols(model_cfg.pattern)
    _check_positions(symbols, positions)
    params = _layer_params(model_cfg)
    sparams = _student_params(model_cfg, student_symbol, student_params)
    replaced = set(positions)
    total = 0
    for i, sym in enumerate(symbols):
        if i in replaced:
            total += _state_bytes(student_symbol, sparams, model_cfg.d_model, i, len(symbols), batch, seq_len, dtype)
        else:
            total += _state_bytes(sym, params.get(registry.primary(sym), {}), model_cfg.d_model, i, len(symbols),
                                  batch, seq_len, dtype)
    return total


def kept_budget(total_state_bytes: float, model_cfg: ModelConfig, positions: list[int], student_symbol: str,
                student_params: dict | None, seq_len: int, batch: int = 1) -> float:
    """A budget on the whole model's decode state turned into the budget over the kept layers' costs
    (``total - base_cost``), for :func:`select_layers` with the ``"state_bytes"`` costs. Negative when even the
    all-student model exceeds it (the selection then reports the problem infeasible)."""
    return float(total_state_bytes) - base_cost(model_cfg, positions, student_symbol, student_params, seq_len, batch)
