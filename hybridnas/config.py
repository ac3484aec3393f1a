"""Typed configs (model, train, task, search space), read from YAML with file/line/field errors.

Two shapes of file:

- an *architecture* file (``hybridnas train ARCH.yaml``, ``architecture.yaml`` of an export): concrete values,
  read into :class:`ArchConfig`;
- a *search space* (``hybridnas search SPACE.yaml``): the same sections, but any value in ``model`` (and in
  ``model.layers.<SYMBOL>``) and in ``train`` may be a list (categorical choice) or ``{low, high, log, step}``
  (a range). Read into :class:`SearchSpace`.
"""

from __future__ import annotations

import difflib
import itertools
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal, Union

from hybridnas import patterns, registry
from hybridnas.yamlio import ConfigError, PathT, Source, load_file, load_text

# ----------------------------------------------------------------------------------------------------------
# concrete configs


@dataclass
class ModelConfig:
    """One architecture. ``layers`` maps a symbol to its parameters (the rest come from the layer's defaults)."""

    vocab_size: int = 256
    d_model: int = 128
    pattern: str = "AA"
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02


@dataclass
class TrainConfig:
    """One short training run: AdamW, linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_examples: int | None = None  # None: the whole validation set
    target_accuracy: float | None = 0.99  # early stop once reached; None: train all steps
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool = True  # autocast to bf16 on CUDA (ignored on CPU)
    max_time: float | None = None  # seconds; stops the run (reason "time") when exceeded
    threads: int | None = None  # torch intra-op threads on CPU; None leaves torch's default


@dataclass
class TaskSpec:
    name: str = "mqar"
    params: dict[str, Any] = field(default_factory=dict)

    def build_config(self) -> Any:
        from hybridnas.tasks import task_config_class

        return task_config_class(self.name)(**self.params)


@dataclass
class ArchConfig:
    model: ModelConfig
    task: TaskSpec
    train: TrainConfig
    symbols: dict[str, str] = field(default_factory=dict)
    name: str = "arch"

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name}
        if self.symbols:
            out["symbols"] = dict(self.symbols)
        out["task"] = {"name": self.task.name, **self.task.params}
        out["model"] = asdict(self.model)
        out["train"] = asdict(self.train)
        return out


# ----------------------------------------------------------------------------------------------------------
# search space


@dataclass
class Range:
    low: float
    high: float
    log: bool = False
    step: float | None = None


#: what a trial can be scored on, and which way is better
METRICS = {"accuracy": "maximize", "loss": "minimize", "params": "minimize", "state_bytes": "minimize",
           "tokens_per_s": "maximize"}
#: budgets: which metric each constrains and in which direction (max = upper bound, min = lower bound)
CONSTRAINTS = {"params": "max", "state_bytes": "max", "tokens_per_s": "min"}


@dataclass
class SearchSettings:
    n_trials: int = 20
    # proposals per run that train nothing (infeasible, duplicate, repaired); default max(50, 10 * n_trials)
    max_proposals: int | None = None
    timeout: float | None = None  # seconds for the whole search (per worker)
    objective: Literal["accuracy", "loss"] = "accuracy"
    # several objectives give a Pareto front (no pruning); the first must be accuracy or loss
    objectives: list[Literal["accuracy", "loss", "params", "state_bytes", "tokens_per_s"]] | None = None
    # budgets as Optuna constraints: params and state_bytes are upper bounds, tokens_per_s a lower bound;
    # checked before training, an infeasible trial is not trained
    constraints: dict[str, float] = field(default_factory=dict)
    state_seq_len: int | None = None  # decode-state bytes are measured at this length (default: task seq_len)
    latency_batch: int = 1  # decode throughput (tokens/s of a step) is measured at this batch size
    workers: int = 1  # local worker processes (journal file storage by default when > 1)
    heartbeat_interval: int = 30  # seconds; a worker silent for grace_period has its trial failed and retried
    grace_period: int = 120
    confirm_top: int = 0  # re-train the top K with confirm_seeds seeds and confirm_budget x the steps
    confirm_seeds: int = 3
    confirm_budget: float = 4.0
    sampler: Literal["tpe", "random", "gp", "nsga2", "cmaes", "qmc"] = "tpe"
    pruner: Literal["hyperband", "median", "sha", "none"] = "hyperband"
    n_startup_trials: int = 5  # TPE's random start
    seed: int | None = 0
    study_name: str | None = None  # default: the space's name
    storage: str | None = None  # default: sqlite:///runs/<study>.db
    save_weights: bool = True  # keep each completed trial's weights under runs/<study>/trials/


@dataclass
class ExportSettings:
    dir: str | None = None  # `hybridnas search` exports the best trial here when set


@dataclass
class SearchSpace:
    name: str
    task: TaskSpec
    model: dict[str, Any]  # field -> value | list | Range; "layers" -> {symbol: {param: value | list | Range}}
    train: dict[str, Any]  # field -> value | list | Range
    search: SearchSettings
    export: ExportSettings
    symbols: dict[str, str]
    source: Source
    text: str = ""  # the YAML as written, stored with the study

    def patterns(self) -> list[str]:
        """The explicit pattern choices ([] for a genome or ratio space)."""
        p = self.model.get("pattern", ModelConfig.pattern)
        if isinstance(p, str):
            return [p]
        return list(p) if isinstance(p, list) else []

    def directions(self) -> list[str]:
        return [METRICS[m] for m in self.objective_names()]

    def objective_names(self) -> list[str]:
        return list(self.search.objectives) if self.search.objectives else [self.search.objective]


# ----------------------------------------------------------------------------------------------------------
# generic type checking


def _suggest(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return getattr(origin, "__name__", str(tp))
    return getattr(tp, "__name__", str(tp))


def check_value(value: Any, tp: Any, path: PathT, src: Source) -> Any:
    """Check ``value`` against type ``tp``; return it (ints widened to float where a float is wanted)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        for arg in args:
            try:
                return check_value(value, arg, path, src)
            except ConfigError:
                continue
        raise src.error(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        options = typing.get_args(tp)
        if value in options:
            return value
        raise src.error(path, f"must be one of {', '.join(map(repr, options))}, got {value!r}"
                        + _suggest(value, [str(o) for o in options]))
    if tp is type(None):
        if value is None:
            return None
        raise src.error(path, f"expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise src.error(path, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise src.error(path, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 as a string; accept it as users expect
                return float(value)
            except ValueError:
                pass
        raise src.error(path, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise src.error(path, f"expected a string, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise src.error(path, f"expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {str(k): check_value(v, vt, path + (k,), src) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise src.error(path, f"expected a list, got {value!r}")
        (it,) = typing.get_args(tp) or (Any,)
        return [check_value(v, it, path + (i,), src) for i, v in enumerate(value)]
    if is_dataclass(tp):
        return parse_dataclass(tp, value, path, src)
    raise src.error(path, f"unsupported type {tp!r}")


def parse_dataclass(cls: type, data: Any, path: PathT, src: Source) -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys are errors with a suggestion."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise src.error(path, f"expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    for key in data:
        if key not in names:
            raise src.error(path + (key,), f"unknown key {key!r}" + _suggest(key, names)
                            + f"; known keys: {', '.join(names)}")
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            kwargs[f.name] = check_value(data[f.name], hints[f.name], path + (f.name,), src)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise src.error(path, f"missing required key {f.name!r}")
    return cls(**kwargs)


def _is_range(value: Any) -> bool:
    return isinstance(value, dict) and ("low" in value or "high" in value)


def parse_searchable(value: Any, tp: Any, path: PathT, src: Source) -> Any:
    """A fixed value, a list of choices, or a :class:`Range`; each checked against ``tp``."""
    if isinstance(value, list):
        if not value:
            raise src.error(path, "an empty list of choices")
        out = [check_value(v, tp, path + (i,), src) for i, v in enumerate(value)]
        if len({repr(v) for v in out}) != len(out):
            raise src.error(path, f"duplicate choices in {value!r}")
        return out
    if _is_range(value):
        r = parse_dataclass(Range, value, path, src)
        for k in ("low", "high", "step"):
            if getattr(r, k) is not None and not math.isfinite(getattr(r, k)):
                raise src.error(path + (k,), f"must be a finite number, got {getattr(r, k)!r}")
        base = {t for t in typing.get_args(tp)} if typing.get_origin(tp) in (Union, types.UnionType) else {tp}
        if not base & {int, float}:
            raise src.error(path, f"a {{low, high}} range needs a numeric field, this one is {_type_name(tp)}")
        if float not in base:
            for k in ("low", "high", "step"):
                if getattr(r, k) is not None and float(getattr(r, k)) != int(getattr(r, k)):
                    raise src.error(path + (k,), f"this field takes integers, got {getattr(r, k)!r}")
            r.low, r.high = int(r.low), int(r.high)
            r.step = None if r.step is None else int(r.step)
        if r.low > r.high:
            raise src.error(path, f"low ({r.low}) is greater than high ({r.high})")
        if r.log and r.low <= 0:
            raise src.error(path + ("low",), "a log range needs low > 0")
        if r.log and r.step is not None:
            raise src.error(path, "a range cannot have both log and step")
        return r
    return check_value(value, tp, path, src)


def value_options(v: Any, limit: int = 64) -> list[Any]:
    """Representative values of a searchable entry, for checking combinations before training."""
    if isinstance(v, list):
        return v
    if isinstance(v, Range):
        if isinstance(v.low, int) and isinstance(v.high, int) and not v.log:
            step = v.step or 1
            vals = list(range(v.low, v.high + 1, step))
            return vals if len(vals) <= limit else [v.low, v.high]
        if isinstance(v.low, int) and isinstance(v.high, int) and v.high - v.low < limit:
            return list(range(v.low, v.high + 1))
        return [v.low, v.high]
    return [v]


# ----------------------------------------------------------------------------------------------------------
# checks shared by architecture files and search spaces


def check_train(cfg: TrainConfig) -> list[tuple[str, str]]:
    """Problems with a concrete train config as (field, message) pairs."""
    bad = []
    positive = ("steps", "batch_size", "lr", "eval_every")
    for name in positive:
        if getattr(cfg, name) <= 0:
            bad.append((name, f"must be positive, got {getattr(cfg, name)}"))
    for name in ("weight_decay", "warmup_steps", "grad_clip"):
        if getattr(cfg, name) < 0:
            bad.append((name, f"must be >= 0, got {getattr(cfg, name)}"))
    for name in ("beta1", "beta2", "min_lr_ratio"):
        if not 0 <= getattr(cfg, name) <= 1:
            bad.append((name, f"must be in [0, 1], got {getattr(cfg, name)}"))
    if cfg.target_accuracy is not None and not 0 < cfg.target_accuracy <= 1:
        bad.append(("target_accuracy", f"must be in (0, 1] or null, got {cfg.target_accuracy}"))
    if cfg.eval_examples is not None and cfg.eval_examples < 1:
        bad.append(("eval_examples", "must be positive or null"))
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        bad.append(("device", f"must be auto, cpu, cuda or cuda:N, got {cfg.device!r}"))
    return bad


def _register_symbols(data: Any, src: Source) -> dict[str, str]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise src.error(("symbols",), "expected a mapping SYMBOL: package.module:ClassName")
    out = {}
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
        try:
            registry.register_path(str(sym), entry, aliases=tuple(aliases))
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
                from hybridnas.pattern_space import parse_pattern_space

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
    for key in ("d_model", "vocab_size"):
        for v in value_options(out.get(key, getattr(ModelConfig, key))):
            if v < 1:
                raise src.error(("model", key), f"must be positive, got {v}")
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
    # every option of every field, checked one at a time against the defaults of the others
    for key, value in out.items():
        for opt in value_options(value):
            probe = TrainConfig(**{key: opt})
            for fld, msg in check_train(probe):
                if fld == key:
                    raise src.error(("train", key), msg)
    return out


def _task_vocab(task: TaskSpec) -> int:
    return int(task.params.get("vocab_size", 0))


def _check_search(search: SearchSettings, src: Source) -> None:
    for name in ("workers", "heartbeat_interval", "grace_period", "confirm_seeds", "latency_batch"):
        if getattr(search, name) < 1:
            raise src.error(("search", name), f"must be at least 1, got {getattr(search, name)}")
    if search.confirm_top < 0:
        raise src.error(("search", "confirm_top"), "must be >= 0")
    if search.confirm_budget <= 0:
        raise src.error(("search", "confirm_budget"), "must be positive")
    if search.grace_period <= search.heartbeat_interval:
        raise src.error(("search", "grace_period"), f"must exceed heartbeat_interval ({search.heartbeat_interval})")
    if search.max_proposals is not None and search.max_proposals < 1:
        raise src.error(("search", "max_proposals"), "must be positive or null")
    if search.state_seq_len is not None and search.state_seq_len < 1:
        raise src.error(("search", "state_seq_len"), "must be positive or null")
    if search.objectives is not None:
        if not search.objectives:
            raise src.error(("search", "objectives"), "an empty list; leave it out for one objective")
        if search.objectives[0] not in ("accuracy", "loss"):
            raise src.error(("search", "objectives", 0), "the first objective must be accuracy or loss "
                            "(the trained score); budgets follow it")
        if len(set(search.objectives)) != len(search.objectives):
            raise src.error(("search", "objectives"), "an objective is listed twice")
    for key, value in search.constraints.items():
        if key not in CONSTRAINTS:
            raise src.error(("search", "constraints", key), f"unknown constraint {key!r}"
                            + _suggest(key, CONSTRAINTS) + f"; known: {', '.join(CONSTRAINTS)}")
        if not value > 0:
            raise src.error(("search", "constraints", key), f"must be positive, got {value}")


def load_space(path: str | None = None, *, text: str | None = None, file: str = "<space>") -> SearchSpace:
    """Read and fully validate a search-space YAML (from ``path`` or ``text``)."""
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
    symbols = _register_symbols(data.get("symbols"), src)
    task = _parse_task(data.get("task", {"name": "mqar"}), src)
    model = _parse_model_space(data.get("model"), src, _task_vocab(task), searchable=True)
    train = _parse_train_space(data.get("train"), src, searchable=True)
    search = parse_dataclass(SearchSettings, data.get("search"), ("search",), src)
    for fld in ("n_trials", "n_startup_trials"):
        if getattr(search, fld) < 1 if fld == "n_trials" else getattr(search, fld) < 0:
            raise src.error(("search", fld), f"must be positive, got {getattr(search, fld)}")
    if search.timeout is not None and search.timeout <= 0:
        raise src.error(("search", "timeout"), "must be positive or null")
    _check_search(search, src)
    export = parse_dataclass(ExportSettings, data.get("export"), ("export",), src)
    return SearchSpace(name, task, model, train, search, export, symbols, src, text)


def load_arch(path: str | None = None, *, text: str | None = None, file: str = "<arch>",
              data: Any = None) -> ArchConfig:
    """Read and validate an architecture file: concrete values only (no lists or ranges)."""
    if data is not None:
        src = Source(file)
    elif text is None:
        data, src = load_file(path)
    else:
        data, src = load_text(text, file)
    data = _top(data, src, _ARCH_KEYS)
    name = check_value(data.get("name", "arch"), str, ("name",), src)
    symbols = _register_symbols(data.get("symbols"), src)
    task = _parse_task(data.get("task", {"name": "mqar"}), src)
    model_d = _parse_model_space(data.get("model"), src, _task_vocab(task), searchable=False)
    model = ModelConfig(**model_d)
    train_d = _parse_train_space(data.get("train"), src, searchable=False)
    train = TrainConfig(**train_d)
    return ArchConfig(model, task, train, symbols, name)


def resolved_layers(model: ModelConfig) -> dict[str, dict[str, Any]]:
    """Complete parameters (defaults filled in) of every symbol the pattern uses, keyed by primary symbol."""
    out = {}
    for sym in patterns.used_symbols(model.pattern):
        spec = registry.get(sym)
        params = {}
        for k, v in model.layers.items():
            if registry.primary(k) == sym:
                params.update(v)
        out[sym] = asdict(spec.make_config(params))
    return out


def arch_key(model: ModelConfig) -> str:
    """Hash identifying an architecture: canonical pattern, resolved layer params, model-wide sizes."""
    extra = {"d_model": model.d_model, "vocab_size": model.vocab_size, "norm_eps": model.norm_eps,
             "tie_embeddings": model.tie_embeddings}
    return patterns.arch_hash(model.pattern, resolved_layers(model), extra)
