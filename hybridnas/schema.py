"""Typed configs: model, train, task, search space. Plain dataclasses, no YAML (``hybridnas.config`` reads YAML).

Bounds are declared on the fields as ``annotated_types`` metadata (``Annotated[int, Gt(0)]``): the dataclasses stay
plain (building one checks nothing), ``hybridnas.validation`` enforces the bounds when a file is read and
:func:`hybridnas.validation.field_problems` checks a config built in Python (a sampled trial).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from annotated_types import Ge, Gt, Interval, Predicate

from hybridnas import patterns, registry

if TYPE_CHECKING:
    from hybridnas.yamlio import Source


def device_name(value: str) -> bool:
    """auto, cpu, cuda or cuda:N"""
    return value in ("auto", "cpu", "cuda") or value.startswith("cuda:")


Positive = Gt(0)
NonNegative = Ge(0)
Unit = Interval(ge=0, le=1)


# ----------------------------------------------------------------------------------------------------------
# concrete configs


@dataclass
class ModelConfig:
    """One architecture. ``layers`` maps a symbol to its parameters (the rest come from the layer's defaults)."""

    vocab_size: Annotated[int, Positive] = 256
    d_model: Annotated[int, Positive] = 128
    pattern: str = "AA"
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02


@dataclass
class TrainConfig:
    """One short training run: AdamW, linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    steps: Annotated[int, Positive] = 1000
    batch_size: Annotated[int, Positive] = 32
    lr: Annotated[float, Positive] = 1e-3
    weight_decay: Annotated[float, NonNegative] = 0.1
    beta1: Annotated[float, Unit] = 0.9
    beta2: Annotated[float, Unit] = 0.95
    warmup_steps: Annotated[int, NonNegative] = 50
    min_lr_ratio: Annotated[float, Unit] = 0.1
    grad_clip: Annotated[float, NonNegative] = 1.0
    eval_every: Annotated[int, Positive] = 100
    eval_examples: Annotated[int, Positive] | None = None  # None: the whole validation set
    # early stop once reached; None: train all steps
    target_accuracy: Annotated[float, Interval(gt=0, le=1)] | None = 0.99
    seed: int = 0
    device: Annotated[str, Predicate(device_name)] = "auto"
    bf16: bool = True  # autocast to bf16 on CUDA (ignored on CPU)
    max_time: float | None = None  # seconds; stops the run (reason "time") when exceeded
    threads: int | None = None  # torch intra-op threads on CPU; None leaves torch's default


@dataclass
class TaskSpec:
    name: str = "mqar"
    params: dict[str, Any] = field(default_factory=dict)

    def build_config(self) -> Any:
        # tasks know nothing of configs, so this downward import closes no cycle
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
        # the task's name is `name` in the file: no task parameter may overwrite it (the `lm` task once did)
        out["task"] = {"name": self.task.name, **{k: v for k, v in self.task.params.items() if k != "name"}}
        out["model"] = asdict(self.model)
        out["train"] = asdict(self.train)
        return out


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


# ----------------------------------------------------------------------------------------------------------
# search space


@dataclass
class Range:
    low: float
    high: float
    log: bool = False
    step: float | None = None


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


#: what a trial can be scored on, and which way is better
METRICS = {"accuracy": "maximize", "loss": "minimize", "params": "minimize", "state_bytes": "minimize",
           "tokens_per_s": "maximize"}
#: budgets: which metric each constrains and in which direction (max = upper bound, min = lower bound)
CONSTRAINTS = {"params": "max", "state_bytes": "max", "tokens_per_s": "min"}


@dataclass
class SearchSettings:
    n_trials: Annotated[int, Positive] = 20
    # proposals per run that train nothing (infeasible, duplicate, repaired); default max(50, 10 * n_trials)
    max_proposals: Annotated[int, Positive] | None = None
    timeout: Annotated[float, Positive] | None = None  # seconds for the whole search (per worker)
    objective: Literal["accuracy", "loss"] = "accuracy"
    # several objectives give a Pareto front (no pruning); the first must be accuracy or loss
    objectives: list[Literal["accuracy", "loss", "params", "state_bytes", "tokens_per_s"]] | None = None
    # budgets as Optuna constraints: params and state_bytes are upper bounds, tokens_per_s a lower bound;
    # checked before training, an infeasible trial is not trained
    constraints: dict[str, Annotated[float, Positive]] = field(default_factory=dict)
    # decode-state bytes are measured at this length (default: task seq_len)
    state_seq_len: Annotated[int, Positive] | None = None
    latency_batch: Annotated[int, Ge(1)] = 1  # decode throughput (tokens/s of a step) is measured at this batch size
    workers: Annotated[int, Ge(1)] = 1  # local worker processes (journal file storage by default when > 1)
    # seconds; a worker silent for grace_period has its trial failed and retried
    heartbeat_interval: Annotated[int, Ge(1)] = 30
    grace_period: Annotated[int, Ge(1)] = 120
    # re-train the top K with confirm_seeds new seeds and confirm_budget x the steps; the best confirmed mean is
    # exported (defaults: replay on the quickstart's table, README "Search fidelity")
    confirm_top: Annotated[int, NonNegative] = 3
    confirm_seeds: Annotated[int, Ge(1)] = 1
    confirm_budget: Annotated[float, Positive] = 1.0
    sampler: Literal["tpe", "random", "gp", "nsga2", "cmaes", "qmc"] = "tpe"
    pruner: Literal["hyperband", "median", "sha", "none"] = "median"
    n_startup_trials: Annotated[int, NonNegative] = 5  # TPE's random start
    seed: int | None = 0
    study_name: str | None = None  # default: the space's name
    storage: str | None = None  # default: sqlite:///runs/<study>.db
    save_weights: bool = True  # keep each completed trial's weights under runs/<study>/trials/
    # the learning rate (hybridnas.ladder): sample = one more searched parameter; ladder = every trial trains
    # lr_ladder rates over train.lr and keeps the best; halving = the rates train to lr_rung of the steps and the
    # lowest validation loss there continues alone
    lr_mode: Literal["sample", "ladder", "halving"] = "halving"
    lr_ladder: Annotated[int, Ge(1)] = 3
    lr_rung: Annotated[float, Interval(gt=0, lt=1)] = 0.25
    # no trial is pruned before this fraction of its steps (recall tasks sit on a plateau, then jump)
    prune_after: Annotated[float, Interval(ge=0, lt=1)] = 0.5


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
