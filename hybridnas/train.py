"""One short training run: a model, a task, a budget -> metrics.

AdamW (no decay on norms and biases), linear warmup then cosine decay, gradient clipping, evaluation every
``eval_every`` steps, early stop at ``target_accuracy``, bf16 autocast on CUDA. Loss and accuracy cover only
labelled positions (labels != -100); accuracy is per example, then averaged (Zoology's definition), unless
the task data name another with ``accuracy_metric`` ("micro": per token, "macro": per class; MAD tasks use
micro and report macro too). Task data may also carry ``bytes_per_token`` (text LM: ``bits_per_byte`` is
reported), ``select_by = "loss"`` (keep the weights of the lowest loss rather than the best accuracy) and
``train_stream(batch_size, seed) -> iterator of (inputs, labels)`` to feed batches from a stream instead of
the in-memory ``train_inputs`` (a corpus larger than memory).

``train.compile`` (``auto``: on CUDA only) runs the training steps through ``torch.compile(model)``; evaluation
stays eager. A compile that fails when first called (or at a recompile) warns once and the run goes on eagerly,
with ``compiled: false`` and ``compile_error`` in its metrics (``hybridnas search`` copies the error to the
trial's ``compile_fallback`` user attr) instead of failing.

The model keeps the weights of its best evaluation (highest accuracy, then lowest loss), so the weights a
search saves or exports are the ones that earned the reported score. A non-finite loss ends the run with
``stop_reason="nan"``; the caller decides what that means for a trial.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import random
import resource
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hybridnas.model import HybridLM
from hybridnas.schema import ArchConfig, TrainConfig
from hybridnas.tasks.base import IGNORE_INDEX, TaskData

EvalCallback = Callable[[int, dict[str, float]], None]
#: ``(step, train_loss, lr)`` after each optimizer step
StepCallback = Callable[[int, float, float], None]


@dataclass
class TrainResult:
    metrics: dict[str, Any]
    model: HybridLM
    history: list[dict[str, float]] = field(default_factory=list)
    #: extra values a task trainer wants recorded on the trial (e.g. per-task scores of a suite)
    attrs: dict[str, Any] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {name!r} but CUDA is not available on this machine")
    return dev


def wants_compile(setting: str | bool, device: torch.device) -> bool:
    """``train.compile``: true or false as given; ``auto`` compiles where that is measured or known to pay within
    the run: on CUDA only. On CPU the quickstart model's step is faster compiled (no graph break since issue 15),
    but its ~50 s compile is repaid only after hundreds of steps, more than a search trial trains (README
    "Compile", ``experiments/compile/``), so ``auto`` never makes a CPU run slower than eager."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for 0-based ``step``: linear warmup, then cosine from lr down to min_lr_ratio * lr."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device``: ``auto`` is bf16 on CUDA (unless ``bf16: false``)
    and none elsewhere, ``fp32`` none, ``bf16`` bf16 on any device."""
    if cfg.precision == "bf16":
        return torch.bfloat16
    if cfg.precision == "auto" and device.type == "cuda" and cfg.bf16:
        return torch.bfloat16
    return None


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def masked_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate(model: HybridLM, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int,
             device: torch.device, autocast: bool, *, metric: str = "example",
             bytes_per_token: float | None = None) -> dict[str, float]:
    """Validation loss (mean over labelled tokens) and accuracy.

    Three accuracies are returned: ``accuracy_example`` (per example, then mean: Zoology), ``accuracy_micro``
    (per labelled token) and ``accuracy_macro`` (per target class present, then mean: MAD's torchmetrics
    default); ``accuracy`` is the one named by ``metric``. With ``bytes_per_token`` (text LM tasks) also
    ``bits_per_byte = loss / (ln 2 * bytes_per_token)``.
    """
    if metric not in ("example", "micro", "macro"):
        raise ValueError(f"metric must be example, micro or macro, got {metric!r}")
    was_training = model.training
    model.eval()
    loss_sum, n_tok, acc_sum, n_ex = 0.0, 0, 0.0, 0
    hit_sum = 0
    class_hits: torch.Tensor | None = None
    class_count: torch.Tensor | None = None
    for i in range(0, inputs.size(0), batch_size):
        x = inputs[i:i + batch_size].to(device)
        y = labels[i:i + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        mask = y != IGNORE_INDEX
        lp = F.cross_entropy(logits.float().transpose(1, 2), y.clamp_min(0), reduction="none")
        loss_sum += float((lp * mask).sum())
        n_tok += int(mask.sum())
        correct = (logits.argmax(-1) == y) & mask
        per_ex = correct.sum(1).float() / mask.sum(1).clamp_min(1)
        has = mask.any(1)
        acc_sum += float(per_ex[has].sum())
        n_ex += int(has.sum())
        hit_sum += int(correct.sum())
        if class_hits is None:
            class_hits = torch.zeros(logits.size(-1), dtype=torch.long, device=device)
            class_count = torch.zeros_like(class_hits)
        cls = y[mask]
        class_count += torch.bincount(cls, minlength=class_hits.numel())[:class_hits.numel()]
        class_hits += torch.bincount(y[correct], minlength=class_hits.numel())[:class_hits.numel()]
    model.train(was_training)
    macro = 0.0
    if class_count is not None and bool((class_count > 0).any()):
        present = class_count > 0
        macro = float((class_hits[present].float() / class_count[present].float()).mean())
    out = {"loss": loss_sum / max(n_tok, 1), "accuracy_example": acc_sum / max(n_ex, 1),
           "accuracy_micro": hit_sum / max(n_tok, 1), "accuracy_macro": macro}
    out["accuracy"] = out[f"accuracy_{metric}"]
    if bytes_per_token:
        out["bits_per_byte"] = out["loss"] / (math.log(2) * bytes_per_token)
    return out


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


#: TensorBoard writers of runs not closed yet (see :func:`closing_writers`): the writers, not the runs, so a run
#: dropped unclosed is still freed with its model
_open_writers: set[Any] = set()


@contextlib.contextmanager
def closing_writers() -> Iterator[None]:
    """Every TensorBoard writer a :class:`TrainRun` opens inside the block is closed on the way out, however the
    block ends: a run that the code holding it never got to close (a ladder whose second rate failed to build while
    its first was already open) would otherwise keep its writer's thread alive for the rest of the process."""
    before = set(_open_writers)
    try:
        yield
    finally:
        for writer in list(_open_writers - before):
            writer.close()
            _open_writers.discard(writer)


class TrainRun:
    """One training run advanced evaluation by evaluation, so a caller can interleave several runs (a learning-rate
    ladder with successive halving) or stop one early. :func:`train` drives a single run to its end.

    ``advance()`` trains up to the next evaluation and returns its metrics (``step``, ``loss``, ``accuracy``, ...,
    ``train_loss`` and ``wall_seconds``: time since the run began, evaluations included), or ``None`` once the
    run has ended (its steps, the target accuracy, ``max_time`` or a non-finite loss). ``finish()`` restores the
    best-evaluated weights, closes the TensorBoard writer and returns the :class:`TrainResult`; ``close()`` only
    releases the writer (a run abandoned part-way). Both are safe to call more than once.
    """

    def __init__(self, arch: ArchConfig, data: TaskData, *, log_dir: str | None = None,
                 hparams: dict[str, Any] | None = None, model: HybridLM | None = None,
                 on_step: StepCallback | None = None, checkpoint_every: int | None = None,
                 on_checkpoint: Callable[[TrainRun], None] | None = None, stop_after: int | None = None,
                 purge_step: int | None = None):
        cfg = self.cfg = arch.train
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = device = resolve_device(cfg.device)
        self.autocast = autocast_dtype(cfg, device) is not None
        self.on_step, self.checkpoint_every, self.on_checkpoint = on_step, checkpoint_every, on_checkpoint
        self.stop_after = stop_after
        torch.manual_seed(cfg.seed)
        if model is None:
            model = HybridLM(arch.model)
        self.model = model
        model.to(device)
        model.train()
        self.compile_error: str | None = None
        self.forward: Callable[[torch.Tensor], torch.Tensor] = model
        if wants_compile(cfg.compile, device):
            try:
                self.forward = torch.compile(model)
            except Exception as e:  # torch.compile refused outright (unsupported platform or Python)
                self._compile_failed(e)
        self.opt = make_optimizer(model, cfg)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.data = data
        # A task may hand batches from a stream (a corpus larger than memory) instead of in-memory tensors.
        self.batches = 0  # batches drawn so far: the stream's position (a checkpoint resumes it)
        self.stream = self._open_stream(0)
        self.n_train = data.train_inputs.size(0) if self.stream is None else 0
        self.metric = data.accuracy_metric
        self.bytes_per_token = data.bytes_per_token
        self.select_by = data.select_by
        self.valid_x, self.valid_y = data.valid_inputs, data.valid_labels
        if cfg.eval_examples is not None:
            self.valid_x, self.valid_y = self.valid_x[:cfg.eval_examples], self.valid_y[:cfg.eval_examples]
        self.hparams = hparams
        self.writer = None
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)
            _open_writers.add(self.writer)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.history: list[dict[str, float]] = []
        self.best: dict[str, float] = {"accuracy": -1.0, "loss": math.inf, "step": 0}
        self.best_state = None
        self.stop_reason = "steps"
        self.train_time, self.tokens = 0.0, 0
        self.order = torch.randperm(self.n_train, generator=self.gen) if self.stream is None else None
        self.cursor = 0
        self.t_start = time.perf_counter()
        self.wall_offset = 0.0  # seconds of the run before it was resumed
        self.step = 0
        self.last_loss = math.nan
        self.done = False
        self.result: TrainResult | None = None

    def _open_stream(self, skip: int):
        """The task's batch stream (None for in-memory data), past its first ``skip`` batches: a stream that takes
        ``skip`` jumps there, any other is drawn from ``skip`` times."""
        make = self.data.train_stream
        if make is None:
            return None
        if skip and "skip" in inspect.signature(make).parameters:
            return make(self.cfg.batch_size, self.cfg.seed, skip=skip)
        stream = make(self.cfg.batch_size, self.cfg.seed)
        for _ in range(skip):
            next(stream)
        return stream

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.batches += 1
        if self.stream is not None:
            x, y = next(self.stream)
            return x.to(self.device), y.to(self.device)
        bs = self.cfg.batch_size
        if self.cursor + bs > self.n_train:
            self.order = torch.randperm(self.n_train, generator=self.gen)
            self.cursor = 0
        idx = self.order[self.cursor:self.cursor + bs]
        self.cursor += bs
        return self.data.train_inputs[idx].to(self.device), self.data.train_labels[idx].to(self.device)

    def advance(self) -> dict[str, float] | None:
        """Train to the next evaluation; its metrics, or None when the run has ended."""
        cfg, model, writer = self.cfg, self.model, self.writer
        while not self.done:
            if self.step >= cfg.steps:
                self.done = True
                break
            self.step += 1
            step = self.step
            t0 = time.perf_counter()
            x, y = self._batch()
            lr = lr_at(step - 1, cfg)
            for g in self.opt.param_groups:
                g["lr"] = lr
            try:
                loss, aux, finite = self._forward_backward(x, y)
            except Exception as e:
                if self.forward is model:  # eager: a real error
                    raise
                self._compile_failed(e)
                loss, aux, finite = self._forward_backward(x, y)
            if not finite:
                self.stop_reason = "nan"
                self.last_loss = loss.item()
                self.done = True
                break
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.opt.step()
            self.train_time += time.perf_counter() - t0
            self.tokens += x.numel()
            self.last_loss = loss.item()
            if writer is not None:
                writer.add_scalar("train/loss", self.last_loss, step)
                writer.add_scalar("train/lr", lr, step)
                if aux is not None:
                    writer.add_scalar("train/aux_loss", aux.item(), step)
            if self.on_step is not None:
                self.on_step(step, self.last_loss, lr)
            ev = None
            if step % cfg.eval_every == 0 or step == cfg.steps:
                ev = self._evaluate(step)
            if self.stop_after is not None and step >= self.stop_after and not self.done:
                self.stop_reason = "stopped"
                self.done = True
            if self.on_checkpoint is not None and (
                    (self.checkpoint_every and step % self.checkpoint_every == 0) or self.stop_reason == "stopped"):
                self.on_checkpoint(self)
            if cfg.max_time is not None and time.perf_counter() - self.t_start > cfg.max_time:
                self.stop_reason = "time"
                self.done = True
            if ev is not None:
                return ev
        return None

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Loss and aux loss of one batch; gradients filled in when the total is finite (the flag returned)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.forward(x)
        loss = masked_loss(logits, y)
        aux = self.model.aux_loss()
        total = loss + aux if aux is not None else loss
        if not torch.isfinite(total):
            return loss, aux, False
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        return loss, aux, True

    def _compile_failed(self, e: BaseException) -> None:
        """torch.compile failed: warn once, train eagerly from here on, keep the reason for the metrics."""
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        self.compile_error = f"{type(e).__name__}: {first}"[:500]
        self.forward = self.model
        warnings.warn(f"torch.compile failed ({self.compile_error}); training eagerly instead", RuntimeWarning,
                      stacklevel=3)

    def _evaluate(self, step: int) -> dict[str, float] | None:
        cfg, writer = self.cfg, self.writer
        ev = evaluate(self.model, self.valid_x, self.valid_y, max(cfg.batch_size, 64), self.device, self.autocast,
                      metric=self.metric, bytes_per_token=self.bytes_per_token)
        ev["step"] = step
        ev["train_loss"] = self.last_loss
        ev["wall_seconds"] = self.wall_offset + time.perf_counter() - self.t_start
        self.history.append(ev)
        if writer is not None:
            writer.add_scalar("valid/loss", ev["loss"], step)
            writer.add_scalar("valid/accuracy", ev["accuracy"], step)
            writer.add_scalar("perf/tokens_per_s", self.tokens / max(self.train_time, 1e-9), step)
        best = self.best
        if self.select_by == "loss":  # language modelling: the best weights are those of the lowest loss
            improved = ev["loss"] < best["loss"]
        else:
            improved = ev["accuracy"] > best["accuracy"] or (ev["accuracy"] == best["accuracy"]
                                                               and ev["loss"] < best["loss"])
        if not math.isfinite(ev["loss"]):
            self.stop_reason = "nan"
            self.done = True
            return None
        if improved:
            self.best = {"accuracy": ev["accuracy"], "loss": ev["loss"], "step": step,
                         **{k: ev[k] for k in ("accuracy_micro", "accuracy_macro", "bits_per_byte") if k in ev}}
            self.best_state = copy.deepcopy(self.model.state_dict())
        if cfg.target_accuracy is not None and ev["accuracy"] >= cfg.target_accuracy:
            self.stop_reason = "target"
            self.done = True
        return ev

    def state_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Everything but the model's weights that a resumed run needs to continue exactly where this one is:
        ``(plain, tensors)``. ``plain`` is JSON (step, best, history, python and numpy RNG states, counters);
        ``tensors`` holds the optimizer state, the torch (and CUDA) RNG states, the data order and position, and
        the best-evaluated weights so far (``best_state``, or None)."""
        py = random.getstate()
        npy = np.random.get_state()
        plain = {
            "step": self.step, "best": self.best, "history": self.history, "stop_reason": self.stop_reason,
            "done": self.done, "last_loss": self.last_loss, "train_time": self.train_time, "tokens": self.tokens,
            "wall_seconds": self.wall_offset + time.perf_counter() - self.t_start,
            "rng": {"python": [py[0], list(py[1]), py[2]],
                    "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])]},
        }
        tensors = {
            "optimizer": self.opt.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "data": {"gen": self.gen.get_state(), "order": self.order, "cursor": self.cursor,
                     "batches": self.batches},
        }
        return plain, {"tensors": tensors, "best_state": self.best_state}

    def load_state_dict(self, plain: dict[str, Any], tensors: dict[str, Any],
                        best_state: dict[str, torch.Tensor] | None = None) -> None:
        """Continue from :meth:`state_dict`'s output (the model's weights are loaded by the caller)."""
        self.step = int(plain["step"])
        self.best = dict(plain["best"])
        self.history = list(plain["history"])
        self.stop_reason = "steps" if plain["stop_reason"] == "stopped" else plain["stop_reason"]
        self.done = bool(plain["done"]) and plain["stop_reason"] != "stopped"
        self.last_loss = float(plain["last_loss"])
        self.train_time, self.tokens = float(plain["train_time"]), int(plain["tokens"])
        self.wall_offset = float(plain["wall_seconds"])
        py, npy = plain["rng"]["python"], plain["rng"]["numpy"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        np.random.set_state((npy[0], np.asarray(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
        self.opt.load_state_dict(tensors["optimizer"])
        torch.set_rng_state(tensors["torch_rng"])
        if self.device.type == "cuda" and tensors["cuda_rng"]:
            torch.cuda.set_rng_state_all(tensors["cuda_rng"])
        data = tensors["data"]
        self.gen.set_state(data["gen"])
        self.order, self.cursor, self.batches = data["order"], int(data["cursor"]), int(data["batches"])
        self.stream = self._open_stream(self.batches)
        self.best_state = None if best_state is None else {k: v.to(self.device) for k, v in best_state.items()}

    def close(self) -> None:
        """Release the TensorBoard writer (a run abandoned before its end: pruned, or a ladder's loser)."""
        self.done = True
        if self.writer is not None:
            self.writer.close()
            _open_writers.discard(self.writer)
            self.writer = None

    def finish(self) -> TrainResult:
        """The run's metrics and its model holding the best-evaluated weights (trains nothing more)."""
        if self.result is not None:
            return self.result
        self.done = True
        model, best = self.model, self.best
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
        metrics: dict[str, Any] = {
            "accuracy": best["accuracy"] if best["accuracy"] >= 0 else math.nan,
            "loss": best["loss"] if math.isfinite(best["loss"]) else math.nan,
            **{k: v for k, v in best.items() if k not in ("accuracy", "loss", "step")},
            "best_step": best["step"],
            "steps": self.step,
            "final_train_loss": self.last_loss,
            "stop_reason": self.stop_reason,
            "tokens_per_s": self.tokens / max(self.train_time, 1e-9),
            "train_seconds": self.train_time,
            "wall_seconds": self.wall_offset + time.perf_counter() - self.t_start,
            "peak_memory_mb": _peak_memory_mb(self.device),
            "params": model.num_params(),
            "device": str(self.device),
            "compiled": self.forward is not model,
        }
        if self.compile_error is not None:
            metrics["compile_error"] = self.compile_error
        if self.writer is not None and self.hparams is not None:
            clean = {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in self.hparams.items()}
            final = {f"hparam/{k}": float(metrics[k]) for k in ("accuracy", "loss", "tokens_per_s", "peak_memory_mb")
                     if isinstance(metrics[k], (int, float)) and math.isfinite(metrics[k])}
            self.writer.add_hparams(clean, final, run_name=".")
        self.close()
        self.result = TrainResult(metrics, model, self.history)
        return self.result


def train(arch: ArchConfig, data: TaskData, *, on_eval: EvalCallback | None = None, log_dir: str | None = None,
          hparams: dict[str, Any] | None = None, model: HybridLM | None = None) -> TrainResult:
    """Train ``arch`` on ``data``; return metrics and the model holding its best-evaluated weights.

    ``on_eval(step, metrics)`` runs after each evaluation (Optuna reporting/pruning: it may raise; the
    TensorBoard writer is closed on every exit path). ``log_dir`` gets TensorBoard scalars, and hparams with the
    final metrics when ``hparams`` is given.
    """
    run = TrainRun(arch, data, log_dir=log_dir, hparams=hparams, model=model)
    try:
        while (ev := run.advance()) is not None:
            if on_eval is not None:
                on_eval(int(ev["step"]), ev)
        return run.finish()
    finally:
        run.close()
