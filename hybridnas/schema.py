"""Typed configs: model, train, task, search space. Plain dataclasses, no YAML (``hybridnas.config`` reads YAML).

Bounds are declared on the fields as ``annotated_types`` metadata (``Annotated[int, Gt(0)]``): the dataclasses stay
plain (building one checks nothing), ``hybridnas.validation`` enforces the bounds when a file is read and
:func:`hybridnas.validation.field_problems` checks a config built in Python (a sampled trial).

Every number has an upper bound a search can live with and every float must be finite: a file's 1e308 learning rate
or 2^63 width is refused when it is read, not met as a 16 GB allocation in a trial. What spans fields (a layer's
options against ``d_model``, the parameter count of the largest candidate, :data:`MAX_PARAMS`) is checked by
:mod:`hybridnas.config`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from annotated_types import Ge, Gt, Interval, Le, Predicate

from hybridnas import patterns, registry

if TYPE_CHECKING:
    from hybridnas.yamlio import Source


def device_name(value: str) -> bool:
    """auto, cpu, cuda or cuda:N"""
    return value in ("auto", "cpu", "cuda") or value.startswith("cuda:")


def finite(value: float) -> bool:
    """a finite number"""
    return math.isfinite(value)


def non_blank(value: str) -> bool:
    """a non-empty string"""
    return bool(value.strip())


Positive = Gt(0)
NonNegative = Ge(0)
Unit = Interval(ge=0, le=1)
Finite = Predicate(finite)
NonBlank = Predicate(non_blank)
Name = Annotated[str, NonBlank]

#: widest model a file may ask for
MAX_D_MODEL = 65536
#: largest vocabulary (model embedding or task)
MAX_VOCAB = 2 ** 24
#: bound on every integer option of a layer (``M.d_state``, ``E.n_experts``, ``A.window``, ...); what they add up
#: to is bounded by :data:`MAX_PARAMS`
MAX_LAYER_INT = 2 ** 20
#: largest parameter count of a candidate, computed from the layers' formulas before anything is built (10
#: billion: 160 GB of AdamW state in fp32, more than one accelerator holds)
MAX_PARAMS = 10 ** 10


# ----------------------------------------------------------------------------------------------------------
# concrete configs


@dataclass
class ModelConfig:
    """One architecture. ``layers`` maps a symbol to its parameters (the rest come from the layer's defaults)."""

    vocab_size: Annotated[int, Positive, Le(MAX_VOCAB)] = 256
    d_model: Annotated[int, Positive, Le(MAX_D_MODEL)] = 128
    pattern: str = "AA"  # required in a file; the default serves models built in Python
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    norm_eps: Annotated[float, Interval(ge=0, le=1)] = 1e-6
    tie_embeddings: bool = True
    init_std: Annotated[float, NonNegative, Le(10)] = 0.02


@dataclass
class TrainConfig:
    """One short training run: AdamW, linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    steps: Annotated[int, Positive, Le(10 ** 9)] = 1000
    batch_size: Annotated[int, Positive, Le(2 ** 20)] = 32
    lr: Annotated[float, Positive, Le(10)] = 1e-3
    weight_decay: Annotated[float, NonNegative, Le(100)] = 0.1
    beta1: Annotated[float, Unit] = 0.9
    beta2: Annotated[float, Unit] = 0.95
    warmup_steps: Annotated[int, NonNegative, Le(10 ** 9)] = 50
    min_lr_ratio: Annotated[float, Unit] = 0.1
    grad_clip: Annotated[float, NonNegative, Finite] = 1.0  # 0: no clipping
    eval_every: Annotated[int, Positive, Le(10 ** 9)] = 100
    eval_examples: Annotated[int, Positive, Le(2 ** 31)] | None = None  # None: the whole validation set
    # early stop once reached; None: train all steps
    target_accuracy: Annotated[float, Interval(gt=0, le=1)] | None = 0.99
    seed: Annotated[int, NonNegative, Le(2 ** 62)] = 0  # numpy's generators take no negative seed
    device: Annotated[str, Predicate(device_name)] = "auto"
    bf16: bool = True  # autocast to bf16 on CUDA (ignored on CPU); false: as precision fp32
    # auto: bf16 autocast on CUDA (when bf16 is true), fp32 elsewhere; fp32: never autocast; bf16: autocast on any
    # device (CPU included)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    max_time: Annotated[float, Positive, Finite] | None = None  # seconds; stops the run (reason "time") when exceeded
    threads: Annotated[int, Ge(1), Le(4096)] | None = None  # torch intra-op threads; None: torch's default
    # torch.compile the model for training steps: auto compiles on CUDA and stays eager on CPU (README "Compile")
    compile: Literal["auto"] | bool = "auto"


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
    """Representative values of a searchable entry: every value of a list or a small int range, else the ends of
    the range (enough for a bound on the field; :func:`range_values` gives what a combination check needs)."""
    if isinstance(v, list):
        return v
    if isinstance(v, Range):
        if isinstance(v.low, int) and isinstance(v.high, int) and not v.log:
            step = v.step or 1
            if (v.high - v.low) // step + 1 > limit:  # counted first: a range up to 2^63 is never listed
                return [v.low, v.high]
            return list(range(v.low, v.high + 1, step))
        if isinstance(v.low, int) and isinstance(v.high, int) and v.high - v.low < limit:
            return list(range(v.low, v.high + 1))
        return [v.low, v.high]
    return [v]


def range_values(v: Any, limit: int = 65536) -> tuple[list[Any], bool]:
    """The values a searchable entry can yield, and whether that is all of them.

    A list, a fixed value, an int range and a float range with a step of at most ``limit`` values: every value
    (True). A longer range: both ends, ``limit // 4`` values next to each end and ``limit // 2`` spread evenly
    (False). A continuous float range: its ends and 512 values between them, evenly and irregularly spaced (in
    log space for a log range) (False): it yields every real number between its ends."""
    if isinstance(v, list):
        return v, True
    if not isinstance(v, Range):
        return [v], True
    if isinstance(v.low, int) and isinstance(v.high, int):
        step = 1 if v.log else (v.step or 1)
        n = (v.high - v.low) // step + 1
        if n <= limit:
            return list(range(v.low, v.high + 1, step)), True
        edge, spread = limit // 4, limit // 2
        idx = {*range(edge), *range(n - edge, n), *(k * (n - 1) // spread for k in range(spread + 1))}
        return [v.low + i * step for i in sorted(idx)], False
    low, high = float(v.low), float(v.high)
    if v.step is not None:
        n = int(math.floor((high - low) / v.step + 1e-9)) + 1
        if n <= limit:
            return [round(low + i * v.step, 12) for i in range(n)], True
    golden = (math.sqrt(5) - 1) / 2
    fractions = sorted({k / 256 for k in range(257)} | {(k * golden) % 1 for k in range(1, 256)})
    if v.log:
        a, b = math.log(low), math.log(high)
        values = [math.exp(a + (b - a) * f) for f in fractions]
    else:
        values = [low + (high - low) * f for f in fractions]
    return [low, *values[1:-1], high], False


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
    state_seq_len: Annotated[int, Positive, Le(2 ** 31)] | None = None
    # decode throughput (tokens/s of a step) is measured at this batch size
    latency_batch: Annotated[int, Ge(1), Le(2 ** 16)] = 1
    workers: Annotated[int, Ge(1), Le(1024)] = 1  # local worker processes (journal storage when > 1)
    # seconds; a worker silent for grace_period has its trial failed and retried
    heartbeat_interval: Annotated[int, Ge(1), Le(10 ** 6)] = 30
    grace_period: Annotated[int, Ge(1), Le(10 ** 6)] = 120
    # re-train the top K with confirm_seeds new seeds and confirm_budget x the steps; the best confirmed mean is
    # exported (defaults: replay on the quickstart's table, README "Search fidelity")
    confirm_top: Annotated[int, NonNegative] = 3
    confirm_seeds: Annotated[int, Ge(1), Le(1000)] = 1
    confirm_budget: Annotated[float, Positive, Le(1000)] = 1.0
    sampler: Literal["tpe", "random", "gp", "nsga2", "cmaes", "qmc"] = "tpe"
    pruner: Literal["hyperband", "median", "sha", "none"] = "median"
    n_startup_trials: Annotated[int, NonNegative] = 5  # TPE's random start
    # samplers take seeds in [0, 2^32); each local worker adds its index
    seed: Annotated[int, NonNegative, Le(2 ** 31 - 1)] | None = 0
    study_name: Name | None = None  # default: the space's name
    storage: Name | None = None  # default: sqlite:///runs/<study>.db
    save_weights: bool = True  # keep each completed trial's weights under runs/<study>/trials/
    # the learning rate (hybridnas.ladder): sample = one more searched parameter; ladder = every trial trains
    # lr_ladder rates over train.lr and keeps the best; halving = the rates train to lr_rung of the steps and the
    # lowest validation loss there continues alone
    lr_mode: Literal["sample", "ladder", "halving"] = "halving"
    lr_ladder: Annotated[int, Ge(1), Le(64)] = 3
    lr_rung: Annotated[float, Interval(gt=0, lt=1)] = 0.25
    # no trial is pruned before this fraction of its steps (recall tasks sit on a plateau, then jump)
    prune_after: Annotated[float, Interval(ge=0, lt=1)] = 0.5
    # an exception from the code a trial runs that is not a failure of the candidate (out of memory, divergence,
    # an invalid configuration) is a bug: stop names the trial and stops the search; record keeps it as a failed
    # trial (fail_reason: error) and goes on
    on_error: Literal["stop", "record"] = "stop"


@dataclass
class ExportSettings:
    dir: Name | None = None  # `hybridnas search` exports the best trial here when set


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
# post-training hybrid search (hybridnas.distill, `hybridnas distill-search`)


@dataclass
class DistillBudget:
    """Keep attention where it pays within a decode budget: state bytes or decode milliseconds per token, measured at
    ``seq_len`` tokens of context (default: ``distill.seq_len``). Exactly one of the two."""

    state_bytes: Annotated[float, Positive, Finite] | None = None
    decode_ms: Annotated[float, Positive, Finite] | None = None
    seq_len: Annotated[int, Positive, Le(2 ** 31)] | None = None


@dataclass
class StudentSpec:
    """The student: ``symbol`` replaces every attention layer not kept; ``keep`` attention layers stay (and/or a
    ``budget``); ``init``: from the teacher's projections where a mapping exists, else ``random``; ``freeze``: copied
    parts that do not train."""

    symbol: Name = "M"
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    keep: Annotated[int, Ge(1), Le(MAX_LAYER_INT)] | None = None
    budget: DistillBudget | None = None
    init: Literal["teacher", "random"] = "teacher"
    freeze: list[Literal["ffn", "embed"]] = field(default_factory=list)


@dataclass
class DistillSettings:
    """Distillation runs: forward KL(teacher || student) at T = 1 on the final logits, plus ``ce_weight`` times
    next-token cross-entropy; AdamW, ``warmup_steps`` of linear warmup, then constant or cosine (to ``min_lr_ratio``
    times ``lr``). Held-out KL and bits per byte on the first ``eval_tokens`` validation tokens."""

    score_steps: Annotated[int, Positive, Le(10 ** 9)] = 100
    final_steps: Annotated[int, Positive, Le(10 ** 9)] = 300
    lr: Annotated[float, Positive, Le(10)] = 1e-3
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: Annotated[int, NonNegative, Le(10 ** 9)] = 10
    min_lr_ratio: Annotated[float, Unit] = 0.1
    weight_decay: Annotated[float, NonNegative, Le(100)] = 0.0
    beta1: Annotated[float, Unit] = 0.9
    beta2: Annotated[float, Unit] = 0.95
    grad_clip: Annotated[float, NonNegative, Finite] = 1.0
    batch_size: Annotated[int, Positive, Le(2 ** 20)] = 16
    seq_len: Annotated[int, Positive, Le(2 ** 20)] = 128
    seeds: list[Annotated[int, NonNegative, Le(2 ** 62)]] = field(default_factory=lambda: [0, 1, 2])
    kl_weight: Annotated[float, NonNegative, Finite] = 1.0
    ce_weight: Annotated[float, NonNegative, Finite] = 0.0
    eval_tokens: Annotated[int, Positive, Le(2 ** 31)] = 65536
    device: Annotated[str, Predicate(device_name)] = "auto"
    threads: Annotated[int, Ge(1), Le(4096)] | None = None
    # the teacher's log-probabilities of one seed's batches kept for the next run on that seed (MiB; 0: none)
    teacher_cache_mb: Annotated[int, NonNegative, Le(2 ** 24)] = 1024


@dataclass
class DistillSpace:
    """A ``distill-search`` file: the teacher folder, the student, the distillation settings, the corpus (``lm``
    task settings), the placements compared with the KL-selected one, and the selection method."""

    name: str
    teacher: str
    student: StudentSpec
    distill: DistillSettings
    data: dict[str, Any]  # the lm task's settings, seq_len and tokenizer resolved
    compare: list[str]
    select: str
    source: Source
    text: str = ""
    teacher_pattern: str = ""  # the teacher's pattern as its folder says (a Hugging Face folder: converted, (AF)xL)
