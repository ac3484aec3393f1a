"""One short training run: a model, a task, a budget -> metrics.

AdamW (no decay on norms and biases), linear warmup then cosine decay, gradient clipping, evaluation every
``eval_every`` steps, early stop at ``target_accuracy``, bf16 autocast on CUDA. Loss and accuracy cover only
labelled positions (labels != -100); accuracy is per example, then averaged (Zoology's definition), unless
the task data name another with ``accuracy_metric`` ("micro": per token, "macro": per class; MAD tasks use
micro and report macro too). Task data may also carry ``bytes_per_token`` (text LM: ``bits_per_byte`` is
reported), ``select_by = "loss"`` (keep the weights of the lowest loss rather than the best accuracy) and
``train_stream(batch_size, seed) -> iterator of (inputs, labels)`` to feed batches from a stream instead of
the in-memory ``train_inputs`` (a corpus larger than memory).

The model keeps the weights of its best evaluation (highest accuracy, then lowest loss), so the weights a
search saves or exports are the ones that earned the reported score. A non-finite loss ends the run with
``stop_reason="nan"``; the caller decides what that means for a trial.
"""

from __future__ import annotations

import copy
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from hybridnas.model import HybridLM
from hybridnas.schema import ArchConfig, TrainConfig
from hybridnas.tasks.base import IGNORE_INDEX, TaskData

EvalCallback = Callable[[int, dict[str, float]], None]


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for 0-based ``step``: linear warmup, then cosine from lr down to min_lr_ratio * lr."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


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


def train(arch: ArchConfig, data: TaskData, *, on_eval: EvalCallback | None = None, log_dir: str | None = None,
          hparams: dict[str, Any] | None = None, model: HybridLM | None = None) -> TrainResult:
    """Train ``arch`` on ``data``; return metrics and the model holding its best-evaluated weights.

    ``on_eval(step, metrics)`` runs after each evaluation (Optuna reporting/pruning: it may raise).
    ``log_dir`` gets TensorBoard scalars, and hparams with the final metrics when ``hparams`` is given.
    """
    cfg = arch.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    autocast = device.type == "cuda" and cfg.bf16
    torch.manual_seed(cfg.seed)
    if model is None:
        model = HybridLM(arch.model)
    model.to(device)
    model.train()
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    # A task may hand batches from a stream (a corpus larger than memory) instead of in-memory tensors.
    stream = data.train_stream(cfg.batch_size, cfg.seed) if data.train_stream is not None else None
    n_train = data.train_inputs.size(0) if stream is None else 0
    metric = data.accuracy_metric
    bytes_per_token = data.bytes_per_token
    select_by = data.select_by
    valid_x, valid_y = data.valid_inputs, data.valid_labels
    if cfg.eval_examples is not None:
        valid_x, valid_y = valid_x[:cfg.eval_examples], valid_y[:cfg.eval_examples]
    writer = None
    if log_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=log_dir)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    history: list[dict[str, float]] = []
    best: dict[str, float] = {"accuracy": -1.0, "loss": math.inf, "step": 0}
    best_state = None
    stop_reason = "steps"
    train_time, tokens = 0.0, 0
    order = torch.randperm(n_train, generator=gen) if stream is None else None
    cursor = 0
    t_start = time.perf_counter()
    step = 0
    last_loss = math.nan
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        if stream is not None:
            x, y = next(stream)
            x, y = x.to(device), y.to(device)
        else:
            if cursor + cfg.batch_size > n_train:
                order = torch.randperm(n_train, generator=gen)
                cursor = 0
            idx = order[cursor:cursor + cfg.batch_size]
            cursor += cfg.batch_size
            x = data.train_inputs[idx].to(device)
            y = data.train_labels[idx].to(device)
        lr = lr_at(step - 1, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(x)
        loss = masked_loss(logits, y)
        aux = model.aux_loss()
        total = loss + aux if aux is not None else loss
        if not torch.isfinite(total):
            stop_reason = "nan"
            last_loss = loss.item()
            break
        opt.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        train_time += time.perf_counter() - t0
        tokens += x.numel()
        last_loss = loss.item()
        if writer is not None:
            writer.add_scalar("train/loss", last_loss, step)
            writer.add_scalar("train/lr", lr, step)
            if aux is not None:
                writer.add_scalar("train/aux_loss", aux.item(), step)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            ev = evaluate(model, valid_x, valid_y, max(cfg.batch_size, 64), device, autocast, metric=metric,
                          bytes_per_token=bytes_per_token)
            ev["step"] = step
            ev["train_loss"] = last_loss
            history.append(ev)
            if writer is not None:
                writer.add_scalar("valid/loss", ev["loss"], step)
                writer.add_scalar("valid/accuracy", ev["accuracy"], step)
                writer.add_scalar("perf/tokens_per_s", tokens / max(train_time, 1e-9), step)
            if select_by == "loss":  # language modelling: the best weights are those of the lowest loss
                improved = ev["loss"] < best["loss"]
            else:
                improved = ev["accuracy"] > best["accuracy"] or (ev["accuracy"] == best["accuracy"]
                                                                   and ev["loss"] < best["loss"])
            if not math.isfinite(ev["loss"]):
                stop_reason = "nan"
                break
            if improved:
                best = {"accuracy": ev["accuracy"], "loss": ev["loss"], "step": step,
                        **{k: ev[k] for k in ("accuracy_micro", "accuracy_macro", "bits_per_byte") if k in ev}}
                best_state = copy.deepcopy(model.state_dict())
            if on_eval is not None:
                on_eval(step, ev)
            if cfg.target_accuracy is not None and ev["accuracy"] >= cfg.target_accuracy:
                stop_reason = "target"
                break
        if cfg.max_time is not None and time.perf_counter() - t_start > cfg.max_time:
            stop_reason = "time"
            break

    if best_state is not None:
        model.load_state_dict(best_state)
    metrics: dict[str, Any] = {
        "accuracy": best["accuracy"] if best["accuracy"] >= 0 else math.nan,
        "loss": best["loss"] if math.isfinite(best["loss"]) else math.nan,
        **{k: v for k, v in best.items() if k not in ("accuracy", "loss", "step")},
        "best_step": best["step"],
        "steps": step,
        "final_train_loss": last_loss,
        "stop_reason": stop_reason,
        "tokens_per_s": tokens / max(train_time, 1e-9),
        "train_seconds": train_time,
        "wall_seconds": time.perf_counter() - t_start,
        "peak_memory_mb": _peak_memory_mb(device),
        "params": model.num_params(),
        "device": str(device),
    }
    if writer is not None:
        if hparams is not None:
            clean = {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in hparams.items()}
            final = {f"hparam/{k}": float(metrics[k]) for k in ("accuracy", "loss", "tokens_per_s", "peak_memory_mb")
                     if isinstance(metrics[k], (int, float)) and math.isfinite(metrics[k])}
            writer.add_hparams(clean, final, run_name=".")
        writer.close()
    return TrainResult(metrics, model, history)
