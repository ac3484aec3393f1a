"""MAD as a search objective: the compression AutoEncoder, and training the ``mad`` task (a suite of short runs).

``mad`` scores one architecture on chosen MAD tasks and difficulty settings (which ones:
:class:`hybridnas.tasks.mad_suite.MadSuiteConfig`): one trial trains a fresh model per (task, setting) in turn,
each with that run's vocabulary (the architecture with ``vocab_size`` replaced), and scores the MAD way: the
mean over a task's settings, then the mean over tasks. The trial reports to Optuna a running mean (over the runs
so far, the current one at its best evaluation) at a step that is the run's step plus the planned steps of the
runs before it, so every trial reports at the same steps whatever early stops happened. Per-task and
per-setting values land as trial attributes (``mad/<task>``, ``mad/<task>/<setting>``).

The returned model (the one a search saves) is the last run's network, for compression its encoder, with the
embedding widened to the architecture's ``vocab_size`` (new rows keep their initialization) so the saved
checkpoint rebuilds with ``build_model``; it is a sample of the architecture, not a model of every task.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
from torch import nn

from hybridnas import train as train_mod
from hybridnas.model import HybridLM
from hybridnas.schema import ArchConfig, TaskSpec
from hybridnas.tasks.mad import MadTaskData
from hybridnas.tasks.mad_suite import MadSuiteData
from hybridnas.train import TrainResult

# ---------------------------------------------------------------------------------------------- AutoEncoder


def sincos_positions(seq_len: int, d_model: int, device=None) -> torch.Tensor:
    """``(seq_len, d_model)`` sinusoidal position table (Vaswani et al.)."""
    pos = torch.arange(seq_len, dtype=torch.float32, device=device)[:, None]
    i = torch.arange(0, d_model, 2, dtype=torch.float32, device=device)
    angle = pos / (10000.0 ** (i / d_model))
    out = torch.zeros(seq_len, d_model, device=device)
    out[:, 0::2] = torch.sin(angle)
    out[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return out


class CompressionAutoEncoder(nn.Module):
    """MAD's AutoEncoder for compression: encoder = the architecture (embedding, blocks, final norm), pooled
    at the **last** position; decoder = a fixed 2-layer MLP applied to ``pooled + sincos(position)`` at every
    position, giving logits ``(B, T, V)``. Decoder parameters: ``d*h*d + h*d + h*d*V + V`` (``h`` = hidden_mult).
    """

    def __init__(self, encoder: nn.Module, hidden_mult: int = 2):
        super().__init__()
        self.encoder = encoder
        d, v = encoder.cfg.d_model, encoder.cfg.vocab_size
        self.decoder = nn.Sequential(nn.Linear(d, hidden_mult * d), nn.GELU(), nn.Linear(hidden_mult * d, v))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        ctx: dict = {}
        x = enc.embed(input_ids)
        for block in enc.blocks:
            x = block(x, ctx)
        pooled = enc.norm_f(x)[:, -1]
        pos = sincos_positions(input_ids.size(1), pooled.size(-1), pooled.device).to(pooled.dtype)
        return self.decoder(pooled[:, None, :] + pos[None])

    def aux_loss(self) -> torch.Tensor | None:
        return self.encoder.aux_loss()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def train_task(arch: ArchConfig, data: MadTaskData, *, on_eval=None, log_dir=None, hparams=None,
               model=None) -> TrainResult:
    """Trainer of a single MAD task: plain :func:`hybridnas.train.train`, through the AutoEncoder for
    compression (the result's ``model`` is then the trained encoder, which rebuilds from ``arch``)."""
    if not data.autoencoder:
        return train_mod.train(arch, data, on_eval=on_eval, log_dir=log_dir, hparams=hparams, model=model)
    torch.manual_seed(arch.train.seed)
    encoder = model if model is not None else HybridLM(arch.model)
    result = train_mod.train(arch, data, on_eval=on_eval, log_dir=log_dir, hparams=hparams,
                   model=CompressionAutoEncoder(encoder))
    result.model = encoder
    return result


# ---------------------------------------------------------------------------------------------- the suite


def _widen(model: nn.Module, cfg) -> nn.Module:
    """A HybridLM of ``cfg`` holding ``model``'s weights; embedding (and untied head) rows beyond ``model``'s
    vocabulary keep their initialization."""
    if cfg.vocab_size <= model.cfg.vocab_size:
        return model
    wide = HybridLM(cfg)
    state = wide.state_dict()
    for key, value in model.state_dict().items():
        if key in ("embed.weight", "lm_head.weight"):
            state[key][: value.size(0)] = value
        else:
            state[key] = value
    wide.load_state_dict(state)
    return wide


def _mean(values: list[float]) -> float:
    finite = [v for v in values if isinstance(v, float | int) and math.isfinite(v)]
    return sum(finite) / len(finite) if len(finite) == len(values) and values else math.nan


def train_suite(arch: ArchConfig, data: MadSuiteData, *, on_eval=None, log_dir: str | None = None,
                hparams: dict[str, Any] | None = None, model=None) -> TrainResult:
    """Train ``arch`` on every run of ``data`` in turn; see the module docstring. ``model`` is ignored (each
    run builds its own with the run's vocabulary). A diverged run ends the trial with ``stop_reason='nan'``."""
    t0 = time.perf_counter()
    done: list[dict[str, Any]] = []
    offset, last_reported = 0, 0
    history: list[dict[str, float]] = []
    net = None
    stop_reason = "steps"
    for k, run in enumerate(data.runs):
        train_cfg = dataclasses.replace(arch.train, **run.train)
        run_arch = ArchConfig(dataclasses.replace(arch.model, vocab_size=run.data.vocab_size),
                              TaskSpec(f"mad_{run.task}", dataclasses.asdict(run.config)), train_cfg,
                              dict(arch.symbols), f"{arch.name}/{run.task}/{run.label}")
        torch.manual_seed(train_cfg.seed + k)
        net = HybridLM(run_arch.model)
        runner = CompressionAutoEncoder(net) if run.data.autoencoder else net
        best = {"accuracy": -1.0, "loss": math.inf}

        def report(step: int, ev: dict[str, float], run_offset: int = offset, best: dict = best,
                   run_idx: int = k) -> None:
            nonlocal last_reported
            if ev["accuracy"] > best["accuracy"] or (ev["accuracy"] == best["accuracy"] and ev["loss"] < best["loss"]):
                best.update(accuracy=ev["accuracy"], loss=ev["loss"])
            acc = _mean([r["accuracy"] for r in done] + [best["accuracy"]])
            loss = _mean([r["loss"] for r in done] + [best["loss"]])
            g = run_offset + step
            entry = {"accuracy": acc, "loss": loss, "train_loss": ev.get("train_loss", math.nan), "step": g,
                     "run": run_idx}
            history.append(entry)
            last_reported = g
            if on_eval is not None:
                on_eval(g, entry)

        sub_log = None if log_dir is None else f"{log_dir}/{k:02d}_{run.task}_{run.label}"
        res = train_mod.train(run_arch, run.data, on_eval=report, log_dir=sub_log, model=runner)
        m = res.metrics
        done.append({"task": run.task, "label": run.label, "accuracy": m["accuracy"], "loss": m["loss"],
                     "accuracy_macro": m.get("accuracy_macro", math.nan), "steps": m["steps"],
                     "train_seconds": m["train_seconds"], "tokens": m["tokens_per_s"] * m["train_seconds"],
                     "peak_memory_mb": m["peak_memory_mb"], "final_train_loss": m["final_train_loss"]})
        if m["stop_reason"] == "nan":
            stop_reason = "nan"
            break
        offset += train_cfg.steps
        if offset > last_reported and on_eval is not None:  # the run stopped early: report at its planned end
            acc, loss = _mean([r["accuracy"] for r in done]), _mean([r["loss"] for r in done])
            last_reported = offset
            on_eval(offset, {"accuracy": acc, "loss": loss, "train_loss": m["final_train_loss"], "step": offset})

    attrs: dict[str, Any] = {}
    per_task: dict[str, list[dict[str, Any]]] = {}
    for r in done:
        per_task.setdefault(r["task"], []).append(r)
        attrs[f"mad/{r['task']}/{r['label']}"] = r["accuracy"]
    for task, rs in per_task.items():
        attrs[f"mad/{task}"] = _mean([r["accuracy"] for r in rs])
    score = {key: _mean([_mean([r[key] for r in rs]) for rs in per_task.values()])
             for key in ("accuracy", "loss", "accuracy_macro")}
    if stop_reason == "nan" or len(done) < len(data.runs):
        score = {key: math.nan for key in score}
    train_s = sum(r["train_seconds"] for r in done)
    metrics: dict[str, Any] = {
        **score,
        "micro_accuracy_runs": _mean([r["accuracy"] for r in done]),
        "runs": len(done),
        "steps": sum(r["steps"] for r in done),
        "best_step": sum(r["steps"] for r in done),
        "final_train_loss": done[-1]["final_train_loss"] if done else math.nan,
        "stop_reason": stop_reason,
        "tokens_per_s": sum(r["tokens"] for r in done) / max(train_s, 1e-9),
        "train_seconds": train_s,
        "wall_seconds": time.perf_counter() - t0,
        "peak_memory_mb": max((r["peak_memory_mb"] for r in done), default=0.0),
        "params": HybridLM.param_count(arch.model),
        "device": arch.train.device,
        **attrs,
    }
    if log_dir is not None and hparams is not None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=log_dir) as writer:
            clean = {k: (v if isinstance(v, bool | int | float | str) else str(v)) for k, v in hparams.items()}
            final = {f"hparam/{k}": float(v) for k, v in score.items() if math.isfinite(v)}
            writer.add_hparams(clean, final, run_name=".")
    out = _widen(net, arch.model) if net is not None else HybridLM(arch.model)
    return TrainResult(metrics, out, history, attrs)
