"""Search space -> Optuna trial -> objective; the study, resuming, budgets, failures and the trial cap.

Parameter names in the study: model fields by name (``pattern``, ``d_model``), genome/ratio genes as
``pattern.length``, ``pattern.pos3``, ``pattern.share.A``, per-symbol parameters as ``SYMBOL.param``
(``A.n_heads``), training fields by name (``lr``). A per-symbol parameter is only suggested when the sampled
pattern uses the symbol, so unused symbols never split the space.

Every trial records as user attributes: the pattern, its canonical form, the architecture key, exact
parameter count, decode state bytes, decode throughput when measured, the training metrics, the full
architecture (to rebuild it), and for failures a ``fail_reason``. A trial whose full configuration equals an
already completed one is not retrained: it reuses that value and says so (``duplicate_of``).

Budgets (``search.constraints``) become Optuna constraints (``trial.set_constraint``; feasible when <= 0).
They are known before training, so an infeasible candidate is recorded (PRUNED, ``infeasible``) and never
trained. The parameter count comes from the layers' formulas, so a candidate over the ``params`` budget is
recorded infeasible before its model is built (nothing allocated); decode-state bytes and throughput are measured
on the built model. One objective keeps pruning; several objectives give a Pareto front and no pruning.

A trial that runs long says how it goes: once it has run ``progress_after`` seconds (default
:data:`PROGRESS_AFTER`, ``hybridnas search --progress-after``), each evaluation prints a line ``trial N step
S/STEPS loss L accuracy A Ts``, at most one every ``progress_after`` seconds (0: every evaluation); ``--quiet``
prints none. Short trials stay quiet: their one line comes when they end.

``n_trials`` counts trials that trained (:func:`counts_toward_budget`); infeasible, duplicate, repaired and
invalid proposals (:func:`bookkeeping`) are counted apart and capped per run (:func:`proposal_cap`).

Failures of a candidate are data (out of memory, divergence, an invalid configuration: :func:`failure_kind`); any
other exception is a bug and stops the search with the trial's parameters (:class:`TrialError`) unless
``search.on_error: record``. Resuming (:func:`open_study`) re-seeds the sampler past the trials already there,
fails at once the running trials of this machine's dead processes (:func:`fail_dead_local_trials`), and refuses a
space whose scoring settings or categorical choices changed since the study began (:func:`check_resume`).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NoReturn

import optuna
import torch
from optuna.exceptions import ExperimentalWarning

from hybridnas import patterns
from hybridnas.ladder import ladder_from, ladder_trainer
from hybridnas.model import HybridLM
from hybridnas.resume import check_resume, record_space
from hybridnas.schema import (
    CONSTRAINTS,
    MAX_PARAMS,
    ArchConfig,
    ModelConfig,
    Range,
    SearchSpace,
    TrainConfig,
    arch_key,
    value_options,
)
from hybridnas.storage import (  # noqa: F401 (load_study, dead_local_trials, fail_dead_local_trials re-exported)
    HOST_ATTR,
    PID_ATTR,
    RUNS_DIR,
    dead_local_trials,
    default_storage,
    fail_dead_local_trials,
    load_study,
    make_storage,
    record_process,
    storage_errors,
)
from hybridnas.validation import check_train
from hybridnas.yamlio import ConfigError
from layers.ops import dispatch

warnings.filterwarnings("ignore", category=ExperimentalWarning, module="optuna")


PROGRESS_AFTER = 10.0  # seconds into a trial before it prints progress lines (and between two of them)


class InvalidTrialConfig(ValueError):
    """A sampled configuration that cannot be built; recorded on the trial, the search goes on."""


class TrialError(RuntimeError):
    """A trial's code raised something that is not a failure of the candidate (a bug: ``TypeError``,
    ``AttributeError``, ...); the search stops (``search.on_error: stop``). ``error`` is the exception raised, with
    its traceback; the trial is recorded FAIL with ``error`` and does not count toward ``n_trials``, so it re-runs
    once the bug is fixed and the search resumed."""

    def __init__(self, number: int, params: dict[str, Any], error: BaseException):
        self.number, self.params, self.error = number, dict(params), error
        shown = ", ".join(f"{k}={v}" for k, v in self.params.items()) or "no parameters"
        super().__init__(f"trial {number} ({shown}) raised {type(error).__name__}: {error}")


def failure_kind(e: BaseException) -> str | None:
    """The ``fail_reason`` of an exception that is a failure of the candidate, recorded as data: ``out_of_memory``
    (``torch.OutOfMemoryError``, ``MemoryError``, an allocator's out-of-memory ``RuntimeError``), ``diverged``
    (``FloatingPointError``), ``invalid_config`` (the project's configuration errors: a layer's, a pattern's, a
    task's, the registry's, the loader's). None for anything else: a bug."""
    from hybridnas.tasks.base import TaskConfigError
    from layers.base import LayerConfigError
    from layers.registry import RegistryError

    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return "out_of_memory"
    if isinstance(e, RuntimeError) and any(m in str(e).lower() for m in ("out of memory", "can't allocate memory")):
        return "out_of_memory"
    if isinstance(e, FloatingPointError):
        return "diverged"
    if isinstance(e, (InvalidTrialConfig, LayerConfigError, patterns.PatternError, TaskConfigError, RegistryError,
                      ConfigError)):
        return "invalid_config"
    return None


class _QuietStops(logging.Filter):
    """Drops Optuna's "Trial N failed ... because of the following error" record, traceback included, and the
    "Trial N failed with value None" that follows it, for the two exceptions the caller reports itself: Ctrl-C and
    a :class:`TrialError` (printed once, by the CLI)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped: str | None = None  # "Trial N failed with value" of the record just dropped

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (KeyboardInterrupt, TrialError)):
            self.dropped = record.getMessage().split(" failed with parameters", 1)[0] + " failed with value"
            return False
        follows, self.dropped = self.dropped, None
        return not (follows is not None and record.getMessage().startswith(follows))


@contextlib.contextmanager
def _quiet_stops() -> Iterator[None]:
    logger = logging.getLogger("optuna.study._optimize")
    f = _QuietStops()
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)


# ---------------------------------------------------------------------------------------------- sampling


def suggest(trial: optuna.Trial, name: str, value: Any) -> Any:
    """Fixed value -> itself; list -> categorical; Range -> int or float parameter."""
    if isinstance(value, list):
        return trial.suggest_categorical(name, value)
    if isinstance(value, Range):
        if isinstance(value.low, int) and isinstance(value.high, int):
            return trial.suggest_int(name, value.low, value.high, step=value.step or 1, log=value.log)
        return trial.suggest_float(name, float(value.low), float(value.high), log=value.log, step=value.step)
    return value


def sample_arch(space: SearchSpace, trial: optuna.Trial, notes: dict[str, Any] | None = None) -> ArchConfig:
    """Ask ``trial`` for every searchable value of ``space``; return the concrete architecture.

    What sampling had to change (``pattern_repaired``: the genome before repair) is set on the trial and, when
    ``notes`` is given, also put there, so a caller can tell this trial's repair from attributes it inherited."""
    from hybridnas.pattern_space import RepairError, sample_pattern

    m = space.model
    pspace = m.get("pattern", ModelConfig.pattern)
    if hasattr(pspace, "used_symbols"):
        try:
            pattern, found = sample_pattern(pspace, trial, suggest)
        except RepairError as e:
            raise InvalidTrialConfig(f"sampled genome cannot meet the count bounds: {e}") from None
        for k, v in found.items():
            trial.set_user_attr(k, v)
        if notes is not None:
            notes.update(found)
    else:
        pattern = suggest(trial, "pattern", pspace)
    model_kwargs: dict[str, Any] = {}
    for key, value in m.items():
        if key in ("pattern", "layers"):
            continue
        model_kwargs[key] = suggest(trial, key, value)
    used = set(patterns.used_symbols(pattern))
    layers: dict[str, dict[str, Any]] = {}
    for sym, params in m.get("layers", {}).items():
        if sym in used:
            layers[sym] = {k: suggest(trial, f"{sym}.{k}", v) for k, v in params.items()}
    model = ModelConfig(pattern=pattern, layers=layers, **model_kwargs)
    ladder = space.search.lr_mode != "sample"
    train = TrainConfig(**{k: (ladder_from(v, space.search.lr_ladder)[0] if ladder and k == "lr" else
                               suggest(trial, k, v)) for k, v in space.train.items()})
    bad = check_train(train)
    if bad:
        raise InvalidTrialConfig("; ".join(f"train.{f}: {msg}" for f, msg in bad))
    return ArchConfig(model=model, task=space.task, train=train, symbols=dict(space.symbols), name=space.name)


def config_key(arch: ArchConfig) -> str:
    """Architecture key plus the training settings that change the result (not device or threads; precision only
    when not the default ``auto``, so that trials recorded before it existed keep their keys)."""
    train = {k: v for k, v in asdict(arch.train).items()
             if k not in ("device", "threads") and not (k == "precision" and v == "auto")}
    text = arch_key(arch.model) + json.dumps(train, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def task_seq_len(arch: ArchConfig) -> int:
    """Where decode-state bytes are measured by default: the task's sequence length (a suite's longest)."""
    return arch.task.build_config().decode_seq_len()


@torch.no_grad()
def decode_tokens_per_s(model: HybridLM, batch: int = 1, prompt: int = 16, steps: int = 32,
                        device: torch.device | str = "cpu") -> float:
    """Measured decoding throughput: tokens/s of ``model.step`` after a short prefill (random weights)."""
    model = model.to(device).eval()
    x = torch.randint(0, model.cfg.vocab_size, (batch, prompt), device=device)
    _, state = model.prefill(x)
    tok = x[:, -1]
    for _ in range(4):
        _, state = model.step(tok, state)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        _, state = model.step(tok, state)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / max(time.perf_counter() - t0, 1e-9)


# ---------------------------------------------------------------------------------------------- study setup


def make_sampler(space: SearchSpace, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    s = space.search
    seed = None if s.seed is None else s.seed + seed_offset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        if s.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.n_startup_trials)
        if s.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if s.sampler == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        if s.sampler == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        if s.sampler == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed)
        return optuna.samplers.QMCSampler(seed=seed)


def _budget(space: SearchSpace) -> tuple[int, int]:
    """(first step a trial may be pruned at, largest step count) over the space: the pruner's resource bounds.
    The first is the smallest eval interval, or ``search.prune_after`` of the steps if that is later."""
    evals = [int(v) for v in value_options(space.train.get("eval_every", TrainConfig.eval_every))]
    steps = [int(v) for v in value_options(space.train.get("steps", TrainConfig.steps))]
    runs = space.task.build_config().resource_runs()  # a suite reports across its runs
    max_res = max(steps) * runs
    return max(min(evals), math.ceil(space.search.prune_after * max_res)), max_res


def make_pruner(space: SearchSpace) -> optuna.pruners.BasePruner:
    min_res, max_res = _budget(space)
    p = space.search.pruner
    if len(space.objective_names()) > 1 or p == "none":
        return optuna.pruners.NopPruner()  # Optuna prunes single-objective studies only
    if p == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_res, max_resource=max(max_res, min_res),
                                              reduction_factor=3)
    if p == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=min_res)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_res)


def resolve_storage(space: SearchSpace, storage: str | None, study_name: str | None, workers: int = 1) -> str:
    name = study_name or space.search.study_name or space.name
    return storage or space.search.storage or default_storage(name, workers)


#: a resumed study's sampler seed moves on by this much per trial already there, past the local workers' offsets
RESUME_SEED_STRIDE = 1000


def open_study(space: SearchSpace, storage: str | None = None, study_name: str | None = None, *,
               workers: int = 1, seed_offset: int = 0, log: Callable[[str], None] | None = None) -> optuna.Study:
    """Create or resume the study. A resumed study is checked against the space (:func:`check_resume`) and its
    sampler is seeded past the trials already there: with the same seed it would propose the first run's
    configurations again."""
    name = study_name or space.search.study_name or space.name
    url = resolve_storage(space, storage, study_name, workers)
    st = make_storage(url, space.search.heartbeat_interval, space.search.grace_period)
    with storage_errors(url):
        study = optuna.create_study(study_name=name, storage=st, directions=space.directions(),
                                    sampler=make_sampler(space, seed_offset), pruner=make_pruner(space),
                                    load_if_exists=True)
        existing = len(study.get_trials(deepcopy=False))
        if "space_yaml" not in study.user_attrs:
            study.set_user_attr("space_yaml", space.text)
            study.set_user_attr("space_file", space.source.file)
            study.set_user_attr("objective", space.objective_names()[0])
            study.set_user_attr("objectives", space.objective_names())
            study.set_user_attr("storage", url)
            record_space(study, space, suggest)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                study.set_metric_names(space.objective_names())
        else:
            check_resume(space, study, suggest, log)
    if existing:
        study.sampler = make_sampler(space, seed_offset + RESUME_SEED_STRIDE * existing)
    return study


def trial_dir(study_name: str, number: int) -> Path:
    return Path(RUNS_DIR) / study_name / "trials" / f"{number:05d}"


# ---------------------------------------------------------------------------------------------- budget count


def bookkeeping(t: optuna.trial.FrozenTrial) -> str | None:
    """Why a proposal trained nothing, or None for a trial that trained (or may still train): ``infeasible``
    (a budget broken before training), ``duplicate`` (reuses a completed trial's value), ``repaired`` (its
    genome was repaired and re-proposed as ``repaired_into``), ``invalid`` (a configuration that cannot be
    built). The marks are set the moment the trial knows, before it finishes."""
    a = t.user_attrs
    if "infeasible" in a:
        return "infeasible"
    if "duplicate_of" in a:
        return "duplicate"
    if "repaired_into" in a:
        return "repaired"
    if a.get("fail_reason") == "invalid_config":
        return "invalid"
    return None


def counts_toward_budget(t: optuna.trial.FrozenTrial) -> bool:
    """Only trials that trained count toward ``n_trials``: complete, pruned while training, and failures
    recorded as data (OOM, divergence, errors). Bookkeeping proposals (:func:`bookkeeping`) are counted apart
    and capped per run (:func:`proposal_cap`). A trial failed by Ctrl-C or a killed worker has no
    ``fail_reason`` and does not count, so it is re-run instead of losing budget to the interruption; a trial
    started past the cap by a racing worker (``over_cap``) never counts."""
    if "over_cap" in t.user_attrs or bookkeeping(t) is not None:
        return False
    if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
        return True
    return t.state == optuna.trial.TrialState.FAIL and "fail_reason" in t.user_attrs


def finished_count(study: optuna.Study) -> int:
    """Trials that trained (see :func:`counts_toward_budget`)."""
    return sum(counts_toward_budget(t) for t in study.get_trials(deepcopy=False))


def proposal_cap(space: SearchSpace, total: int) -> int:
    """How many proposals that train nothing one run (one process) may make before it stops:
    ``search.max_proposals``, by default ``max(50, 10 * n_trials)``."""
    return space.search.max_proposals or max(50, 10 * total)


def _holds_a_ticket(t: optuna.trial.FrozenTrial) -> bool:
    """Trained, or live and not yet known to be bookkeeping: such a trial may still train, so it holds a slot."""
    live = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    return counts_toward_budget(t) or (t.state in live and "over_cap" not in t.user_attrs
                                       and bookkeeping(t) is None)


def over_cap(study: optuna.Study, trial_number: int, total: int) -> bool:
    """True when ``total`` earlier trials already count or may still train: this one must not train.

    Trial numbers are assigned by the storage in creation order, so every worker ranks the same way and at
    most ``total`` trials ever train, however many workers race for the last slots: every earlier trial that
    will train is either finished and counted or live and unmarked when this one checks (a bookkeeping mark
    is final). A live trial that later turns out to be bookkeeping may make this check refuse a slot that
    frees up; the worker that owns it goes on and fills it, so the study still reaches its target."""
    earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial_number and _holds_a_ticket(t)]
    return len(earlier) >= total


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    if len(study.directions) > 1:
        return None
    try:
        return study.best_trial
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------- objective


class Objective:
    """Callable Optuna objective for one search space. Task data are built once and shared by all trials."""

    def __init__(self, space: SearchSpace, study_name: str, *, total: int | None = None, quiet: bool = False,
                 trainer: Callable[..., Any] | None = None, make_run: Callable[..., Any] | None = None,
                 data: Any = None, progress_after: float | None = PROGRESS_AFTER):
        """``progress_after``: seconds into a trial before it prints progress lines, and between two of them (None:
        never; nothing is printed when ``quiet``).

        ``trainer`` (train's signature) and ``make_run`` (a run advanced evaluation by evaluation, for the lr
        ladder) replace real training: :mod:`hybridnas.replay` answers trials from a sweep's table through them."""
        from hybridnas.tasks import build_task

        self.space = space
        self.study_name = study_name
        self.trainer = trainer
        self.make_run = make_run
        self.data = data if data is not None or trainer is not None else build_task(space.task.name,
                                                                                     space.task.build_config())
        self.total = total
        self.quiet = quiet
        self.progress_after = None if quiet else progress_after
        self.names = space.objective_names()

    def _progress(self, trial_number: int, steps: int, t0: float) -> Callable[[int, dict[str, float]], None]:
        """A trial's progress printer (see the module docstring): called at each evaluation."""
        last = [-math.inf]

        def show(step: int, ev: dict[str, float]) -> None:
            now = time.perf_counter()
            after = self.progress_after
            if after is None or now - t0 < after or now - last[0] < after:
                return
            last[0] = now
            from tqdm.auto import tqdm

            shown = "".join(f" {k} {ev[k]:.4f}" for k in ("loss", "accuracy", "bits_per_byte")
                            if isinstance(ev.get(k), float))
            tqdm.write(f"  trial {trial_number:3d} step {step}/{steps}{shown} {now - t0:.1f}s")

        return show

    def _duplicate(self, trial: optuna.Trial, key: str) -> optuna.trial.FrozenTrial | None:
        done = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        for t in done:
            if t.user_attrs.get("config_key") == key and t.number != trial.number:
                return t
        return None

    def _requeue_repaired(self, trial: optuna.Trial, genes: str, pattern: str) -> NoReturn:
        """A repaired genome trains as a new trial whose genes are the repaired ones, so every trained trial's
        params map to its pattern without repair and the sampler learns what was trained. This proposal ends
        PRUNED (``repaired_into``) without training and does not count toward ``n_trials``."""
        params = dict(trial.params)
        for name in params:
            if name.startswith("pattern.pos"):
                params[name] = pattern[int(name[len("pattern.pos"):].split("[")[0])]
        study = trial.study
        study.enqueue_trial(params, user_attrs={"repaired_from": trial.number, "pattern_repaired": genes})
        child = next(t.number for t in study.get_trials(deepcopy=False)
                     if t.user_attrs.get("repaired_from") == trial.number)
        trial.set_user_attr("repaired_pattern", pattern)
        trial.set_user_attr("repaired_into", child)
        raise optuna.TrialPruned(f"genome {genes} repaired into {pattern}, proposed again as trial {child}")

    def _fail(self, trial: optuna.Trial, reason: str, error: str) -> float | list[float]:
        trial.set_user_attr("fail_reason", reason)
        trial.set_user_attr("error", error[:500])
        return math.nan if len(self.names) == 1 else [math.nan] * len(self.names)

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        t0 = time.perf_counter()
        if self.total is not None and over_cap(trial.study, trial.number, self.total):
            trial.set_user_attr("over_cap", True)
            trial.study.stop()
            raise optuna.TrialPruned("the study already holds its trial cap")
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        if hasattr(trial, "storage"):
            record_process(trial)
        notes: dict[str, Any] = {}
        try:
            arch = sample_arch(self.space, trial, notes)
        except InvalidTrialConfig as e:
            return self._fail(trial, "invalid_config", str(e))
        if "pattern_repaired" in notes:
            self._requeue_repaired(trial, notes["pattern_repaired"], arch.model.pattern)
        model = arch.model
        trial.set_user_attr("pattern", model.pattern)
        trial.set_user_attr("canonical", patterns.to_primary(model.pattern))
        trial.set_user_attr("arch_key", arch_key(model))
        key = config_key(arch)
        trial.set_user_attr("config_key", key)
        trial.set_user_attr("arch", arch.to_dict())
        try:
            n_params = HybridLM.param_count(model)
        except (ValueError, TypeError) as e:
            return self._fail(trial, "invalid_config", str(e))
        trial.set_user_attr("params", n_params)
        if n_params > MAX_PARAMS:  # the loader bounds the space's largest candidate; this is the sampled one's
            return self._fail(trial, "invalid_config", f"{n_params:.3g} parameters, more than the {MAX_PARAMS:.0e} "
                                                       "a search builds")
        dup = self._duplicate(trial, key)
        if dup is not None:
            trial.set_user_attr("duplicate_of", dup.number)
            for k, v in dup.user_attrs.items():
                if k in ("state_bytes", "tokens_per_s", "metrics", "weights", "arch", "lr", "lr_rungs", "lr_scores") \
                        or k.startswith("mad/"):
                    trial.set_user_attr(k, v)
            return dup.values[0] if len(self.names) == 1 else list(dup.values)
        return self._train(trial, arch, n_params, t0)

    def _budgets(self, trial: optuna.Trial, arch: ArchConfig, model: HybridLM, n_params: int) -> dict[str, float]:
        s = self.space.search
        seq = s.state_seq_len or task_seq_len(arch)
        measured: dict[str, float] = {"params": n_params, "state_bytes": model.state_size(1, seq)}
        trial.set_user_attr("state_bytes", measured["state_bytes"])
        trial.set_user_attr("state_seq_len", seq)
        if "tokens_per_s" in s.constraints or "tokens_per_s" in self.names:
            from hybridnas.train import resolve_device

            tps = decode_tokens_per_s(model, batch=s.latency_batch, device=resolve_device(arch.train.device))
            model.to("cpu")
            measured["tokens_per_s"] = tps
            trial.set_user_attr("tokens_per_s", tps)
        return measured

    def _constrain(self, trial: optuna.Trial, measured: dict[str, float], done: set[str]) -> None:
        """Set the Optuna constraint of every budget ``measured`` holds; a broken one makes the trial infeasible
        (PRUNED with ``infeasible``, never trained). Called with the formula budgets before the model is built, then
        with the measured ones: each budget is set once (``done`` holds those set)."""
        violations = []
        for name, bound in self.space.search.constraints.items():
            if name not in measured or name in done:
                continue
            value = measured[name] - bound if CONSTRAINTS[name] == "max" else bound - measured[name]
            trial.set_constraint(name, float(value))
            done.add(name)
            if value > 0:
                violations.append(f"{name}={measured[name]:.4g} vs {CONSTRAINTS[name]} {bound:.4g}")
        if violations:
            trial.set_user_attr("infeasible", "; ".join(violations))
            raise optuna.TrialPruned("infeasible before training: " + "; ".join(violations))

    def _train(self, trial: optuna.Trial, arch: ArchConfig, n_params: int, t0: float) -> float | list[float]:
        from hybridnas.trainers import trainer_for

        train = self.trainer or trainer_for(arch.task.name)
        if self.space.search.lr_mode != "sample":
            train = ladder_trainer(self.space, train, self.make_run)
        primary = self.names[0]
        multi = len(self.names) > 1
        out_dir = trial_dir(self.study_name, trial.number)
        progress = self._progress(trial.number, arch.train.steps, t0)

        def on_eval(step: int, ev: dict[str, float]) -> None:
            progress(step, ev)
            value = ev[primary]
            if not multi and math.isfinite(value):
                trial.report(value, step)
                if trial.should_prune():
                    trial.set_user_attr("pruned_at_step", step)
                    raise optuna.TrialPruned(f"pruned at step {step} ({primary}={value:.4f})")

        hparams = {"pattern": arch.model.pattern, **{k: v for k, v in trial.params.items() if k != "pattern"}}
        try:
            return self._train_and_score(trial, arch, n_params, t0, train, on_eval, hparams, out_dir)
        finally:  # a Triton path that failed its self-check ran chunked in this trial: say so on the trial
            fallbacks = dispatch.fallbacks()
            if fallbacks:
                trial.set_user_attr("backend_fallbacks", fallbacks)

    def _train_and_score(self, trial: optuna.Trial, arch: ArchConfig, n_params: int, t0: float, train: Any,
                         on_eval: Any, hparams: dict[str, Any], out_dir: Path) -> float | list[float]:
        from hybridnas import train as train_mod

        primary = self.names[0]
        multi = len(self.names) > 1
        try:
            done: set[str] = set()
            self._constrain(trial, {"params": n_params}, done)  # from the formulas: nothing built for a broken budget
            torch.manual_seed(arch.train.seed)  # the initial weights follow the trial's seed, not the process
            model = HybridLM(arch.model)
            measured = self._budgets(trial, arch, model, n_params)
            self._constrain(trial, measured, done)
            trial.set_user_attr("threads", arch.train.threads or torch.get_num_threads())
            with train_mod.closing_writers():  # whatever ends the trial, no TensorBoard writer stays open
                result = train(arch, self.data, on_eval=on_eval, model=model,
                               log_dir=str(Path(RUNS_DIR) / self.study_name / "tb" / f"trial-{trial.number:05d}"),
                               hparams=hparams)
        except optuna.TrialPruned:
            raise
        except Exception as e:
            reason = failure_kind(e)
            if reason is None and self.space.search.on_error == "stop":
                trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:500])  # no fail_reason: not counted
                raise TrialError(trial.number, trial.params, e) from e
            return self._fail(trial, reason or "error", f"{type(e).__name__}: {e}")
        metrics = {k: v for k, v in result.metrics.items() if not (isinstance(v, float) and not math.isfinite(v))}
        trial.set_user_attr("metrics", metrics)
        if metrics.get("compile_error"):  # torch.compile failed: the trial trained eagerly
            trial.set_user_attr("compile_fallback", metrics["compile_error"])
        for k, v in result.attrs.items():
            trial.set_user_attr(k, v)
        if "lr" in result.attrs:  # the ladder's winning rate is the one the exported architecture trains with
            arch = replace(arch, train=replace(arch.train, lr=float(result.attrs["lr"])))
            trial.set_user_attr("arch", arch.to_dict())
        if result.metrics["stop_reason"] == "nan":
            return self._fail(trial, "diverged", "loss became NaN or infinite")
        value = result.metrics[primary]
        if self.space.search.save_weights and isinstance(value, float) and math.isfinite(value):
            from hybridnas.checkpoint import save_checkpoint

            save_checkpoint(out_dir, arch, result.model)
            trial.set_user_attr("weights", str(out_dir))
        trial.set_user_attr("duration_s", time.perf_counter() - t0)
        if not multi:
            return float(value)
        return [float(value)] + [float(measured[n]) for n in self.names[1:]]


# ---------------------------------------------------------------------------------------------- driver


def trial_note(t: optuna.trial.FrozenTrial) -> str:
    """What a trial's line says besides its numbers: why it trained nothing, how it failed, what was repaired."""
    a = t.user_attrs
    parts = []
    if "duplicate_of" in a:
        parts.append(f"duplicate of #{a['duplicate_of']}")
    if "repaired_into" in a:
        parts.append(f"repaired: {a.get('pattern_repaired', '?')} -> {a.get('repaired_pattern', '?')}, "
                     f"trains as #{a['repaired_into']}")
    elif "pattern_repaired" in a and "pattern" in a:
        parts.append(f"repaired: {a['pattern_repaired']} -> {a['pattern']}")
    if "infeasible" in a:
        parts.insert(0, f"infeasible: {a['infeasible']}")
    if "fail_reason" in a:
        parts.insert(0, a["fail_reason"])
    elif t.state == optuna.trial.TrialState.FAIL and "stale" in a:
        parts.insert(0, a["stale"])
    elif t.state == optuna.trial.TrialState.FAIL and "error" in a:
        parts.insert(0, f"stopped the search: {a['error']}")
    if "lr" in a and "duplicate_of" not in a:
        parts.append(f"lr {a['lr']:g}")  # the ladder's winning rate
    return "; ".join(parts)


def _progress_callback(total: int, done: int, quiet: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=min(done, total), desc="trials", unit="trial", disable=quiet, dynamic_ncols=True)
    untrained = [0]

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if "over_cap" in trial.user_attrs:
            return
        if counts_toward_budget(trial):
            bar.update(1)
        elif bookkeeping(trial) is not None:
            untrained[0] += 1
        best = best_trial(study)
        postfix = {"best": f"{best.value:.4f}", "best_trial": best.number} if best is not None else {}
        bar.set_postfix(**postfix, **({"untrained": untrained[0]} if untrained[0] else {}))
        if quiet:
            return
        val = "-" if trial.values is None else "/".join(f"{v:.4g}" for v in trial.values)
        dur = f"{trial.duration.total_seconds():.1f}s" if trial.duration is not None else "-"
        note = trial_note(trial)
        if bookkeeping(trial) is not None:
            note += "; not counted"
        pattern = trial.user_attrs.get("pattern") or trial.user_attrs.get("pattern_repaired", "?")
        bar.write(f"trial {trial.number:3d} {trial.state.name:8s} {val:>8s} {dur:>7s}  {pattern}"
                  f"  params={trial.user_attrs.get('params', '?')}" + (f" ({note})" if note else ""))

    return bar, callback


def _where(t: optuna.trial.FrozenTrial) -> str:
    a = t.system_attrs
    if HOST_ATTR in a and PID_ATTR in a:
        return f"{a[HOST_ATTR]}:{a[PID_ATTR]}"
    return t.user_attrs.get("worker", "waiting" if t.state == optuna.trial.TrialState.WAITING else "worker unknown")


def held_slots(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Live trials that hold a slot of the trial cap (running or waiting, not yet known to train nothing)."""
    live = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    return [t for t in study.get_trials(deepcopy=False, states=live) if _holds_a_ticket(t)]


def run_search(space: SearchSpace, *, storage: str | None = None, study_name: str | None = None,
               n_trials: int | None = None, timeout: float | None = None, quiet: bool = False,
               workers: int = 1, seed_offset: int = 0, objective_kwargs: dict[str, Any] | None = None,
               gc_after_trial: bool = True, report: dict[str, Any] | None = None,
               progress_after: float | None = PROGRESS_AFTER) -> optuna.Study:
    """Run (or resume) the study until ``n_trials`` trials have trained (:func:`counts_toward_budget`).

    Proposals that train nothing (infeasible, duplicate, repaired, invalid) do not count; one run stops after
    :func:`proposal_cap` of them and says so. A run that ends short of the target says how many trained and why,
    and ``report`` (when given) gets ``trained``, ``target`` and ``short``: None, or why it ended short
    (``timeout``: the time limit the user set; ``proposals``: the proposal cap; ``held``: running trials
    elsewhere hold the remaining slots; ``stopped``). Torch's threads are set first
    (:func:`hybridnas.runtime.apply_torch_threads`: the usable cores shared by the local workers, unless
    ``train.threads`` or ``OMP_NUM_THREADS`` says otherwise).

    Before asking for a trial, the RUNNING trials of this host's dead processes are failed and retried
    (:func:`fail_dead_local_trials`). A bug in a trial's code raises :class:`TrialError` (``search.on_error: stop``).

    ``progress_after``: a trial prints progress lines once it has run that many seconds (see the module docstring;
    None: never).

    ``objective_kwargs`` go to :class:`Objective` (``trainer``, ``make_run``, ``data``: a replay answers trials
    from a table through them; the rest of the loop is the search's own).

    ``workers`` only picks the default storage (a journal file when several processes share the study);
    :func:`hybridnas.workers.run_workers` starts the processes. KeyboardInterrupt propagates after Optuna has
    marked the running trial FAIL: the study stays consistent and re-running the same command resumes it.
    """
    from hybridnas.runtime import apply_torch_threads

    total = n_trials if n_trials is not None else space.search.n_trials
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"n_trials must be a positive integer, got {total!r}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(space, storage, study_name, workers=workers, seed_offset=seed_offset,
                       log=None if quiet else print)
    fail_dead_local_trials(study, log=print)
    done = finished_count(study)
    if report is not None:
        report.update(trained=done, target=total, short=None)
    if total - done <= 0:
        if not quiet:
            print(f"study {study.study_name!r} already has {done} trained trials (target {total}); nothing to run")
        return study
    threads = space.train.get("threads")
    apply_torch_threads(threads if isinstance(threads, int) and not isinstance(threads, bool) else None)
    objective = Objective(space, study.study_name, total=total, quiet=quiet,
                          **{"progress_after": progress_after, **(objective_kwargs or {})})
    bar, callback = _progress_callback(total, done, quiet)
    limit = proposal_cap(space, total)
    trained: list[int] = []
    skipped: dict[str, int] = {}
    ended: dict[str, str] = {}

    def cap(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        kind = bookkeeping(trial)
        if "over_cap" in trial.user_attrs:
            ended["over_cap"] = "yes"  # other workers hold the remaining slots
        elif kind is not None:
            skipped[kind] = skipped.get(kind, 0) + 1
        elif counts_toward_budget(trial):
            trained.append(trial.number)
        if kind is None and gc_after_trial:
            gc.collect()  # after a training run only: a bookkeeping proposal leaves nothing big behind
        if finished_count(study) >= total:
            study.stop()
        elif sum(skipped.values()) >= limit:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(skipped.items()))
            where = "search.max_proposals" if space.search.max_proposals else \
                "max(50, 10 * n_trials); set search.max_proposals to change it"
            ended["why"] = (f"stopped: {limit} proposals in this run trained nothing ({kinds}), the limit "
                            f"({where})")
            study.stop()

    t0 = time.perf_counter()
    time_limit = timeout or space.search.timeout
    try:
        # n_trials is an upper bound only: `cap` stops the loop once the study (all workers) holds `total`
        # trained trials, or this run has made `limit` proposals that trained nothing
        with _quiet_stops():
            study.optimize(objective, n_trials=(total - done) + limit + 1, timeout=time_limit,
                           callbacks=[callback, cap], gc_after_trial=False)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    hours = elapsed / 3600
    if "why" in ended:
        print(ended["why"])
    now = finished_count(study)
    short = None
    if now < total:
        held = held_slots(study)
        if "why" in ended:
            short, why = "proposals", "too many proposals trained nothing"
        elif "over_cap" in ended and held:
            short = "held"
            why = ("the remaining slot(s) are held by trial(s) running elsewhere: "
                   + ", ".join(f"#{t.number} ({_where(t)})" for t in held)
                   + "; they finish the study if their workers are alive, and are failed and retried once their "
                   f"heartbeat is {space.search.grace_period} s old if not")
        elif time_limit is not None and elapsed >= time_limit:
            short, why = "timeout", f"the time limit ({time_limit:g} s) ran out"
        else:
            short, why = "stopped", "the search stopped"
        print(f"ended short of the target: trained {now} of {total} trials: {why}; run the same command again to "
              "go on")
    if report is not None:
        report.update(trained=now, short=short)
    if not quiet:
        print(f"{len(trained)} trial(s) trained in {hours * 60:.1f} min: {len(trained) / max(hours, 1e-9):.1f} "
              "trials/hour")
    return study
