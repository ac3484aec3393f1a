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
trained. One objective keeps pruning; several objectives give a Pareto front and no pruning.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.exceptions import ExperimentalWarning

from hybridnas import patterns
from hybridnas.ladder import ladder_from, run_ladder, rung_step
from hybridnas.model import HybridLM
from hybridnas.schema import (
    CONSTRAINTS,
    ArchConfig,
    ModelConfig,
    Range,
    SearchSpace,
    TrainConfig,
    arch_key,
    value_options,
)
from hybridnas.storage import RUNS_DIR, default_storage, load_study, make_storage  # noqa: F401 (re-exported)
from hybridnas.validation import check_train

warnings.filterwarnings("ignore", category=ExperimentalWarning, module="optuna")


class InvalidTrialConfig(ValueError):
    """A sampled configuration that cannot be built; recorded on the trial, the search goes on."""


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


def sample_arch(space: SearchSpace, trial: optuna.Trial) -> ArchConfig:
    """Ask ``trial`` for every searchable value of ``space``; return the concrete architecture."""
    from hybridnas.pattern_space import RepairError, sample_pattern

    m = space.model
    pspace = m.get("pattern", ModelConfig.pattern)
    if hasattr(pspace, "used_symbols"):
        try:
            pattern, notes = sample_pattern(pspace, trial, suggest)
        except RepairError as e:
            raise InvalidTrialConfig(f"sampled genome cannot meet the count bounds: {e}") from None
        for k, v in notes.items():
            trial.set_user_attr(k, v)
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
    """Architecture key plus the training settings that change the result (not device or threads)."""
    train = {k: v for k, v in asdict(arch.train).items() if k not in ("device", "threads")}
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


def ladder_trainer(space: SearchSpace, base: Callable[..., Any], make_run: Callable[..., Any] | None = None):
    """A trainer with ``base``'s signature that applies ``search.lr_mode`` (ladder or halving) inside the trial.

    ``make_run(arch, data, log_dir)`` makes one run advanced evaluation by evaluation (default: a real
    :class:`hybridnas.train.TrainRun`); a task whose trainer is not the plain one (a suite) trains each rate to the
    end one after the other, with no intermediate reports, and keeps the best. The result carries the winning rate
    in ``attrs`` (``lr``, ``lr_rungs``)."""
    from hybridnas import train as train_mod

    s = space.search
    lrs = ladder_from(space.train.get("lr", TrainConfig.lr), s.lr_ladder)
    objective = space.objective_names()[0]
    sign = 1.0 if space.directions()[0] == "maximize" else -1.0

    def score(result: Any) -> float:
        return sign * float(result.metrics.get(objective, math.nan))

    def trainer(arch: ArchConfig, data: Any, *, on_eval=None, log_dir=None, hparams=None, model=None):
        def with_lr(lr: float) -> ArchConfig:
            return replace(arch, train=replace(arch.train, lr=lr))

        plain = make_run is not None or base is train_mod.train
        if not plain or len(lrs) == 1:
            results = {lr: base(with_lr(lr), data, on_eval=on_eval if len(lrs) == 1 else None,
                                log_dir=None if log_dir is None else f"{log_dir}/lr-{lr:g}", hparams=hparams)
                       for lr in lrs}
            lr = max(lrs, key=lambda v: (results[v].metrics["stop_reason"] != "nan", _finite(score(results[v]))))
            out = results[lr]
            out.attrs.update({"lr": lr, "lr_scores": {f"{v:g}": results[v].metrics.get(objective) for v in lrs}})
            return out

        def run_for(lr: float):
            logs = None if log_dir is None else f"{log_dir}/lr-{lr:g}"
            if make_run is not None:
                return make_run(with_lr(lr), data, logs)
            return train_mod.TrainRun(with_lr(lr), data, log_dir=logs, hparams=hparams)

        outcome = run_ladder(run_for, lrs, mode=s.lr_mode, rung=rung_step(arch.train, s.lr_rung),
                             target=arch.train.target_accuracy, on_eval=on_eval, score=score)
        result = outcome.result
        result.attrs.update({"lr": outcome.lr, "lr_rungs": {f"{lr:g}": {k: ev[k] for k in ("step", "loss", "accuracy")}
                                                            for lr, ev in outcome.rungs.items()}})
        return result

    return trainer


def _finite(v: float) -> float:
    return v if math.isfinite(v) else -math.inf


def resolve_storage(space: SearchSpace, storage: str | None, study_name: str | None, workers: int = 1) -> str:
    name = study_name or space.search.study_name or space.name
    return storage or space.search.storage or default_storage(name, workers)


def open_study(space: SearchSpace, storage: str | None = None, study_name: str | None = None, *,
               workers: int = 1, seed_offset: int = 0) -> optuna.Study:
    name = study_name or space.search.study_name or space.name
    url = resolve_storage(space, storage, study_name, workers)
    st = make_storage(url, space.search.heartbeat_interval, space.search.grace_period)
    study = optuna.create_study(study_name=name, storage=st, directions=space.directions(),
                                sampler=make_sampler(space, seed_offset), pruner=make_pruner(space),
                                load_if_exists=True)
    if "space_yaml" not in study.user_attrs:
        study.set_user_attr("space_yaml", space.text)
        study.set_user_attr("space_file", space.source.file)
        study.set_user_attr("objective", space.objective_names()[0])
        study.set_user_attr("objectives", space.objective_names())
        study.set_user_attr("storage", url)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            study.set_metric_names(space.objective_names())
    return study


def trial_dir(study_name: str, number: int) -> Path:
    return Path(RUNS_DIR) / study_name / "trials" / f"{number:05d}"


# ---------------------------------------------------------------------------------------------- budget count


def counts_toward_budget(t: optuna.trial.FrozenTrial) -> bool:
    """Finished trials count toward ``n_trials``: complete, pruned (also infeasible), and failures recorded
    as data (OOM, divergence, invalid config). A trial failed by Ctrl-C or a killed worker has no
    ``fail_reason`` and does not count, so it is re-run instead of losing budget to the interruption; a trial
    started past the cap by a racing worker (``over_cap``) never counts."""
    if "over_cap" in t.user_attrs:
        return False
    if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
        return True
    return t.state == optuna.trial.TrialState.FAIL and "fail_reason" in t.user_attrs


def finished_count(study: optuna.Study) -> int:
    return sum(counts_toward_budget(t) for t in study.get_trials(deepcopy=False))


def _holds_a_ticket(t: optuna.trial.FrozenTrial) -> bool:
    live = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
    return counts_toward_budget(t) or (t.state in live and "over_cap" not in t.user_attrs)


def over_cap(study: optuna.Study, trial_number: int, total: int) -> bool:
    """True when ``total`` earlier trials already count or run: this one must not train.

    Trial numbers are assigned by the storage in creation order, so every worker ranks the same way and at
    most ``total`` trials ever train, however many workers race for the last slots."""
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
                 data: Any = None):
        """``trainer`` (train's signature) and ``make_run`` (a run advanced evaluation by evaluation, for the lr
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
        self.names = space.objective_names()

    def _duplicate(self, trial: optuna.Trial, key: str) -> optuna.trial.FrozenTrial | None:
        done = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        for t in done:
            if t.user_attrs.get("config_key") == key and t.number != trial.number:
                return t
        return None

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
        try:
            arch = sample_arch(self.space, trial)
        except InvalidTrialConfig as e:
            return self._fail(trial, "invalid_config", str(e))
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

    def _train(self, trial: optuna.Trial, arch: ArchConfig, n_params: int, t0: float) -> float | list[float]:
        from hybridnas.trainers import trainer_for

        train = self.trainer or trainer_for(arch.task.name)
        if self.space.search.lr_mode != "sample":
            train = ladder_trainer(self.space, train, self.make_run)
        primary = self.names[0]
        multi = len(self.names) > 1
        out_dir = trial_dir(self.study_name, trial.number)

        def on_eval(step: int, ev: dict[str, float]) -> None:
            value = ev[primary]
            if not multi and math.isfinite(value):
                trial.report(value, step)
                if trial.should_prune():
                    trial.set_user_attr("pruned_at_step", step)
                    raise optuna.TrialPruned(f"pruned at step {step} ({primary}={value:.4f})")

        hparams = {"pattern": arch.model.pattern, **{k: v for k, v in trial.params.items() if k != "pattern"}}
        try:
            torch.manual_seed(arch.train.seed)  # the initial weights follow the trial's seed, not the process
            model = HybridLM(arch.model)
            measured = self._budgets(trial, arch, model, n_params)
            violations = []
            for name, bound in self.space.search.constraints.items():
                value = measured[name] - bound if CONSTRAINTS[name] == "max" else bound - measured[name]
                trial.set_constraint(name, float(value))
                if value > 0:
                    violations.append(f"{name}={measured[name]:.4g} vs {CONSTRAINTS[name]} {bound:.4g}")
            if violations:
                trial.set_user_attr("infeasible", "; ".join(violations))
                raise optuna.TrialPruned("infeasible before training: " + "; ".join(violations))
            result = train(arch, self.data, on_eval=on_eval, model=model,
                           log_dir=str(Path(RUNS_DIR) / self.study_name / "tb" / f"trial-{trial.number:05d}"),
                           hparams=hparams)
        except optuna.TrialPruned:
            raise
        except torch.cuda.OutOfMemoryError as e:
            return self._fail(trial, "out_of_memory", str(e))
        except (ValueError, RuntimeError) as e:
            reason = "out_of_memory" if "out of memory" in str(e).lower() else "error"
            return self._fail(trial, reason, f"{type(e).__name__}: {e}")
        metrics = {k: v for k, v in result.metrics.items() if not (isinstance(v, float) and not math.isfinite(v))}
        trial.set_user_attr("metrics", metrics)
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


def _progress_callback(total: int, done: int, quiet: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=min(done, total), desc="trials", unit="trial", disable=quiet, dynamic_ncols=True)

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if "over_cap" in trial.user_attrs:
            return
        bar.update(1)
        best = best_trial(study)
        if best is not None:
            bar.set_postfix(best=f"{best.value:.4f}", best_trial=best.number)
        val = "-" if trial.values is None else "/".join(f"{v:.4g}" for v in trial.values)
        reason = trial.user_attrs.get("fail_reason") or trial.user_attrs.get("infeasible", "")
        dup = trial.user_attrs.get("duplicate_of")
        note = f" (duplicate of #{dup})" if dup is not None else (f" ({reason})" if reason else "")
        if quiet:
            return
        bar.write(f"trial {trial.number:3d} {trial.state.name:8s} {val:>8s}  {trial.user_attrs.get('pattern', '?')}"
                  f"  params={trial.user_attrs.get('params', '?')}{note}")

    return bar, callback


def run_search(space: SearchSpace, *, storage: str | None = None, study_name: str | None = None,
               n_trials: int | None = None, timeout: float | None = None, quiet: bool = False,
               workers: int = 1, seed_offset: int = 0, objective_kwargs: dict[str, Any] | None = None,
               gc_after_trial: bool = True) -> optuna.Study:
    """Run (or resume) the study until it holds ``n_trials`` finished trials. Returns the study.

    ``objective_kwargs`` go to :class:`Objective` (``trainer``, ``make_run``, ``data``: a replay answers trials
    from a table through them; the rest of the loop is the search's own).

    ``workers`` only picks the default storage (a journal file when several processes share the study);
    :func:`hybridnas.workers.run_workers` starts the processes. KeyboardInterrupt propagates after Optuna has
    marked the running trial FAIL: the study stays consistent and re-running the same command resumes it.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(space, storage, study_name, workers=workers, seed_offset=seed_offset)
    stored = study.user_attrs.get("space_yaml")
    if stored is not None and stored != space.text and not quiet:
        print(f"note: {space.source.file} changed since study {study.study_name!r} began; "
              "earlier trials keep the values they were sampled with")
    total = n_trials if n_trials is not None else space.search.n_trials
    done = finished_count(study)
    if total - done <= 0:
        if not quiet:
            print(f"study {study.study_name!r} already has {done} finished trials (target {total}); nothing to run")
        return study
    objective = Objective(space, study.study_name, total=total, quiet=quiet, **(objective_kwargs or {}))
    bar, callback = _progress_callback(total, done, quiet)

    def cap(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if finished_count(study) >= total:
            study.stop()

    try:
        # n_trials is an upper bound only: `cap` stops the loop once the study (all workers) holds `total`
        study.optimize(objective, n_trials=total * 4, timeout=timeout or space.search.timeout,
                       callbacks=[callback, cap], gc_after_trial=gc_after_trial)
    finally:
        bar.close()
    return study
