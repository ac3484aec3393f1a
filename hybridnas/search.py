"""Search space -> Optuna trial -> objective; the study, its storage, resuming and failures.

Parameter names in the study: model fields by name (``pattern``, ``d_model``), per-symbol parameters as
``SYMBOL.param`` (``A.n_heads``), training fields by name (``lr``, ``batch_size``). A per-symbol parameter
is only suggested when the sampled pattern uses the symbol, so unused symbols never split the space.

Every trial records as user attributes: the pattern, its canonical form, the architecture key, exact
parameter count, decode state bytes at the task's sequence length, the training metrics, the full
architecture (to rebuild it), and for failures a ``fail_reason``. A trial whose full configuration equals
an already completed one is not retrained: it reuses that value and says so (``duplicate_of``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.exceptions import ExperimentalWarning

from hybridnas import patterns
from hybridnas.config import (
    ArchConfig,
    ModelConfig,
    Range,
    SearchSpace,
    TrainConfig,
    arch_key,
    check_train,
    value_options,
)
from hybridnas.model import HybridLM

RUNS_DIR = "runs"

# heartbeats, the stale-trial retry callback and QMC are stable in practice but still flagged experimental
warnings.filterwarnings("ignore", category=ExperimentalWarning, module="hybridnas")
warnings.filterwarnings("ignore", category=ExperimentalWarning, module="optuna")


class InvalidTrialConfig(ValueError):
    """A sampled configuration that cannot be built; recorded on the trial, the search goes on."""


# ---------------------------------------------------------------------------------------------- sampling


def _suggest(trial: optuna.Trial, name: str, value: Any) -> Any:
    if isinstance(value, list):
        return trial.suggest_categorical(name, value)
    if isinstance(value, Range):
        if isinstance(value.low, int) and isinstance(value.high, int):
            if isinstance(value.step, float):
                return trial.suggest_float(name, value.low, value.high, step=value.step)
            return trial.suggest_int(name, value.low, value.high, step=value.step or 1, log=value.log)
        return trial.suggest_float(name, float(value.low), float(value.high), log=value.log, step=value.step)
    return value


def sample_arch(space: SearchSpace, trial: optuna.Trial) -> ArchConfig:
    """Ask ``trial`` for every searchable value of ``space``; return the concrete architecture."""
    m = space.model
    pattern = _suggest(trial, "pattern", m.get("pattern", ModelConfig.pattern))
    model_kwargs: dict[str, Any] = {}
    for key, value in m.items():
        if key in ("pattern", "layers"):
            continue
        model_kwargs[key] = _suggest(trial, key, value)
    used = set(patterns.used_symbols(pattern))
    layers: dict[str, dict[str, Any]] = {}
    for sym, params in m.get("layers", {}).items():
        if sym not in used:
            continue
        layers[sym] = {k: _suggest(trial, f"{sym}.{k}", v) for k, v in params.items()}
    model = ModelConfig(pattern=pattern, layers=layers, **model_kwargs)
    train = TrainConfig(**{k: _suggest(trial, k, v) for k, v in space.train.items()})
    bad = check_train(train)
    if bad:
        raise InvalidTrialConfig("; ".join(f"train.{f}: {msg}" for f, msg in bad))
    return ArchConfig(model=model, task=space.task, train=train, symbols=dict(space.symbols), name=space.name)


def config_key(arch: ArchConfig) -> str:
    """Architecture key plus the training settings that change the result (not device or threads)."""
    train = {k: v for k, v in asdict(arch.train).items() if k not in ("device", "threads")}
    text = arch_key(arch.model) + json.dumps(train, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def task_seq_len(arch: ArchConfig) -> int:
    return int(arch.task.params.get("seq_len", 0) or 0)


# ---------------------------------------------------------------------------------------------- study setup


def default_storage(study_name: str) -> str:
    return f"sqlite:///{RUNS_DIR}/{study_name}.db"


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """SQLAlchemy URL -> RDB storage with heartbeats (a killed run's trial becomes FAIL and is retried);
    anything else is a journal file path (several local processes)."""
    if "://" in url:
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=15, grace_period=60,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))


def make_sampler(space: SearchSpace) -> optuna.samplers.BaseSampler:
    s = space.search
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.n_startup_trials)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.sampler == "gp":
        return optuna.samplers.GPSampler(seed=s.seed)
    if s.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.seed)
    if s.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=s.seed)
    return optuna.samplers.QMCSampler(seed=s.seed)


def _budget(space: SearchSpace) -> tuple[int, int]:
    """(smallest eval interval, largest step count) over the space: the pruner's resource bounds."""
    evals = [int(v) for v in value_options(space.train.get("eval_every", TrainConfig.eval_every))]
    steps = [int(v) for v in value_options(space.train.get("steps", TrainConfig.steps))]
    return min(evals), max(steps)


def make_pruner(space: SearchSpace) -> optuna.pruners.BasePruner:
    min_res, max_res = _budget(space)
    p = space.search.pruner
    if p == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_res, max_resource=max(max_res, min_res),
                                              reduction_factor=3)
    if p == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=min_res)
    if p == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_res)
    return optuna.pruners.NopPruner()


def direction(space: SearchSpace) -> str:
    return "maximize" if space.search.objective == "accuracy" else "minimize"


def open_study(space: SearchSpace, storage: str | None = None, study_name: str | None = None) -> optuna.Study:
    name = study_name or space.search.study_name or space.name
    url = storage or space.search.storage or default_storage(name)
    study = optuna.create_study(study_name=name, storage=make_storage(url), direction=direction(space),
                                sampler=make_sampler(space), pruner=make_pruner(space), load_if_exists=True)
    if "space_yaml" not in study.user_attrs:
        study.set_user_attr("space_yaml", space.text)
        study.set_user_attr("space_file", space.source.file)
        study.set_user_attr("objective", space.search.objective)
        study.set_user_attr("storage", url)
    return study


def load_study(name: str, storage: str | None = None) -> optuna.Study:
    url = storage or default_storage(name)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        raise FileNotFoundError(f"no study storage at {url[len('sqlite:///'):]} (run `hybridnas search` first, "
                                f"or pass --storage)")
    try:
        return optuna.load_study(study_name=name, storage=make_storage(url))
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(make_storage(url))]
        raise FileNotFoundError(f"no study named {name!r} in {url}; studies there: {names}") from None


def trial_dir(study_name: str, number: int) -> Path:
    return Path(RUNS_DIR) / study_name / "trials" / f"{number:05d}"


# ---------------------------------------------------------------------------------------------- objective


class Objective:
    """Callable Optuna objective for one search space. Task data are built once and shared by all trials."""

    def __init__(self, space: SearchSpace, study_name: str, *, quiet: bool = False):
        from hybridnas.tasks import build_task

        self.space = space
        self.study_name = study_name
        self.data = build_task(space.task.name, space.task.build_config())
        self.quiet = quiet

    def _duplicate(self, trial: optuna.Trial, key: str) -> optuna.trial.FrozenTrial | None:
        done = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        for t in done:
            if t.user_attrs.get("config_key") == key and t.number != trial.number:
                return t
        return None

    def __call__(self, trial: optuna.Trial) -> float:
        t0 = time.perf_counter()
        try:
            arch = sample_arch(self.space, trial)
        except InvalidTrialConfig as e:
            trial.set_user_attr("fail_reason", "invalid_config")
            trial.set_user_attr("error", str(e))
            return math.nan
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
            trial.set_user_attr("fail_reason", "invalid_config")
            trial.set_user_attr("error", str(e))
            return math.nan
        trial.set_user_attr("params", n_params)
        dup = self._duplicate(trial, key)
        if dup is not None:
            trial.set_user_attr("duplicate_of", dup.number)
            for k in ("state_bytes", "metrics", "weights"):
                if k in dup.user_attrs:
                    trial.set_user_attr(k, dup.user_attrs[k])
            return float(dup.value)
        return self._train(trial, arch, t0)

    def _train(self, trial: optuna.Trial, arch: ArchConfig, t0: float) -> float:
        from hybridnas.tasks import trainer_for

        train = trainer_for(arch.task.name)

        objective = self.space.search.objective
        out_dir = trial_dir(self.study_name, trial.number)

        def on_eval(step: int, ev: dict[str, float]) -> None:
            value = ev[objective]
            if math.isfinite(value):
                trial.report(value, step)
                if trial.should_prune():
                    trial.set_user_attr("pruned_at_step", step)
                    raise optuna.TrialPruned(f"pruned at step {step} ({objective}={value:.4f})")

        hparams = {"pattern": arch.model.pattern, **{k: v for k, v in trial.params.items() if k != "pattern"}}
        try:
            model = HybridLM(arch.model)
            trial.set_user_attr("state_bytes", model.state_size(1, task_seq_len(arch)))
            result = train(arch, self.data, on_eval=on_eval, model=model,
                           log_dir=str(Path(RUNS_DIR) / self.study_name / "tb" / f"trial-{trial.number:05d}"),
                           hparams=hparams)
        except optuna.TrialPruned:
            raise
        except torch.cuda.OutOfMemoryError as e:
            trial.set_user_attr("fail_reason", "out_of_memory")
            trial.set_user_attr("error", str(e)[:500])
            return math.nan
        except (ValueError, RuntimeError) as e:
            if "out of memory" in str(e).lower():
                trial.set_user_attr("fail_reason", "out_of_memory")
            else:
                trial.set_user_attr("fail_reason", "error")
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:500])
            return math.nan
        metrics = {k: v for k, v in result.metrics.items() if not (isinstance(v, float) and not math.isfinite(v))}
        trial.set_user_attr("metrics", metrics)
        for k, v in result.attrs.items():
            trial.set_user_attr(k, v)
        if result.metrics["stop_reason"] == "nan":
            trial.set_user_attr("fail_reason", "diverged")
            trial.set_user_attr("error", "loss became NaN or infinite")
            return math.nan
        value = result.metrics[objective]
        if self.space.search.save_weights and isinstance(value, float) and math.isfinite(value):
            from hybridnas.export import save_checkpoint

            save_checkpoint(out_dir, arch, result.model)
            trial.set_user_attr("weights", str(out_dir))
        trial.set_user_attr("duration_s", time.perf_counter() - t0)
        return float(value)


# ---------------------------------------------------------------------------------------------- driver


def counts_toward_budget(t: optuna.trial.FrozenTrial) -> bool:
    """Finished trials count toward ``n_trials``: complete, pruned, and failures recorded as data (OOM,
    divergence, invalid config). A trial failed by Ctrl-C or a killed worker has no ``fail_reason`` and does
    not count, so resuming re-runs it instead of losing budget to the interruption."""
    state = t.state
    if state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
        return True
    return state == optuna.trial.TrialState.FAIL and "fail_reason" in t.user_attrs


def finished_count(study: optuna.Study) -> int:
    return sum(counts_toward_budget(t) for t in study.get_trials(deepcopy=False))


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


def _progress_callback(total: int, done: int, quiet: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=min(done, total), desc="trials", unit="trial", disable=quiet, dynamic_ncols=True)

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        bar.update(1)
        best = best_trial(study)
        if best is not None:
            bar.set_postfix(best=f"{best.value:.4f}", best_trial=best.number)
        val = "-" if trial.value is None else f"{trial.value:.4f}"
        reason = trial.user_attrs.get("fail_reason", "")
        dup = trial.user_attrs.get("duplicate_of")
        note = f" (duplicate of #{dup})" if dup is not None else (f" ({reason})" if reason else "")
        bar.write(f"trial {trial.number:3d} {trial.state.name:8s} {val:>8s}  {trial.user_attrs.get('pattern', '?')}"
                  f"  params={trial.user_attrs.get('params', '?')}{note}")

    return bar, callback


def run_search(space: SearchSpace, *, storage: str | None = None, study_name: str | None = None,
               n_trials: int | None = None, timeout: float | None = None, quiet: bool = False) -> optuna.Study:
    """Run (or resume) the study until it holds ``n_trials`` finished trials. Returns the study.

    KeyboardInterrupt propagates after Optuna has marked the running trial FAIL: the study stays consistent
    and re-running the same command resumes it.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(space, storage, study_name)
    stored = study.user_attrs.get("space_yaml")
    if stored is not None and stored != space.text and not quiet:
        print(f"note: {space.source.file} changed since study {study.study_name!r} began; "
              "earlier trials keep the values they were sampled with")
    total = n_trials if n_trials is not None else space.search.n_trials
    done = finished_count(study)
    remaining = total - done
    if remaining <= 0:
        if not quiet:
            print(f"study {study.study_name!r} already has {done} finished trials (target {total}); nothing to run")
        return study
    objective = Objective(space, study.study_name, quiet=quiet)
    bar, callback = _progress_callback(total, done, quiet)
    def cap(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if finished_count(study) >= total:
            study.stop()

    try:
        study.optimize(objective, n_trials=remaining, timeout=timeout or space.search.timeout,
                       callbacks=[callback, cap], gc_after_trial=True)
    finally:
        bar.close()
    return study


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
