"""Post-training hybrid search: start from a trained attention model and find which layers to keep as attention.

``hybridnas distill-search SPACE.yaml`` (README "Post-training hybrid search"):

0. **Teacher** (:func:`load_teacher`): a hybridnas model folder, or a Hugging Face Llama/Mistral/Qwen2 folder
   converted exactly into ``(AF)xL`` blocks (:mod:`hybridnas.hf_teacher`).
1. **Student from the teacher** (:func:`build_student`): the teacher's pattern with every attention position not
   kept replaced by the student symbol. Embeddings, head, every block's norm, FFN/MoE blocks and the kept attention
   layers are copied (``freeze: [ffn, embed]`` stops those from training); a replaced layer is initialised from that
   position's attention where a mapping exists (``init: teacher``), else by its own standard init.
2. **Distillation** (:func:`train_student`): forward KL(teacher || student) at T = 1 on the final logits
   (``kl_weight``, default 1) plus ``ce_weight`` (default 0) times next-token cross-entropy; AdamW, linear warmup then
   constant or cosine; the teacher frozen, in eval mode, under ``no_grad``, its logits computed once per batch.
   :class:`Evaluator`: held-out KL and bits per byte on the ``lm`` task's validation split (its windows and its
   ``bits_per_byte = loss / (ln 2 * bytes_per_token)``), the teacher's log-probabilities computed once.
3. **Scoring by KL-guided restoration** (:func:`score_layers`, arXiv 2512.20569): the all-linear student, and for
   each attention position ``i`` the all-linear student with ``i`` restored from the teacher, each distilled
   ``score_steps``; ``utility_i = KL(all-linear) - KL(restore i)`` on held-out text.
4. **Selection** of ``keep`` positions and/or a budget (:mod:`hybridnas.distill_select`: greedy or scipy ``milp``;
   ``state_bytes`` bounds the whole student's decode state, ``decode_ms`` what the kept attention adds).
5. **Final stage** (:func:`final_stage`): the selected placement, the same k placed evenly and at random, each
   distilled ``final_steps`` per seed; a report; the KL-selected student of the best seed exported.

Every distillation run is one trial of an Optuna study (``key`` user attribute: stage, placement, seed and a hash of
every setting the run depends on, the teacher's files included), so a rerun skips finished runs and never repeats
them; a changed setting makes new runs and leaves the old ones in the study. One process at a time runs a study:
trials left RUNNING by a process of this host that is gone are marked FAIL when the next run starts.

Initialisation of a replaced attention layer (teacher attention: ``qkv = [Q (H·hd), K (G·hd), V (G·hd)]``, ``out``;
H query heads, G kv heads, head size hd; Mamba in the Llama, arXiv 2408.15237, §3.4 of the reference):

=========================  =====================================================  ==============================
student                    copied from the teacher's attention                    needs
=========================  =====================================================  ==============================
``M`` mamba3 / mamba2      x <- V (each kv head repeated over its H/G query       ``expand·d_model = H·hd``
                           heads), out_proj <- O
``M`` mamba3 / mamba2      B <- K of kv head 0, C <- Q of query head 0 (one      ``d_state = hd``
                           group: B and C are shared by all heads; MIMO rank
                           slot r takes query head r and its kv head)
``M`` mamba1               x <- V, out_proj <- O (B, C come from x via x_proj:    ``expand·d_model = H·hd``
                           nothing to map)
every other symbol         nothing (standard init)
=========================  =====================================================  ==============================

Not copied, standard init: the gate z, Δ (dt, dt_bias), A, D, the conv, Mamba-3's B/C norms and biases and rotary
angles (the teacher's RoPE is not carried over), the q/k/v biases. :func:`build_student` returns these notes.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import torch
import torch.nn.functional as F

from hybridnas import distill_select, patterns, registry
from hybridnas.checkpoint import WEIGHTS_FILE, load_weights_into, save_checkpoint
from hybridnas.model import HybridLM
from hybridnas.schema import (  # noqa: F401 (DistillBudget re-exported with StudentSpec)
    ArchConfig,
    DistillBudget,
    DistillSettings,
    DistillSpace,
    ModelConfig,
    StudentSpec,
    TaskSpec,
    TrainConfig,
)
from hybridnas.storage import fail_dead_local_trials, make_storage, record_process, storage_errors
from hybridnas.train import lr_at, make_optimizer, resolve_device
from hybridnas.yamlio import atomic_write_text, write_json

Log = Callable[..., None]
PLACEMENT_NAMES = {"kl": "KL-selected", "even": "evenly spaced", "random": "random"}


# ---------------------------------------------------------------------------------------------- the student


def attention_positions(cfg: ModelConfig) -> list[int]:
    """Block indices of the pattern's attention layers."""
    return distill_select.attention_positions(patterns.layer_symbols(cfg.pattern))


def student_config(teacher_cfg: ModelConfig, keep: list[int], symbol: str,
                   params: dict[str, Any] | None) -> ModelConfig:
    """The teacher's config with every attention position not in ``keep`` replaced by ``symbol`` (``params``; a
    teacher already using that symbol with other parameters is refused):
    :func:`hybridnas.distill_select.student_model_config`, the one that prices the layers too."""
    return distill_select.student_model_config(teacher_cfg, list(keep), symbol, dict(params or {}))


@torch.no_grad()
def map_attention_to_mamba(att: torch.nn.Module, m: torch.nn.Module) -> dict[str, list[str]]:
    """Write the teacher attention ``att``'s projections into Mamba layer ``m`` (module docstring table); return
    what was copied and what was not."""
    cfg = m.config
    h, g, hd = att.n_heads, att.n_kv_heads, att.head_dim
    rep = h // g
    q, k, v = att.qkv.weight.split((h * hd, g * hd, g * hd), dim=0)
    w = m.in_proj.weight
    di, n = m.d_inner, m.d_state
    copied: list[str] = []
    missing: list[str] = []
    x_off = 0 if cfg.variant == "mamba1" else di  # in_proj rows: mamba1 [x, z]; mamba2/3 [z, x, B, C, ...]
    if di == h * hd:
        w[x_off:x_off + di].copy_(v.reshape(g, hd, -1).repeat_interleave(rep, 0).reshape(h * hd, -1))
        m.out_proj.weight.copy_(att.out.weight)
        copied.append("x <- V" + (f" (each kv head repeated over its {rep} query heads)" if rep > 1 else ""))
        copied.append("out_proj <- O")
    else:
        missing.append(f"x <- V, out_proj <- O: d_inner {di} != n_heads*head_dim {h * hd} (make expand*d_model "
                       f"equal {h * hd})")
    if cfg.variant == "mamba1":
        missing.append("B <- K, C <- Q: Mamba-1 computes B and C from x (x_proj), no input projection to map onto")
    elif n == hd:
        rank = m.rank
        b_off, c_off = 2 * di, 2 * di + rank * n
        for r in range(rank):
            qh = r % h
            kh = qh // rep
            w[b_off + r * n:b_off + (r + 1) * n].copy_(k[kh * hd:(kh + 1) * hd])
            w[c_off + r * n:c_off + (r + 1) * n].copy_(q[qh * hd:(qh + 1) * hd])
        copied.append("B <- K of kv head 0" + (f" (rank slot r: the kv head of query head r, {rank} slots)"
                                                if rank > 1 else ""))
        copied.append("C <- Q of query head 0" + (" (rank slot r: query head r)" if rank > 1 else ""))
    else:
        missing.append(f"B <- K, C <- Q: d_state {n} != head_dim {hd} (set d_state to the head size to map them)")
    rest = {"mamba3": "z, dt, A, trapezoid and angle projections, dt_bias, D, B/C norms and biases",
            "mamba2": "z, dt projection, conv, dt_bias, A_log, D, output norm",
            "mamba1": "z, conv, x_proj, dt_proj, A_log, D"}[cfg.variant]
    missing.append(f"{rest}: standard init")
    if att.config.rope:
        missing.append("the teacher's RoPE: not carried over")
    if att.qkv.bias is not None:
        missing.append("the q/k/v biases: in_proj has none")
    return {"copied": copied, "not_copied": missing}


#: primary symbol -> how a replaced attention layer initialises it from the teacher's
INIT_FROM_ATTENTION: dict[str, Callable[[torch.nn.Module, torch.nn.Module], dict[str, list[str]]]] = {
    "M": map_attention_to_mamba,
}


def build_student(teacher: HybridLM, keep: list[int], symbol: str, params: dict[str, Any] | None, *,
                  init: str = "teacher", seed: int = 0, freeze: list[str] | tuple[str, ...] = ()
                  ) -> tuple[HybridLM, dict[str, dict[str, list[str]]]]:
    """The student of ``teacher`` keeping attention at ``keep`` (block indices), on the teacher's device. Returns
    the model and, per replaced symbol, what its initialisation copied and did not copy."""
    cfg = student_config(teacher.cfg, list(keep), symbol, params)
    torch.manual_seed(seed)
    student = HybridLM(cfg)
    prim = registry.primary(symbol)
    t_syms = patterns.to_primary(teacher.cfg.pattern)
    notes: dict[str, dict[str, list[str]]] = {}
    with torch.no_grad():
        student.embed.weight.copy_(teacher.embed.weight)
        if student.lm_head is not None:
            student.lm_head.weight.copy_(teacher.lm_head.weight)
        student.norm_f.load_state_dict(teacher.norm_f.state_dict())
        for i, (sb, tb) in enumerate(zip(student.blocks, teacher.blocks, strict=True)):
            sb.norm.load_state_dict(tb.norm.state_dict())
            if student.symbols[i] == t_syms[i]:
                sb.layer.load_state_dict(tb.layer.state_dict())
                continue
            mapper = INIT_FROM_ATTENTION.get(prim) if init == "teacher" else None
            if mapper is None:
                why = "init: random" if init != "teacher" else f"no mapping from attention to {prim}"
                notes[prim] = {"copied": [], "not_copied": [f"everything ({why}): standard init"]}
            else:
                notes[prim] = mapper(tb.layer, sb.layer)
    student = student.to(teacher.embed.weight.device)
    for name in freeze:
        if name == "embed":
            student.embed.weight.requires_grad_(False)
            if student.lm_head is not None:
                student.lm_head.weight.requires_grad_(False)
        elif name == "ffn":
            for sym, block in zip(student.symbols, student.blocks, strict=True):
                if registry.get(sym).kind == "ffn":
                    block.requires_grad_(False)
        else:
            raise ValueError(f"freeze: unknown part {name!r} (ffn, embed)")
    return student, notes


# ---------------------------------------------------------------------------------------------- distillation


def load_data(params: dict[str, Any]):
    """The ``lm`` task's data (train windows or stream, validation windows, bytes per token) for these settings."""
    from hybridnas.tasks.lm import LMConfig
    from hybridnas.tasks.lm import build as build_lm

    return build_lm(LMConfig(**params))


def _batches(data, batch_size: int, seed: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if data.train_stream is not None:
        for x, y in data.train_stream(batch_size, seed):
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return
    gen = torch.Generator().manual_seed(seed)
    n = data.train_inputs.size(0)
    while True:
        idx = torch.randint(n, (batch_size,), generator=gen)
        yield data.train_inputs[idx].to(device, non_blocking=True), data.train_labels[idx].to(device,
                                                                                             non_blocking=True)


def _kl(t_logp: torch.Tensor, t_p: torch.Tensor, s_logp: torch.Tensor) -> torch.Tensor:
    """Forward KL(teacher || student) per token, summed over the vocabulary: ``(B, T)``."""
    return (t_p * (t_logp - s_logp)).sum(-1)


class Evaluator:
    """Held-out KL(teacher || student) and bits per byte on the first ``eval_tokens`` validation tokens (whole
    windows, at least one). The teacher's log-probabilities are computed once, here."""

    def __init__(self, teacher: HybridLM, data, settings: DistillSettings):
        self.device = teacher.embed.weight.device
        seq_len = data.valid_inputs.size(1)
        n = max(1, min(data.valid_inputs.size(0), settings.eval_tokens // seq_len))
        self.x, self.y = data.valid_inputs[:n], data.valid_labels[:n]
        self.batch = settings.batch_size
        self.bytes_per_token = float(data.bytes_per_token)
        self.tokens = int(self.y.numel())
        self.teacher_logp: list[torch.Tensor] = []
        teacher.eval()
        loss = 0.0
        with torch.no_grad():
            for x, y in self._chunks():
                logp = F.log_softmax(teacher(x).float(), -1)
                self.teacher_logp.append(logp)
                loss += float(F.nll_loss(logp.transpose(1, 2), y, reduction="sum"))
        self.teacher_loss = loss / self.tokens
        self.teacher_bpb = self.bpb(self.teacher_loss)

    def _chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, self.x.size(0), self.batch):
            yield self.x[i:i + self.batch].to(self.device), self.y[i:i + self.batch].to(self.device)

    def bpb(self, loss: float) -> float:
        """``bits_per_byte = loss / (ln 2 * bytes_per_token)``, the ``lm`` task's definition."""
        return loss / (math.log(2) * self.bytes_per_token)

    @torch.no_grad()
    def __call__(self, student: HybridLM) -> dict[str, float]:
        was = student.training
        student.eval()
        kl = loss = 0.0
        for (x, y), t_logp in zip(self._chunks(), self.teacher_logp, strict=True):
            s_logp = F.log_softmax(student(x).float(), -1)
            kl += float(_kl(t_logp, t_logp.exp(), s_logp).sum())
            loss += float(F.nll_loss(s_logp.transpose(1, 2), y, reduction="sum"))
        student.train(was)
        loss /= self.tokens
        return {"kl": kl / self.tokens, "loss": loss, "bits_per_byte": self.bpb(loss)}


class TeacherTargets:
    """The teacher's log-probabilities of one seed's training batches, kept for the next run on the same seed: the
    scoring runs all share the first seed, and the final runs of every placement share theirs, so the teacher runs
    once per batch, not once per run. Up to ``max_bytes`` (the first steps); later steps, a batch that differs from
    the one kept, or another seed are computed afresh."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self.seed: int | None = None
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # (inputs, log-probs) per step
        self.bytes = 0

    @torch.no_grad()
    def __call__(self, teacher: HybridLM, seed: int, step: int, x: torch.Tensor) -> torch.Tensor:
        if seed != self.seed:
            self.seed, self.kept, self.bytes = seed, [], 0
        if step < len(self.kept) and torch.equal(self.kept[step][0], x):
            return self.kept[step][1]
        logp = F.log_softmax(teacher(x).float(), -1)
        size = logp.numel() * logp.element_size() + x.numel() * x.element_size()
        if step == len(self.kept) and self.bytes + size <= self.max_bytes:
            self.kept.append((x, logp))
            self.bytes += size
        return logp


def _lr(step: int, settings: DistillSettings, tc: TrainConfig) -> float:
    if settings.schedule == "cosine":
        return lr_at(step, tc)
    if tc.warmup_steps and step < tc.warmup_steps:
        return settings.lr * (step + 1) / tc.warmup_steps
    return settings.lr


def train_student(student: HybridLM, teacher: HybridLM, data, settings: DistillSettings, *, steps: int, seed: int,
                  evaluator: Evaluator | None = None, targets: TeacherTargets | None = None, label: str = "",
                  log: Log | None = None) -> dict[str, Any]:
    """Distil ``student`` from ``teacher`` for ``steps`` (see the module docstring); return the held-out metrics
    (with ``evaluator``), ``train_loss`` (the last step's), ``steps`` and ``seconds``. A non-finite loss stops the
    run (``stop_reason: nan``). ``targets``: the teacher's log-probabilities kept across runs of the same seed."""
    device = student.embed.weight.device
    torch.manual_seed(seed)
    tc = TrainConfig(steps=steps, lr=settings.lr, weight_decay=settings.weight_decay, beta1=settings.beta1,
                     beta2=settings.beta2, warmup_steps=min(settings.warmup_steps, steps),
                     min_lr_ratio=settings.min_lr_ratio, grad_clip=settings.grad_clip)
    opt = make_optimizer(student, tc)
    params = [p for p in student.parameters() if p.requires_grad]
    teacher.eval()
    student.train()
    batches = _batches(data, settings.batch_size, seed, device)
    kl_w, ce_w = settings.kl_weight, settings.ce_weight
    t0 = time.perf_counter()
    last = torch.zeros((), device=device)
    stop = "steps"
    done = 0
    for step in range(steps):
        lr = _lr(step, settings, tc)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = next(batches)
        with torch.no_grad():
            t_logp = targets(teacher, seed, step, x) if targets is not None else F.log_softmax(teacher(x).float(), -1)
            t_p = t_logp.exp()
        s_logp = F.log_softmax(student(x).float(), -1)
        loss = kl_w * _kl(t_logp, t_p, s_logp).mean()
        if ce_w:
            loss = loss + ce_w * F.nll_loss(s_logp.transpose(1, 2), y)
        aux = student.aux_loss()
        if aux is not None:
            loss = loss + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        last = loss.detach()
        done = step + 1
        if step % 50 == 49 and not torch.isfinite(last):
            stop = "nan"
            break
    seconds = time.perf_counter() - t0
    train_loss = float(last)
    if not math.isfinite(train_loss):
        stop = "nan"
    out: dict[str, Any] = {"train_loss": train_loss, "steps": done, "seconds": seconds, "stop_reason": stop}
    if evaluator is not None:
        out.update(evaluator(student))
    if log is not None:
        shown = " ".join(f"{k} {out[k]:.4f}" for k in ("kl", "bits_per_byte") if k in out)
        log(f"{label}: {done} steps in {seconds:.1f}s, train loss {train_loss:.4f}, held-out {shown}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- the study


def open_study(name: str, storage: str) -> optuna.Study:
    """Create or resume the study that records every distillation run; trials of this host's dead processes left
    RUNNING are marked FAIL (their run starts again)."""
    st = make_storage(storage)
    with storage_errors(storage):
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name=name, storage=st, direction="minimize", load_if_exists=True)
        fail_dead_local_trials(study, retry=False)
    return study


def fingerprint(student: StudentSpec, settings: DistillSettings, steps: int, extra: dict[str, Any] | None) -> str:
    """Hash of everything a distillation run depends on besides its placement and seed (not the device, the
    threads, the teacher cache, keep or the budget)."""
    s = {k: v for k, v in asdict(settings).items()
         if k not in ("score_steps", "final_steps", "seeds", "device", "threads", "teacher_cache_mb")}
    payload = {"symbol": registry.primary(student.symbol), "layers": student.layers, "init": student.init,
               "freeze": sorted(student.freeze), "settings": s, "steps": steps, "extra": extra or {}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _finished(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    return {t.user_attrs["key"]: t for t in study.get_trials(deepcopy=False,
                                                             states=(optuna.trial.TrialState.COMPLETE,))
            if "key" in t.user_attrs and "result" in t.user_attrs}


def run_trial(study: optuna.Study, key: str, attrs: dict[str, Any], fn: Callable[[optuna.Trial], dict[str, Any]]
              ) -> tuple[dict[str, Any], bool]:
    """The result of the run ``key``: from its finished trial, or by running ``fn`` as a new trial (FAIL if it
    raises, the exception passed on). Returns ``(result, ran)``."""
    done = _finished(study).get(key)
    if done is not None:
        return done.user_attrs["result"], False
    with warnings.catch_warnings():  # our storages beat only inside Study.optimize; a run here is one ask and tell
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        trial = study.ask()
    record_process(trial)
    trial.set_user_attr("key", key)
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    try:
        result = fn(trial)
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    trial.set_user_attr("result", result)
    value = result.get("kl", float("nan"))
    if math.isfinite(value):
        study.tell(trial, value)
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise ValueError(f"distillation run {key} diverged (held-out KL {value}); lower distill.lr")
    return result, True


def score_layers(study: optuna.Study, teacher: HybridLM, data, student: StudentSpec, settings: DistillSettings, *,
                 evaluator: Evaluator | None = None, extra: dict[str, Any] | None = None,
                 log: Log = print) -> dict[int, float]:
    """KL-guided restoration: ``{attention position: utility}``, ``utility_i = KL(all-linear) - KL(restore i)``;
    each run a trial (finished ones are not repeated)."""
    evaluator = evaluator or Evaluator(teacher, data, settings)
    fp = fingerprint(student, settings, settings.score_steps, extra)
    seed = settings.seeds[0]
    targets = TeacherTargets(settings.teacher_cache_mb << 20)
    params = _params(student)
    kls: dict[int | None, float] = {}
    for restored in [None, *attention_positions(teacher.cfg)]:
        label = "score all-linear" if restored is None else f"score restore {restored}"
        key = f"score:{'none' if restored is None else restored}:{seed}:{fp}"

        def run(trial, restored=restored, label=label, key=key):
            model, notes = build_student(teacher, [] if restored is None else [restored], student.symbol, params,
                                         init=student.init, seed=seed, freeze=student.freeze)
            out = train_student(model, teacher, data, settings, steps=settings.score_steps, seed=seed,
                                evaluator=evaluator, targets=targets, label=label, log=log)
            return {**out, "init": notes}

        result, ran = run_trial(study, key, {"stage": "score", "restored": restored, "seed": seed}, run)
        if not ran:
            log(f"{label}: done before (held-out kl {result['kl']:.4f})", flush=True)
        kls[restored] = result["kl"]
    return {i: kls[None] - kls[i] for i in kls if i is not None}


def scoring_minutes(study: optuna.Study, student: StudentSpec | None = None, settings: DistillSettings | None = None,
                    extra: dict[str, Any] | None = None) -> float:
    """Wall minutes of the finished scoring runs (their trials' durations): those of these settings when given, else
    every one in the study."""
    suffix = (f":{settings.seeds[0]}:{fingerprint(student, settings, settings.score_steps, extra)}"
              if student is not None and settings is not None else "")
    total = 0.0
    for key, t in _finished(study).items():
        if t.user_attrs.get("stage") == "score" and key.endswith(suffix) and t.datetime_start \
                and t.datetime_complete:
            total += (t.datetime_complete - t.datetime_start).total_seconds()
    return total / 60


# ---------------------------------------------------------------------------------------------- selection


def even_placement(n: int, k: int) -> list[int]:
    """``k`` of ``n`` candidates spread evenly: the middle of each of ``k`` equal segments,
    ``floor((j + 1/2)·n/k)``."""
    return sorted({int((j + 0.5) * n / k) for j in range(k)})


def random_placement(n: int, k: int, seed: int) -> list[int]:
    """``k`` of ``n`` candidates drawn at random (seeded), sorted."""
    return sorted(random.Random(seed).sample(range(n), k))


def _params(student: StudentSpec) -> dict[str, Any]:
    """The student symbol's parameters (``student.layers`` holds only that symbol's, under any of its names)."""
    return dict(student.layers.get(student.symbol) or next(iter(student.layers.values()), None) or {})


def select(utilities: dict[int, float], student: StudentSpec, teacher_cfg: ModelConfig, settings: DistillSettings,
           method: str) -> list[int]:
    """The attention positions to keep: ``keep`` of them and/or within the budget, most utility first."""
    positions = sorted(utilities)
    scores = [utilities[p] for p in positions]
    costs = budget = None
    params = _params(student)
    if student.budget is not None:
        b = student.budget
        seq_len = b.seq_len or settings.seq_len
        metric = "state_bytes" if b.state_bytes is not None else "decode_ms"
        costs = distill_select.layer_costs(teacher_cfg, positions, registry.primary(student.symbol), params, metric,
                                           seq_len)
        if metric == "state_bytes":  # a budget on the whole student's state: what the kept layers may add
            budget = distill_select.kept_budget(b.state_bytes, teacher_cfg, positions,
                                                registry.primary(student.symbol), params, seq_len)
        else:  # decode milliseconds the kept attention may add over the all-student model
            budget = b.decode_ms
    chosen = distill_select.select_layers(scores, student.keep, costs, budget, method)
    return [positions[i] for i in chosen]


# ---------------------------------------------------------------------------------------------- final stage


def placements(selected: list[int], attn: list[int], compare: list[str], seeds: list[int]
               ) -> dict[str, dict[int, list[int]]]:
    """``{name: {seed: positions}}``: the KL-selected positions, and the same k placed evenly and (per seed) at
    random among the attention positions."""
    k = len(selected)
    out = {"kl": {s: list(selected) for s in seeds}}
    if "even" in compare:
        out["even"] = {s: [attn[i] for i in even_placement(len(attn), k)] for s in seeds}
    if "random" in compare:
        out["random"] = {s: [attn[i] for i in random_placement(len(attn), k, s)] for s in seeds}
    return out


def final_stage(study: optuna.Study, teacher: HybridLM, data, student: StudentSpec, settings: DistillSettings,
                plan: dict[str, dict[int, list[int]]], weights_root: str | Path,
                arch_for: Callable[[list[int], int], ArchConfig], *,
                evaluator: Evaluator | None = None, extra: dict[str, Any] | None = None,
                log: Log = print) -> dict[str, dict[int, dict[str, Any]]]:
    """Distil every placement of ``plan`` for ``final_steps`` (one trial each; a placement equal to another's at the
    same seed runs once); each run's weights go to ``weights_root/<key>/``. Returns ``{name: {seed: result}}``."""
    evaluator = evaluator or Evaluator(teacher, data, settings)
    fp = fingerprint(student, settings, settings.final_steps, extra)
    params = _params(student)
    out: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in plan}
    targets = TeacherTargets(settings.teacher_cache_mb << 20)
    seeds = list(dict.fromkeys(seed for by_seed in plan.values() for seed in by_seed))
    for seed, name in ((seed, name) for seed in seeds for name in plan if seed in plan[name]):  # seed by seed
        keep = plan[name][seed]
        key = f"final:{','.join(map(str, keep)) or 'none'}:{seed}:{fp}"
        label = f"final {PLACEMENT_NAMES.get(name, name)} {keep} seed {seed}"
        folder = Path(weights_root) / key.replace(":", "-").replace(",", "_")

        def run(trial, keep=keep, seed=seed, label=label, folder=folder):
            model, _ = build_student(teacher, keep, student.symbol, params, init=student.init, seed=seed,
                                     freeze=student.freeze)
            res = train_student(model, teacher, data, settings, steps=settings.final_steps, seed=seed,
                                evaluator=evaluator, targets=targets, label=label, log=log)
            save_checkpoint(folder, arch_for(keep, seed), model.to("cpu"))
            return {**res, "weights": str(folder)}

        result, ran = run_trial(study, key, {"stage": "final", "placement": name, "keep": keep, "seed": seed},
                                run)
        if not ran:
            log(f"{label}: done before (held-out bpb {result['bits_per_byte']:.4f})", flush=True)
        out[name][seed] = {**result, "keep": keep}
    return out


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def report(space: DistillSpace, evaluator: Evaluator, utilities: dict[int, float], selected: list[int],
           results: dict[str, dict[int, dict[str, Any]]], minutes: float, notes: dict[str, Any]
           ) -> tuple[str, dict[str, Any]]:
    """The comparison as markdown and as JSON."""
    seeds = space.distill.seeds
    js: dict[str, Any] = {
        "name": space.name, "teacher": {"folder": space.teacher, "bits_per_byte": evaluator.teacher_bpb,
                                        "loss": evaluator.teacher_loss},
        "student_symbol": space.student.symbol, "selected": selected, "utilities": {str(k): v for k, v in
                                                                                    utilities.items()},
        "scoring_minutes": minutes, "seeds": seeds, "eval_tokens": evaluator.tokens, "init": notes,
        "placements": {}}
    head = " | ".join(f"bpb seed {s}" for s in seeds)
    lines = [f"# distill-search `{space.name}`", "",
             f"Teacher `{space.teacher}`; attention replaced by `{space.student.symbol}`; held-out bits per byte on "
             f"{evaluator.tokens} validation tokens; {space.distill.final_steps} distillation steps per run.", "",
             f"| placement | attention kept | {head} | mean | spread (std) | held-out KL (mean) |",
             "|---|---|" + "---|" * len(seeds) + "---|---|---|",
             "| teacher | all | " + " | ".join(f"{evaluator.teacher_bpb:.4f}" for _ in seeds)
             + f" | {evaluator.teacher_bpb:.4f} | 0 | 0 |"]
    for name, by_seed in results.items():
        bpb = [by_seed[s]["bits_per_byte"] for s in seeds]
        kl = [by_seed[s]["kl"] for s in seeds]
        keeps = {tuple(by_seed[s]["keep"]) for s in seeds}
        shown = ", ".join(map(str, next(iter(keeps)))) if len(keeps) == 1 else "per seed: " + "; ".join(
            ",".join(map(str, by_seed[s]["keep"])) for s in seeds)
        js["placements"][name] = {"keep": {str(s): by_seed[s]["keep"] for s in seeds}, "bits_per_byte": bpb,
                                  "kl": kl, "mean": statistics.fmean(bpb), "spread": _spread(bpb),
                                  "kl_mean": statistics.fmean(kl)}
        lines.append(f"| {PLACEMENT_NAMES.get(name, name)} | {shown} | " + " | ".join(f"{v:.4f}" for v in bpb)
                     + f" | {statistics.fmean(bpb):.4f} | {_spread(bpb):.4f} | {statistics.fmean(kl):.4f} |")
    lines += ["", f"Selected attention layers (block indices): {', '.join(map(str, selected))}.",
              "Utilities (held-out KL of the all-linear student minus with that layer restored): "
              + ", ".join(f"{k}: {v:.4f}" for k, v in sorted(utilities.items())) + ".",
              f"Scoring cost: {minutes:.2f} minutes ({len(utilities) + 1} runs of {space.distill.score_steps} steps).",
              ""]
    return "\n".join(lines), js


# ---------------------------------------------------------------------------------------------- the command


def teacher_stamp(folder: str | Path) -> list[tuple[str, int, int]]:
    """Name, size and modification time of the teacher folder's weights and configs: a teacher trained again in
    the same folder makes new runs instead of answering from the old ones."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).iterdir()
                  if p.is_file() and p.suffix in (".safetensors", ".json", ".yaml", ".bin"))


def load_teacher(folder: str | Path, *, trust_custom_code: bool = False) -> HybridLM:
    """The teacher as a :class:`HybridLM`: a hybridnas model folder, or a Hugging Face Llama/Mistral/Qwen2 folder
    converted exactly into ``(AF)xL`` blocks (:mod:`hybridnas.hf_teacher`; needs the ``hf`` extra)."""
    from hybridnas.checkpoint import ARCH_FILE, build_model

    if (Path(folder) / ARCH_FILE).is_file():
        return build_model(folder, trust_custom_code=trust_custom_code)
    from hybridnas.hf_teacher import load_hf_teacher

    hf = load_hf_teacher(folder, trust_remote_code=trust_custom_code)
    if hf.hybrid is None:
        raise ValueError(f"{folder}: its weights do not map onto hybridnas blocks ({hf.not_mapped}); distill-search "
                         "copies the teacher's blocks into the student, so it needs a teacher that maps")
    return hf.hybrid


def run_distill_search(space: DistillSpace, out_dir: str | Path, *, storage: str | None = None,
                       trust_custom_code: bool = False, log: Log = print) -> dict[str, Any]:
    """Score, select, distil and compare, export (module docstring); returns the report's JSON."""
    out = Path(out_dir)
    settings = space.distill
    out.mkdir(parents=True, exist_ok=True)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    teacher = load_teacher(space.teacher, trust_custom_code=trust_custom_code).to(device).eval()
    teacher.requires_grad_(False)
    data = load_data(space.data)
    evaluator = Evaluator(teacher, data, settings)
    log(f"teacher {space.teacher}: pattern {teacher.cfg.pattern}, attention at "
        f"{attention_positions(teacher.cfg)}, held-out bpb {evaluator.teacher_bpb:.4f}", flush=True)
    url = storage or f"sqlite:///{out / 'study.db'}"
    study = open_study(space.name, url)
    extra = {"teacher": str(Path(space.teacher).resolve()), "teacher_files": teacher_stamp(space.teacher),
             "data": space.data}
    _, notes = build_student(teacher, [], space.student.symbol, _params(space.student), init=space.student.init)
    for sym, n in notes.items():
        log(f"init of {sym} from attention: copied {'; '.join(n['copied']) or 'nothing'}; not copied "
            f"{'; '.join(n['not_copied'])}", flush=True)
    if space.student.budget is not None:  # a budget no choice fits: said now, not after the scoring
        select({p: 0.0 for p in attention_positions(teacher.cfg)}, space.student, teacher.cfg, settings, space.select)
    utilities = score_layers(study, teacher, data, space.student, settings, evaluator=evaluator, extra=extra, log=log)
    selected = select(utilities, space.student, teacher.cfg, settings, space.select)
    log(f"selected attention layers {selected} (utilities "
        + ", ".join(f"{k}: {v:.4f}" for k, v in sorted(utilities.items())) + ")", flush=True)
    params = _params(space.student)

    def arch_for(keep: list[int], seed: int | None = None) -> ArchConfig:
        cfg = student_config(teacher.cfg, keep, space.student.symbol, params)
        train = TrainConfig(steps=settings.final_steps, batch_size=settings.batch_size, lr=settings.lr,
                            weight_decay=settings.weight_decay, beta1=settings.beta1, beta2=settings.beta2,
                            warmup_steps=settings.warmup_steps, grad_clip=settings.grad_clip,
                            seed=settings.seeds[0] if seed is None else seed)
        return ArchConfig(cfg, TaskSpec("lm", dict(space.data)), train, name=space.name)

    plan = placements(selected, attention_positions(teacher.cfg), space.compare, settings.seeds)
    results = final_stage(study, teacher, data, space.student, settings, plan, out / "runs", arch_for,
                          evaluator=evaluator, extra=extra, log=log)
    minutes = scoring_minutes(study, space.student, settings, extra)
    md, js = report(space, evaluator, utilities, selected, results, minutes, notes)
    best_seed = min(results["kl"], key=lambda s: results["kl"][s]["bits_per_byte"])
    export = _export(out / "export", arch_for(selected, best_seed), results["kl"][best_seed], teacher, data, space,
                     params, evaluator, log)
    js["export"] = {"folder": str(export), "seed": best_seed}
    md += f"Exported: the KL-selected student of seed {best_seed} to `{export}`.\n"
    atomic_write_text(out / "report.md", md)
    write_json(out / "report.json", js)
    log(md, flush=True)
    return js


def _export(folder: Path, arch: ArchConfig, result: dict[str, Any], teacher: HybridLM, data, space: DistillSpace,
            params: dict[str, Any], evaluator: Evaluator, log: Log) -> Path:
    """The KL-selected student as a normal hybridnas export (architecture.yaml, config.json, model.safetensors,
    tokenizer, README.md, distill.json): from its run's weights, or distilled again (its seed is ``arch.train``'s)
    when they are not on this machine."""
    model = HybridLM(arch.model)
    weights = Path(result.get("weights", ""))
    if (weights / WEIGHTS_FILE).exists():
        load_weights_into(model, weights)
        metrics = {k: result[k] for k in ("kl", "loss", "bits_per_byte")}
    else:
        log(f"weights of the KL-selected run not found at {weights}; distilling it again", flush=True)
        seed = arch.train.seed
        model, _ = build_student(teacher, result["keep"], space.student.symbol, params, init=space.student.init,
                                 seed=seed, freeze=space.student.freeze)
        metrics = train_student(model, teacher, data, space.distill, steps=space.distill.final_steps, seed=seed,
                                evaluator=evaluator)
        model = model.to("cpu")
    save_checkpoint(folder, arch, model.eval(), tokenizer=True)
    card = [f"# {space.name}: distilled from `{space.teacher}`", "",
            "Made by `hybridnas distill-search`: the teacher's attention layers replaced by "
            f"`{space.student.symbol}` except at {result['keep']} (chosen by KL-guided restoration), distilled "
            f"{space.distill.final_steps} steps. Rebuild with `hybridnas.build_model('<this folder>')`.", "",
            f"- pattern: `{arch.model.pattern}`", f"- teacher held-out bits per byte: {evaluator.teacher_bpb:.4f}",
            *(f"- held-out {k}: {v:.4f}" for k, v in metrics.items() if k in ("kl", "bits_per_byte")), ""]
    atomic_write_text(folder / "README.md", "\n".join(card))
    write_json(folder / "distill.json", {"teacher": space.teacher, "keep": result["keep"], "seed": arch.train.seed,
                                         "teacher_bits_per_byte": evaluator.teacher_bpb,
                                         **{k: metrics[k] for k in ("kl", "loss", "bits_per_byte")}})
    return folder
