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
import typing
from collections.abc import Collection
from dataclasses import asdict, fields
from typing import Any

from hybridnas import patterns, registry
from hybridnas.pattern_space import parse_pattern_space
from hybridnas.schema import (
    CONSTRAINTS,
    METRICS,
    ArchConfig,
    ExportSettings,
    ModelConfig,
    Range,
    SearchSettings,
    SearchSpace,
    TaskSpec,
    TrainConfig,
    arch_key,
    resolved_layers,
    value_options,
)
from hybridnas.validation import check_train, check_value, field_problems, parse_dataclass, parse_searchable
from hybridnas.validation import suggest as _suggest
from hybridnas.yamlio import ConfigError, PathT, Source, load_file, load_text

__all__ = [
    "CONSTRAINTS", "METRICS", "ArchConfig", "ConfigError", "ExportSettings", "ModelConfig", "Range", "SearchSettings",
    "SearchSpace", "TaskSpec", "TrainConfig", "Trust", "UntrustedCodeError", "arch_key", "check_train", "check_value",
    "load_arch", "load_space", "parse_dataclass", "parse_searchable", "resolved_layers", "value_options",
]


def _check_bounds(cls: type, section: str, values: dict[str, Any], src: Source) -> None:
    """Every option of every field, checked on its own against the bounds ``cls`` declares for it."""
    for key, value in values.items():
        for opt in value_options(value):
            problems = field_problems(cls, {key: opt})
            if problems:
                raise src.error((section, key), problems[0][1])


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


def _check_layer_combos(d_models: list[int], layers: dict[str, dict[str, Any]], used: set[str], src: Source,
                        limit: int = 4096) -> None:
    """Every combination of d_model and a used symbol's parameter options must build (checked, not trained)."""
    from layers.base import LayerConfigError

    for sym in sorted(used):
        spec = registry.get(sym)
        opts = {k: value_options(v) for k, v in layers.get(sym, {}).items()}
        keys = list(opts)
        combos = list(itertools.islice(itertools.product(*(opts[k] for k in keys)), limit))
        for d in d_models:
            for combo in combos:
                params = dict(zip(keys, combo))
                try:
                    spec.cls.check_config(d, spec.make_config(params))
                except LayerConfigError as e:
                    fld = e.field if e.field in spec.cls.config_fields() else None
                    path = ("model", "layers", sym, fld) if fld and fld in layers.get(sym, {}) else ("model", "d_model")
                    if fld and fld not in layers.get(sym, {}):
                        path = ("model", "layers", sym) if sym in layers else ("model", "d_model")
                    shown = ", ".join(f"{sym}.{k}={v}" for k, v in params.items())
                    raise src.error(path, f"impossible combination: {e} (d_model={d}{', ' if shown else ''}{shown})") \
                        from None
                except (TypeError, ValueError) as e:
                    raise src.error(("model", "layers", sym), f"invalid parameters for {sym}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# loading

_SPACE_KEYS = ["name", "symbols", "task", "model", "train", "search", "export"]
_ARCH_KEYS = ["name", "symbols", "task", "model", "train"]


def _top(data: Any, src: Source, allowed: list[str]) -> dict:
    if data is None:
        raise ConfigError("the file is empty", src.file, src.line(()) or 1, ())
    if not isinstance(data, dict):
        raise src.error((), f"expected a mapping with keys {', '.join(allowed)}")
    for key in data:
        if key not in allowed:
            raise src.error((key,), f"unknown key {key!r}" + _suggest(str(key), allowed)
                            + f"; known keys: {', '.join(allowed)}")
    return data


def _parse_model_space(data: Any, src: Source, task_vocab: int, searchable: bool) -> dict[str, Any]:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise src.error(("model",), "expected a mapping of model fields (d_model, pattern, layers, ...)")
    hints = typing.get_type_hints(ModelConfig)
    names = [f.name for f in fields(ModelConfig)]
    out: dict[str, Any] = {}
    for key, value in data.items():
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
            out[key] = layers
        else:
            out[key] = parse_searchable(value, hints[key], path, src) if searchable else \
                check_value(value, hints[key], path, src)
    _check_bounds(ModelConfig, "model", {k: v for k, v in out.items() if k not in ("pattern", "layers")}, src)
    vocab = out.setdefault("vocab_size", task_vocab)
    for v in value_options(vocab):
        if v < task_vocab:
            raise src.error(("model", "vocab_size"), f"vocab_size {v} is smaller than the task's vocabulary "
                            f"({task_vocab})")
    pats = out.get("pattern", ModelConfig.pattern)
    used = set()
    if hasattr(pats, "used_symbols"):
        used.update(pats.used_symbols())
    else:
        for p in (pats if isinstance(pats, list) else [pats]):
            used.update(patterns.used_symbols(p))
    d_models = [int(d) for d in value_options(out.get("d_model", ModelConfig.d_model))]
    _check_layer_combos(d_models, out.get("layers", {}), used, src)
    return out


def _parse_train_space(data: Any, src: Source, searchable: bool) -> dict[str, Any]:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise src.error(("train",), "expected a mapping of training fields (steps, lr, ...)")
    hints = typing.get_type_hints(TrainConfig)
    names = [f.name for f in fields(TrainConfig)]
    out = {}
    for key, value in data.items():
        path = ("train", key)
        if key not in names:
            raise src.error(path, f"unknown key {key!r}" + _suggest(key, names) + f"; known keys: {', '.join(names)}")
        out[key] = parse_searchable(value, hints[key], path, src) if searchable else \
            check_value(value, hints[key], path, src)
    _check_bounds(TrainConfig, "train", out, src)
    return out


def _task_vocab(task: TaskSpec) -> int:
    return int(task.params.get("vocab_size", 0))


def _check_search(search: SearchSettings, src: Source) -> None:
    """What the field bounds cannot say: relations between fields and the constraint names."""
    if search.grace_period <= search.heartbeat_interval:
        raise src.error(("search", "grace_period"), f"must exceed heartbeat_interval ({search.heartbeat_interval})")
    if search.objectives is not None:
        if not search.objectives:
            raise src.error(("search", "objectives"), "an empty list; leave it out for one objective")
        if search.objectives[0] not in ("accuracy", "loss"):
            raise src.error(("search", "objectives", 0), "the first objective must be accuracy or loss "
                            "(the trained score); budgets follow it")
        if len(set(search.objectives)) != len(search.objectives):
            raise src.error(("search", "objectives"), "an objective is listed twice")
    for key in search.constraints:
        if key not in CONSTRAINTS:
            raise src.error(("search", "constraints", key), f"unknown constraint {key!r}"
                            + _suggest(key, CONSTRAINTS) + f"; known: {', '.join(CONSTRAINTS)}")


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
    data = _top(data, src, _SPACE_KEYS)
    name = data.get("name")
    if name is None:
        name = src.file.rsplit("/", 1)[-1].rsplit(".", 1)[0] if src.file else "study"
    name = check_value(name, str, ("name",), src)
    symbols = _register_symbols(data.get("symbols"), src, trust_custom_code)
    task = _parse_task(data.get("task", {"name": "mqar"}), src)
    model = _parse_model_space(data.get("model"), src, _task_vocab(task), searchable=True)
    train = _parse_train_space(data.get("train"), src, searchable=True)
    search = parse_dataclass(SearchSettings, data.get("search"), ("search",), src)
    _check_search(search, src)
    export = parse_dataclass(ExportSettings, data.get("export"), ("export",), src)
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
    data = _top(data, src, _ARCH_KEYS)
    name = check_value(data.get("name", "arch"), str, ("name",), src)
    symbols = _register_symbols(data.get("symbols"), src, trust_custom_code)
    task = _parse_task(data.get("task", {"name": "mqar"}), src)
    model_d = _parse_model_space(data.get("model"), src, _task_vocab(task), searchable=False)
    model = ModelConfig(**model_d)
    train_d = _parse_train_space(data.get("train"), src, searchable=False)
    train = TrainConfig(**train_d)
    return ArchConfig(model, task, train, symbols, name)
