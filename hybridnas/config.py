"""Typed configs read from YAML, with file/line/field errors.

Two shapes of file:

- an *architecture* file (``hybridnas train ARCH.yaml``, ``architecture.yaml`` of an export): concrete values,
  read into :class:`ArchConfig`;
- a *search space* (``hybridnas search SPACE.yaml``): the same sections, but any value in ``model`` (and in
  ``model.layers.<SYMBOL>``) and in ``train`` may be a list (categorical choice) or ``{low, high, log, step}``
  (a range). Read into :class:`SearchSpace`.

The dataclasses live in :mod:`hybridnas.schema` (re-exported here); type and bound checks of single values are
:mod:`hybridnas.validation`'s. This module walks the sections, resolves tasks and layer symbols, and checks what
spans fields: patterns, layer parameter combinations, the task's vocabulary, the search settings' relations.
"""

from __future__ import annotations

import itertools
import math
import typing
from collections.abc import Collection
from dataclasses import asdict, fields
from typing import Any

from hybridnas import patterns, registry
from hybridnas.pattern_space import parse_pattern_space
from hybridnas.schema import (
    CONSTRAINTS,
    MAX_LAYER_INT,
    MAX_PARAMS,
    MAX_VOCAB,
    METRICS,
    ArchConfig,
    ExportSettings,
    ModelConfig,
    Name,
    Range,
    SearchSettings,
    SearchSpace,
    TaskSpec,
    TrainConfig,
    arch_key,
    range_values,
    resolved_layers,
    value_options,
)
from hybridnas.validation import check_train, check_value, field_problems, parse_dataclass, parse_searchable
from hybridnas.validation import suggest as _suggest
from hybridnas.yamlio import Collector, ConfigError, PathT, Source, load_file, load_text

__all__ = [
    "CONSTRAINTS", "METRICS", "ArchConfig", "ConfigError", "ExportSettings", "ModelConfig", "Range", "SearchSettings",
    "SearchSpace", "TaskSpec", "TrainConfig", "Trust", "UntrustedCodeError", "arch_key", "check_train", "check_value",
    "load_arch", "load_space", "parse_dataclass", "parse_searchable", "resolved_layers", "value_options",
]


def _check_bounds(cls: type, section: str, values: dict[str, Any], src: Source, errors: Collector) -> None:
    """Every option of every field, checked on its own against the bounds ``cls`` declares for it."""
    for key, value in values.items():
        # a range's ends are enough: the bounds are intervals, and a range within them has its ends within them
        for opt in value_options(value):
            problems = field_problems(cls, {key: opt})
            if problems:
                errors.errors.append(src.error((section, key), problems[0][1]))
                break


class UntrustedCodeError(ConfigError):
    """A file (or a trial's recorded architecture) names custom layer code to import and the caller did not opt in
    with ``trust_custom_code``: nothing was imported."""


Trust = bool | Collection[str]  # True: any import path; a collection: only these import paths; False: none


def _trusted(trust: Trust, path: str) -> bool:
    return trust is True or (not isinstance(trust, bool) and path in trust)


def _register_symbols(data: Any, src: Source, trust: Trust = True) -> dict[str, str]:
    """Register the ``symbols`` section's layers, importing each one's module. Every entry is checked against
    ``trust`` before anything is imported."""
    registry.new_scope()  # a file's symbols are its own: drop those the file loaded before this one declared
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise src.error(("symbols",), "expected a mapping SYMBOL: package.module:ClassName")
    entries = []
    for sym, entry in data.items():
        path = ("symbols", sym)
        aliases: list[str] = []
        if isinstance(entry, dict):
            unknown = set(entry) - {"path", "aliases"}
            if unknown:
                key = sorted(unknown)[0]
                raise src.error(path + (key,), f"unknown key {key!r}" + _suggest(key, ["path", "aliases"]))
            aliases = list(entry.get("aliases") or [])
            entry = entry.get("path")
        if not isinstance(entry, str):
            raise src.error(path, "expected an import path such as 'mypkg.layers:MyMixer'")
        entries.append((sym, entry, aliases))
    for sym, entry, _ in entries:
        if not _trusted(trust, entry):
            module = entry.partition(":")[0] if ":" in entry else (entry.rpartition(".")[0] or entry)
            raise UntrustedCodeError(
                f"names custom layer code to import ({sym} -> {entry}); importing module {module!r} runs its code. "
                "If you trust this file, pass --trust-custom-code (trust_custom_code=True from Python)",
                src.file, src.line(("symbols", sym)), ("symbols", sym))
    out = {}
    for sym, entry, aliases in entries:
        path = ("symbols", sym)
        try:
            registry.register_path(str(sym), entry, aliases=tuple(aliases), scoped=True)
        except registry.RegistryError as e:
            raise src.error(path, str(e)) from None
        out[str(sym)] = entry
    return out


def _parse_task(data: Any, src: Source) -> TaskSpec:
    from hybridnas.tasks import TASKS, task_config_class
    from hybridnas.tasks.base import TaskConfigError

    if not isinstance(data, dict):
        raise src.error(("task",), "expected a mapping with at least 'name' (one of: " + ", ".join(TASKS) + ")")
    name = data.get("name", "mqar")
    if not isinstance(name, str):  # a mapping or a list is not even hashable: never look it up
        raise src.error(("task", "name"), f"expected a task name (a string), got {name!r}; known: {', '.join(TASKS)}")
    if name not in TASKS:
        raise src.error(("task", "name"), f"unknown task {name!r}" + _suggest(name, TASKS)
                        + f"; known: {', '.join(TASKS)}")
    params = {k: v for k, v in data.items() if k != "name"}
    cfg = parse_dataclass(task_config_class(name), params, ("task",), src)
    try:
        if hasattr(cfg, "check"):
            cfg.check()
    except TaskConfigError as e:
        msg = str(e)
        msg = msg[len(e.field) + 2:] if msg.startswith(f"{e.field}: ") else msg
        raise src.error(("task", e.field), msg) from None
    vocab = getattr(cfg, "vocab_size", None)
    if isinstance(vocab, int) and vocab > MAX_VOCAB:
        raise src.error(("task", "vocab_size"), f"must be at most {MAX_VOCAB} (2^24), got {vocab}")
    return TaskSpec(name, asdict(cfg))


def _check_pattern(p: Any, path: PathT, src: Source) -> str:
    if not isinstance(p, str):
        raise src.error(path, f"a pattern must be a string such as 'MMMA', got {p!r}")
    try:
        return patterns.normalize(p)
    except patterns.PatternError as e:
        raise src.error(path, str(e)) from None


def _layer_spec(sym: Any, path: PathT, src: Source) -> registry.LayerSpec:
    try:
        return registry.get(str(sym))
    except registry.RegistryError:
        known = registry.symbol_map()
        raise src.error(path, f"unknown layer symbol {sym!r}" + _suggest(str(sym), known)
                        + f"; registered: {', '.join(sorted(known))}") from None


def _range_text(r: Range) -> str:
    parts = [f"low: {r.low!r}", f"high: {r.high!r}"]
    if r.step is not None:
        parts.append(f"step: {r.step!r}")
    if r.log:
        parts.append("log: true")
    return "{" + ", ".join(parts) + "}"


def _shown(name: str, value: Any, entry: Any) -> str:
    text = f"{name}={value:.6g}" if isinstance(value, float) else f"{name}={value}"
    return text + (f" from the range {_range_text(entry)}" if isinstance(entry, Range) else "")


def _combos(axes: list[Any], budget: int):
    """The combinations of the axes' values to check: all of them (every value of each range, :func:`range_values`)
    when there are at most ``budget``; else each axis swept through all its values while the others take their
    listed choices and range ends, ``budget`` combinations at most in all."""
    full = [range_values(a)[0] for a in axes]
    if math.prod(len(v) for v in full) <= budget:
        yield from itertools.product(*full)
        return
    ends = [value_options(a) for a in axes]
    per_axis = max(1, budget // len(axes))
    for i in range(len(axes)):
        yield from itertools.islice(itertools.product(*(full[j] if j == i else ends[j] for j in range(len(axes)))),
                                    per_axis)


def _check_layer_combos(d_model: Any, layers: dict[str, dict[str, Any]], used: set[str], src: Source,
                        budget: int = 200_000) -> None:
    """Every combination of d_model and a used symbol's parameter values must build (checked, not trained).

    A range is checked at every value it can yield, not at its ends: ``n_heads: {low: 2, high: 128}`` at d_model 256
    is refused for its 3. A continuous float range yields every real number between its ends, so it is checked at
    512 of them: an option that must divide something (``M.expand`` against ``headdim``) fails there."""
    from layers.base import LayerConfigError

    for sym in sorted(used):
        spec = registry.get(sym)
        given = layers.get(sym, {})
        keys = list(given)
        entries = [d_model, *(given[k] for k in keys)]
        for d, *values in _combos(entries, budget):
            params = dict(zip(keys, values))
            try:
                spec.cls.check_config(d, spec.make_config(params))
            except LayerConfigError as e:
                fld = e.field if e.field in spec.cls.config_fields() else None
                # ranges (layer options first, then d_model), those whose value here is not one of their ends first
                ranged = [(("model", "layers", sym, k), given[k], params[k]) for k in keys
                          if isinstance(given[k], Range)] + ([(("model", "d_model"), d_model, d)]
                                                             if isinstance(d_model, Range) else [])
                ranged.sort(key=lambda r: r[2] in (r[1].low, r[1].high))
                path: PathT
                if fld in given and (isinstance(given[fld], (list, Range)) or not ranged):
                    path = ("model", "layers", sym, fld)  # the field the layer names, as written
                elif ranged:
                    path = ranged[0][0]  # the layer names a fixed field, but a range's value made the difference
                elif fld in given:
                    path = ("model", "layers", sym, fld)
                elif fld is not None and sym in layers:
                    path = ("model", "layers", sym)
                else:
                    path = ("model", "d_model")
                shown = ", ".join([_shown("d_model", d, d_model)]
                                  + [_shown(f"{sym}.{k}", v, given[k]) for k, v in params.items()])
                hint = ""
                if any(isinstance(r, Range) and isinstance(r.low, float) and r.step is None
                       for r in (d_model, *given.values())):
                    hint = ("; a {low, high} range of floats yields every value between its ends: give a list of "
                            "choices or a step")
                raise src.error(path, f"impossible combination: {e} ({shown}){hint}") from None
            except (TypeError, ValueError, ArithmeticError) as e:
                raise src.error(("model", "layers", sym), f"invalid parameters for {sym}: {e}") from None


def _check_layer_option(value: Any, path: PathT, src: Source) -> None:
    """What every layer option must be, whatever the layer: a finite number, an integer within
    :data:`~hybridnas.schema.MAX_LAYER_INT`. (The layer's own rules are :func:`_check_layer_combos`'.)"""
    if isinstance(value, Range):
        for k in ("low", "high"):
            _check_layer_option(getattr(value, k), path + (k,), src)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_layer_option(v, path + (i,), src)
    elif isinstance(value, float) and not math.isfinite(value):
        raise src.error(path, f"must be a finite number, got {value!r}")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_LAYER_INT:
        raise src.error(path, f"must be within ±{MAX_LAYER_INT} (2^20, the bound on a layer's integer options), "
                              f"got {value}")


def _layer_params_max(spec: registry.LayerSpec, d_model: int, given: dict[str, Any], limit: int = 4096) -> int:
    """The largest parameter count of one ``spec`` layer at ``d_model`` over its listed choices and range ends."""
    keys = list(given)
    best = 0
    for combo in itertools.islice(itertools.product(*(value_options(given[k]) for k in keys)), limit):
        try:
            best = max(best, int(spec.param_count(d_model, dict(zip(keys, combo)))))
        except (TypeError, ValueError, ArithmeticError):
            continue  # an impossible combination is _check_layer_combos' to report
    return best


def _check_param_count(out: dict[str, Any], src: Source) -> None:
    """The largest candidate's parameter count, from the layers' formulas (nothing is built), must stay within
    :data:`~hybridnas.schema.MAX_PARAMS`."""
    pats = out["pattern"]
    d = max(int(v) for v in value_options(out.get("d_model", ModelConfig.d_model)))
    vocab = max(int(v) for v in value_options(out.get("vocab_size", ModelConfig.vocab_size)))
    untied = not all(value_options(out.get("tie_embeddings", True)))
    layers = out.get("layers", {})
    per_layer: dict[str, int] = {}

    def layer(sym: str) -> int:
        if sym not in per_layer:
            per_layer[sym] = _layer_params_max(registry.get(sym), d, layers.get(sym, {}))
        return per_layer[sym]

    if hasattr(pats, "used_symbols"):
        n = max(int(v) for v in value_options(pats.length))
        blocks = n * max(layer(sym) for sym in pats.used_symbols())
        shown = f"{n} layers"
    else:
        counts = []
        for p in (pats if isinstance(pats, list) else [pats]):
            syms = patterns.layer_symbols(p)
            counts.append((sum(layer(sym) for sym in syms), len(syms), p))
        blocks, n, p = max(counts)
        shown = f"pattern {p!r}"
    total = vocab * d * (2 if untied else 1) + blocks + (n + 1) * d
    if total > MAX_PARAMS:
        path = ("model", "d_model") if ("model", "d_model") in src.lines else ("model",)
        raise src.error(path, f"the largest candidate ({shown}, d_model {d}, vocab_size {vocab}) has {total:.3g} "
                              f"parameters, more than the {MAX_PARAMS:.0e} a search builds; make d_model, the layer "
                              "sizes or the pattern smaller")


# ----------------------------------------------------------------------------------------------------------
# loading

_SPACE_KEYS = ["name", "symbols", "task", "model", "train", "search", "export"]
_ARCH_KEYS = ["name", "symbols", "task", "model", "train"]


def _top(data: Any, src: Source, allowed: list[str], errors: Collector) -> dict:
    if data is None:
        raise ConfigError("the file is empty", src.file, src.line(()) or 1, ())
    if not isinstance(data, dict):
        raise src.error((), f"expected a mapping with keys {', '.join(allowed)}")
    for key in data:
        if key not in allowed:
            errors.errors.append(src.error((key,), f"unknown key {key!r}" + _suggest(str(key), allowed)
                                           + f"; known keys: {', '.join(allowed)}"))
    return data


def _parse_model_space(data: Any, src: Source, task_vocab: int, searchable: bool, missing: list[ConfigError],
                       errors: Collector) -> dict[str, Any]:
    """The model section, checked; each field's errors go to ``errors`` and the other fields are still checked. A
    missing section or pattern (required: no default architecture stands in for it) goes to ``missing``, which the
    caller reports after every other section's errors."""
    absent = data is None
    if absent:
        missing.append(src.error(("model",), "missing required section 'model' (at least its pattern: a layer pattern "
                                             "such as 'MMMA', a list of them, {genome: ...} or {ratio: ...})"))
        data = {}
    if not isinstance(data, dict):
        raise src.error(("model",), "expected a mapping of model fields (d_model, pattern, layers, ...)")
    before = len(errors.errors)
    out: dict[str, Any] = {}
    for key, value in data.items():
        with errors.guard():
            _parse_model_field(key, value, out, src, searchable)
    _check_bounds(ModelConfig, "model", {k: v for k, v in out.items() if k not in ("pattern", "layers")}, src, errors)
    vocab = out.setdefault("vocab_size", task_vocab)
    for v in value_options(vocab):
        if v < task_vocab:
            errors.errors.append(src.error(("model", "vocab_size"), f"vocab_size {v} is smaller than the task's "
                                           f"vocabulary ({task_vocab})"))
            break
    if "pattern" not in data and not absent:
        missing.append(src.error(("model", "pattern"), "missing required key 'pattern' (a layer pattern such as "
                                                       "'MMMA', a list of them, {genome: ...} or {ratio: ...})"))
    if len(errors.errors) > before:
        return out  # combinations of values already wrong say nothing more
    with errors.guard():
        if "pattern" not in out:
            # the layers given are checked all the same: their errors come first, the missing pattern after them
            _check_layer_combos(out.get("d_model", ModelConfig.d_model), out.get("layers", {}),
                                set(out.get("layers", {})), src)
            return out
        pats = out["pattern"]
        used = set()
        if hasattr(pats, "used_symbols"):
            used.update(pats.used_symbols())
        else:
            for p in (pats if isinstance(pats, list) else [pats]):
                used.update(patterns.used_symbols(p))
        _check_layer_combos(out.get("d_model", ModelConfig.d_model), out.get("layers", {}), used, src)
        _check_param_count(out, src)
    return out


def _parse_model_field(key: Any, value: Any, out: dict[str, Any], src: Source, searchable: bool) -> None:
    """One field of the model section into ``out``."""
    hints = typing.get_type_hints(ModelConfig)
    names = [f.name for f in fields(ModelConfig)]
    path = ("model", key)
    if key not in names:
        raise src.error(path, f"unknown key {key!r}" + _suggest(key, names) + f"; known keys: {', '.join(names)}")
    if key == "pattern":
        if isinstance(value, dict) and searchable:
            out[key] = parse_pattern_space(value, path, src)
        elif isinstance(value, list) and searchable:
            if not value:
                raise src.error(path, "an empty list of patterns")
            out[key] = [_check_pattern(p, path + (i,), src) for i, p in enumerate(value)]
        else:
            out[key] = _check_pattern(value, path, src)
    elif key == "layers":
        if not isinstance(value, dict):
            raise src.error(path, "expected a mapping SYMBOL: {parameter: value}")
        layers: dict[str, dict[str, Any]] = {}
        for sym, params in value.items():
            spec = _layer_spec(sym, path + (sym,), src)
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise src.error(path + (sym,), f"expected a mapping of {spec.name} parameters")
            lhints = typing.get_type_hints(spec.cls.Config)
            lnames = spec.cls.config_fields()
            entry = layers.setdefault(spec.symbol, {})
            if str(sym) != spec.symbol and path + (sym,) in src.lines:
                # an alias: later errors name the primary symbol, so give it the line the alias was written on
                src.lines.setdefault(path + (spec.symbol,), src.lines[path + (sym,)])
            for pk, pv in params.items():
                ppath = path + (sym, pk)
                if str(sym) != spec.symbol and ppath in src.lines:
                    src.lines[path + (spec.symbol, pk)] = src.lines[ppath]
                if pk not in lnames:
                    raise src.error(ppath, f"{spec.symbol} ({spec.name}) has no parameter {pk!r}"
                                    + _suggest(pk, lnames) + f"; known: {', '.join(lnames)}")
                entry[pk] = (parse_searchable(pv, lhints[pk], ppath, src) if searchable
                             else check_value(pv, lhints[pk], ppath, src))
                _check_layer_option(entry[pk], ppath, src)
        out[key] = layers
    else:
        out[key] = parse_searchable(value, hints[key], path, src) if searchable else \
            check_value(value, hints[key], path, src)


def _parse_train_space(data: Any, src: Source, searchable: bool, errors: Collector) -> dict[str, Any]:
    """The train section; each field's errors go to ``errors`` and the other fields are still checked."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise src.error(("train",), "expected a mapping of training fields (steps, lr, ...)")
    hints = typing.get_type_hints(TrainConfig)
    names = [f.name for f in fields(TrainConfig)]
    out = {}
    for key, value in data.items():
        path = ("train", key)
        with errors.guard():
            if key not in names:
                raise src.error(path, f"unknown key {key!r}" + _suggest(key, names)
                                + f"; known keys: {', '.join(names)}")
            out[key] = parse_searchable(value, hints[key], path, src) if searchable else \
                check_value(value, hints[key], path, src)
    _check_bounds(TrainConfig, "train", out, src, errors)
    return out


def _task_vocab(task: TaskSpec) -> int:
    return int(task.params.get("vocab_size", 0))


def _check_search(search: SearchSettings, src: Source) -> None:
    """What the field bounds cannot say: relations between fields and the constraint names (every one broken)."""
    errors = Collector()
    if search.grace_period <= search.heartbeat_interval:
        errors.errors.append(src.error(("search", "grace_period"),
                                       f"must exceed heartbeat_interval ({search.heartbeat_interval})"))
    if search.objectives is not None:
        if not search.objectives:
            errors.errors.append(src.error(("search", "objectives"), "an empty list; leave it out for one objective"))
        elif search.objectives[0] not in ("accuracy", "loss"):
            errors.errors.append(src.error(("search", "objectives", 0), "the first objective must be accuracy or "
                                           "loss (the trained score); budgets follow it"))
        if len(set(search.objectives)) != len(search.objectives):
            errors.errors.append(src.error(("search", "objectives"), "an objective is listed twice"))
    for key in search.constraints:
        if key not in CONSTRAINTS:
            errors.errors.append(src.error(("search", "constraints", key), f"unknown constraint {key!r}"
                                           + _suggest(key, CONSTRAINTS) + f"; known: {', '.join(CONSTRAINTS)}"))
    errors.raise_if_any()


def _parse_common(data: dict[str, Any], src: Source, name: Any, searchable: bool, trust_custom_code: Trust,
                  errors: Collector) -> tuple[Any, ...]:
    """The sections a space and an architecture file share (``name`` as read, symbols, task, model, train), each
    checked even when an earlier one is wrong, its errors collected in ``errors``. Returns ``(name, symbols, task,
    model, train, missing)``; ``missing`` holds the required parts absent (model, its pattern), reported last."""
    with errors.guard():
        name = check_value(name, Name, ("name",), src)
    symbols: dict[str, str] = {}
    try:
        symbols = _register_symbols(data.get("symbols"), src, trust_custom_code)
    except UntrustedCodeError:
        raise  # nothing is imported, and the caller must be able to tell this refusal from a wrong file
    except ConfigError as e:
        errors.errors.append(e)
    task = None
    with errors.guard():
        task = _parse_task(data.get("task", {"name": "mqar"}), src)
    missing: list[ConfigError] = []
    model: dict[str, Any] = {}
    with errors.guard():
        model = _parse_model_space(data.get("model"), src, _task_vocab(task) if task else 0, searchable, missing,
                                   errors)
    train: dict[str, Any] = {}
    with errors.guard():
        train = _parse_train_space(data.get("train"), src, searchable, errors)
    return name, symbols, task, model, train, missing


def load_space(path: str | None = None, *, text: str | None = None, file: str = "<space>",
               trust_custom_code: Trust = True) -> SearchSpace:
    """Read and fully validate a search-space YAML (from ``path`` or ``text``).

    A search space is the user's own program: the layers its ``symbols`` section names are imported unless
    ``trust_custom_code`` says otherwise (architecture files, which travel with exported weights, are the other way
    round: see :func:`load_arch`)."""
    if text is None:
        if path is None:
            raise ValueError("load_space needs a path or text")
        data, src = load_file(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
    else:
        data, src = load_text(text, file)
    # every section is checked even when an earlier one is wrong: one run reports every error of the file, the
    # missing required parts (model, its pattern) last
    errors = Collector()
    data = _top(data, src, _SPACE_KEYS, errors)
    name = data.get("name")
    if name is None:
        name = src.file.rsplit("/", 1)[-1].rsplit(".", 1)[0] if src.file else "study"
    name, symbols, task, model, train, missing = _parse_common(data, src, name, True, trust_custom_code, errors)
    search = None
    with errors.guard():
        search = parse_dataclass(SearchSettings, data.get("search"), ("search",), src)
        _check_search(search, src)
    export = None
    with errors.guard():
        export = parse_dataclass(ExportSettings, data.get("export"), ("export",), src)
    errors.errors += missing
    errors.raise_if_any()
    return SearchSpace(name, task, model, train, search, export, symbols, src, text)


def load_arch(path: str | None = None, *, text: str | None = None, file: str = "<arch>",
              data: Any = None, trust_custom_code: Trust = False) -> ArchConfig:
    """Read and validate an architecture file: concrete values only (no lists or ranges).

    An architecture (an export's ``architecture.yaml``, a trial's recorded ``arch``) may come from anyone, so a
    custom layer its ``symbols`` section names is imported only when ``trust_custom_code`` is True or lists that
    import path; otherwise :class:`UntrustedCodeError` is raised before anything is imported."""
    if data is not None:
        src = Source(file)
    elif text is None:
        data, src = load_file(path)
    else:
        data, src = load_text(text, file)
    errors = Collector()
    data = _top(data, src, _ARCH_KEYS, errors)
    name, symbols, task, model_d, train_d, missing = _parse_common(data, src, data.get("name", "arch"), False,
                                                                   trust_custom_code, errors)
    errors.errors += missing
    errors.raise_if_any()
    return ArchConfig(ModelConfig(**model_d), task, TrainConfig(**train_d), symbols, name)


# ----------------------------------------------------------------------------------------------------------
# post-training hybrid search: `hybridnas distill-search SPACE.yaml`

_DISTILL_KEYS = ["name", "teacher", "student", "distill", "data", "compare", "select"]
COMPARE_PLACEMENTS = ("even", "random")
SELECT_METHODS = ("milp", "greedy")


def _distill_teacher(value: Any, src: Source, trust_custom_code: Trust) -> tuple[str, ArchConfig]:
    """The teacher folder (a ``train --out`` or export folder) and its architecture; errors at ``teacher``."""
    import os

    if value is None:
        raise src.error(("teacher",), "required: the folder of a trained hybridnas model (a `hybridnas train --out` "
                                      "or export folder)")
    folder = check_value(value, Name, ("teacher",), src)
    arch_file = os.path.join(folder, "architecture.yaml")
    if not os.path.isdir(folder):
        raise src.error(("teacher",), f"no such folder: {folder}")
    if not os.path.isfile(arch_file) and os.path.isfile(os.path.join(folder, "config.json")):
        return folder, _hf_teacher_arch(folder, src)
    for needed in ("architecture.yaml", "model.safetensors"):
        if not os.path.isfile(os.path.join(folder, needed)):
            raise src.error(("teacher",), f"{folder} has no {needed}: not a hybridnas model folder (train one with "
                                          "`hybridnas train ARCH.yaml --out DIR`)")
    try:
        arch = load_arch(arch_file, trust_custom_code=trust_custom_code)
    except UntrustedCodeError:
        raise
    except ConfigError as e:
        raise src.error(("teacher",), f"cannot read the teacher's architecture: {e}") from None
    symbols = patterns.to_primary(arch.model.pattern)
    if "A" not in symbols:
        raise src.error(("teacher",), f"the teacher's pattern {arch.model.pattern!r} has no attention layer (A): "
                                      "nothing to replace or keep")
    return folder, arch


#: the Hugging Face model types :mod:`hybridnas.hf_teacher` converts into hybridnas blocks (it imports this tuple as
#: its LLAMA_FAMILY: this module cannot import it, as it imports checkpoint, which imports this module)
HF_BLOCK_TYPES = ("llama", "mistral", "qwen2")


def _hf_teacher_arch(folder: str, src: Source) -> ArchConfig:
    """What a Hugging Face teacher folder's config.json says of the model it converts into: ``(AF)xL`` at
    ``hidden_size`` over ``vocab_size`` (the weights are read by :func:`hybridnas.hf_teacher.load_hf_teacher` when
    the search runs)."""
    import json
    import os

    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise src.error(("teacher",), f"cannot read {path}: {e}") from None
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    if kind not in HF_BLOCK_TYPES:
        raise src.error(("teacher",), f"{folder} is a Hugging Face model of type {kind!r}: distill-search copies "
                                      f"attention and MLP blocks, which it can from {', '.join(HF_BLOCK_TYPES)} "
                                      "folders or a hybridnas model folder")
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    try:
        n, d, vocab = int(text["num_hidden_layers"]), int(text["hidden_size"]), int(text["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise src.error(("teacher",), f"{path} lacks a usable {e} (num_hidden_layers, hidden_size, vocab_size)"
                        ) from None
    model = ModelConfig(vocab_size=vocab, d_model=d, pattern=f"(AF)x{n}")
    return ArchConfig(model, TaskSpec("hf", {}), TrainConfig(), name=kind)


def _distill_student(data: Any, src: Source, teacher: ArchConfig | None) -> Any:
    from hybridnas.schema import StudentSpec
    from layers.base import LayerConfigError

    student = parse_dataclass(StudentSpec, data, ("student",), src)
    try:
        spec = registry.get(student.symbol)
    except registry.RegistryError:
        raise src.error(("student", "symbol"), f"unknown symbol {student.symbol!r}"
                        + _suggest(student.symbol, registry.symbols())
                        + f"; registered: {', '.join(registry.symbols())}") from None
    if spec.symbol == "A" or spec.kind == "ffn":
        raise src.error(("student", "symbol"), f"{student.symbol} ({spec.name}) cannot replace attention: give a "
                                               "sequence mixer other than attention (M, R, H, S, ...)")
    for sym, params in student.layers.items():
        try:
            same = registry.primary(sym) == spec.symbol
        except registry.RegistryError:
            same = False
        if not same:
            raise src.error(("student", "layers", sym), f"only the student symbol's parameters ({student.symbol}) "
                                                        "go here; the teacher's layers keep their own")
        for key, value in (params or {}).items():
            _check_layer_option(value, ("student", "layers", sym, key), src)
    if student.keep is None and student.budget is None:
        raise src.error(("student",), "give keep (how many attention layers stay), a budget ({state_bytes: N} or "
                                      "{decode_ms: X}), or both")
    if student.budget is not None:
        b = student.budget
        if (b.state_bytes is None) == (b.decode_ms is None):
            raise src.error(("student", "budget"), "give exactly one of state_bytes and decode_ms")
    if teacher is None:
        return student
    n_attn = patterns.to_primary(teacher.model.pattern).count("A")
    if student.keep is not None and student.keep >= n_attn:
        raise src.error(("student", "keep"), f"must be less than the teacher's {n_attn} attention layers (keeping "
                                             f"all of them leaves nothing to replace), got {student.keep}")
    params: dict[str, Any] = {}
    for p in student.layers.values():
        params.update(p or {})
    try:
        spec.cls.check_config(teacher.model.d_model, spec.make_config(params))
    except LayerConfigError as e:
        key = next((k for k in student.layers), spec.symbol)
        fld = (e.field,) if e.field in params else ()
        raise src.error(("student", "layers", key, *fld), f"{e} (d_model {teacher.model.d_model})") from None
    except (registry.RegistryError, TypeError, ValueError) as e:
        key = next((k for k in student.layers), spec.symbol)
        raise src.error(("student", "layers", key), str(e)) from None
    return student


def _distill_data(data: Any, src: Source, seq_len: int, teacher_folder: str | None,
                  teacher: ArchConfig | None) -> dict[str, Any]:
    """The corpus as the ``lm`` task's settings: ``seq_len`` is ``distill.seq_len``; the tokenizer defaults to the
    teacher's (its task's tokenizer, else its folder's tokenizer.json, else bytes); the vocabulary is the teacher's."""
    import os

    from hybridnas.tasks.base import TaskConfigError
    from hybridnas.tasks.lm import LMConfig, load_tokenizer

    if not isinstance(data, dict):
        raise src.error(("data",), "required: the corpus as the lm task's settings, e.g. {path: corpus.txt}")
    data = dict(data)
    if data.get("name", "lm") != "lm":
        raise src.error(("data", "name"), f"the corpus is an lm task (local text through datasets), got "
                                          f"{data['name']!r}")
    data.pop("name", None)
    if "seq_len" in data:
        raise src.error(("data", "seq_len"), "set the sequence length as distill.seq_len")
    if "vocab_size" in data:
        raise src.error(("data", "vocab_size"), "the student's vocabulary is the teacher's; leave vocab_size out")
    if "tokenizer" not in data:
        tok = "bytes"
        if teacher is not None and teacher.task.name == "lm" and (
                teacher.task.params.get("tokenizer", "bytes") == "bytes"
                or os.path.isfile(teacher.task.params.get("tokenizer", ""))):
            tok = teacher.task.params.get("tokenizer", "bytes")
        elif teacher_folder and os.path.isfile(os.path.join(teacher_folder, "tokenizer.json")):
            tok = os.path.join(teacher_folder, "tokenizer.json")
        data["tokenizer"] = tok
    cfg = parse_dataclass(LMConfig, {**data, "seq_len": seq_len}, ("data",), src)
    try:
        n_tok = load_tokenizer(cfg.tokenizer).vocab_size
        if teacher is not None:
            if n_tok > teacher.model.vocab_size:
                raise TaskConfigError("tokenizer", f"the tokenizer has {n_tok} tokens, more than the teacher's "
                                                   f"vocabulary of {teacher.model.vocab_size}")
            cfg.vocab_size = teacher.model.vocab_size
        cfg.check()
    except TaskConfigError as e:
        msg = str(e)
        msg = msg[len(e.field) + 2:] if msg.startswith(f"{e.field}: ") else msg
        raise src.error(("data", e.field), msg) from None
    return asdict(cfg)


def load_distill_space(path: str, *, trust_custom_code: Trust = False) -> Any:
    """Read and validate a ``distill-search`` file (see :class:`hybridnas.schema.DistillSpace`). Every section is
    checked even when an earlier one is wrong; each error is ``file:line: field.path: message``. The teacher's
    architecture names custom layer code only with ``trust_custom_code`` (as :func:`load_arch`)."""
    from hybridnas.schema import DistillSettings, DistillSpace

    data, src = load_file(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    errors = Collector()
    data = _top(data, src, _DISTILL_KEYS, errors)
    name = None
    with errors.guard():
        name = check_value(data.get("name") or path.rsplit("/", 1)[-1].rsplit(".", 1)[0], Name, ("name",), src)
    folder, teacher = None, None
    try:
        folder, teacher = _distill_teacher(data.get("teacher"), src, trust_custom_code)
    except UntrustedCodeError:
        raise
    except ConfigError as e:
        errors.errors.append(e)
    student = None
    with errors.guard():
        student = _distill_student(data.get("student"), src, teacher)
    settings = None
    with errors.guard():
        settings = parse_dataclass(DistillSettings, data.get("distill"), ("distill",), src)
        if not settings.seeds:
            raise src.error(("distill", "seeds"), "give at least one seed")
        if len(set(settings.seeds)) != len(settings.seeds):
            raise src.error(("distill", "seeds"), "a seed is listed twice")
    corpus: dict[str, Any] = {}
    with errors.guard():
        corpus = _distill_data(data.get("data"), src, settings.seq_len if settings else DistillSettings.seq_len,
                               folder, teacher)
    compare: list[str] = list(COMPARE_PLACEMENTS)
    with errors.guard():
        if data.get("compare") is not None:
            compare = check_value(data["compare"], list[typing.Literal[COMPARE_PLACEMENTS]], ("compare",), src)
    select = SELECT_METHODS[0]
    with errors.guard():
        select = check_value(data.get("select", select), typing.Literal[SELECT_METHODS], ("select",), src)
    errors.raise_if_any()
    return DistillSpace(name, folder, student, settings, corpus, list(dict.fromkeys(compare)), select, src, text,
                        teacher.model.pattern)
