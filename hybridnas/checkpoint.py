"""Save and load a model folder: the weights plus everything needed to rebuild the model exactly.

Folder layout (Hugging Face style)::

    architecture.yaml        complete config: task, model (every layer parameter resolved), train
    config.json              model_type "hybridnas", the pattern, sizes and per-symbol layer configs
    model.safetensors        weights (tied head stored once)

Search trials, confirmation runs and ``hybridnas train --out`` write this folder; ``export`` adds a model card
and plots beside it. Loading never unpickles (``yaml.safe_load`` and safetensors only) and never imports a
module named in the folder (a custom layer's import path under ``symbols``) unless the caller passes
``trust_custom_code=True``. Every file is written through a temp file and a rename, so an interrupted save
never leaves a half-written file.

Training checkpoints (``hybridnas train --out DIR --checkpoint-every N``) live under ``DIR/checkpoints/step-NNNNNNNN/``:
the model folder above plus ``optimizer.pt`` (optimizer state, torch/CUDA RNG states, data order and position;
read back with ``torch.load(weights_only=True)``), ``best.safetensors`` (the best-evaluated weights so far) and
``trainer_state.json`` (step, best, history, python and numpy RNG states). Each is written in a temp folder that
is renamed into place when complete, so a run killed while saving leaves the previous checkpoint as the latest.
``DIR/train_log.jsonl`` has one line per step (``step``, ``train_loss``, ``lr``) and per evaluation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from hybridnas import __version__, patterns, registry
from hybridnas.config import UntrustedCodeError, load_arch  # noqa: F401 (UntrustedCodeError is re-exported)
from hybridnas.model import HybridLM
from hybridnas.schema import ArchConfig, resolved_layers
from hybridnas.yamlio import atomic_write_bytes, atomic_write_text, dump_yaml, write_json

ARCH_FILE = "architecture.yaml"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train_log.jsonl"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
BEST_FILE = "best.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def complete_arch(arch: ArchConfig) -> ArchConfig:
    """The same architecture with every layer parameter written out (defaults resolved)."""
    model = arch.model
    full = type(model)(**{**asdict(model), "layers": resolved_layers(model)})
    return ArchConfig(full, arch.task, arch.train, dict(arch.symbols), arch.name)


def layer_type(symbol: str, params: dict[str, Any] | None = None) -> str:
    """The transformers name of one block's kind (``config.json`` ``layer_types``): attention ->
    ``full_attention`` (``sliding_attention`` with a window), a fixed-size recurrent state (M, R) ->
    ``linear_attention``, Hyena's long convolution -> ``conv``, dense MLP -> ``mlp``, MoE -> ``moe`` (the names
    Nemotron-H uses). A custom layer is classed by its contract: an FFN -> ``mlp``, a growing state ->
    ``full_attention``, else ``linear_attention``."""
    spec = registry.get(symbol)
    prim = spec.symbol
    if prim == "A":
        return "sliding_attention" if (params or {}).get("window") is not None else "full_attention"
    fixed = {"M": "linear_attention", "R": "linear_attention", "H": "conv", "F": "mlp", "E": "moe"}
    if prim in fixed and spec.source.startswith("layers."):
        return fixed[prim]
    if spec.kind == "ffn":
        return "mlp"
    return "full_attention" if getattr(spec.cls, "state_grows", False) else "linear_attention"


def _text_eos(task_params: dict[str, Any]) -> int | None:
    """The end-of-document id of a text task's tokenizer (256 for bytes), or None when its file is gone."""
    from hybridnas.tasks.lm import load_tokenizer

    try:
        return load_tokenizer(task_params.get("tokenizer", "bytes")).eos_id
    except Exception:  # noqa: BLE001  (a tokenizer file moved or unreadable: no eos, nothing else changes)
        return None


def hf_config(arch: ArchConfig, model: HybridLM | None = None) -> dict[str, Any]:
    """``config.json``: what ``hybridnas.hf.HybridNASConfig`` (and so ``AutoModelForCausalLM``) reads."""
    m = arch.model
    layers = resolved_layers(m)
    symbols = patterns.to_primary(m.pattern)
    seq_len = arch.task.params.get("seq_len")
    eos = _text_eos(arch.task.params) if arch.task.name == "lm" else None
    return {
        "model_type": "hybridnas",
        "architectures": ["HybridNASForCausalLM"],
        "hybridnas_version": __version__,
        "hybrid_override_pattern": m.pattern,
        "layer_types": [layer_type(s, layers.get(s)) for s in symbols],
        "task": arch.task.name,
        "max_position_embeddings": int(seq_len) if isinstance(seq_len, int) else None,
        "eos_token_id": eos,
        "layer_symbols": patterns.to_primary(m.pattern),
        "num_hidden_layers": len(patterns.to_primary(m.pattern)),
        "hidden_size": m.d_model,
        "vocab_size": m.vocab_size,
        "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
        "layer_configs": layers,
        "custom_symbols": dict(arch.symbols),
        "num_parameters": model.num_params() if model is not None else HybridLM.param_count(m),
        "torch_dtype": "float32",
    }


def save_weights(path: Path, model: HybridLM, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, st_save(tensors, metadata=metadata or {"format": "pt"}))


def save_checkpoint(out_dir: str | Path, arch: ArchConfig, model: HybridLM, *, tokenizer: bool = False) -> Path:
    """architecture.yaml + config.json + model.safetensors: everything :func:`build_model` needs. ``tokenizer``:
    also the task's tokenizer.json + tokenizer_config.json (:mod:`hybridnas.hf_tokenizer`; skipped without the
    ``tokenizers`` package)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full = complete_arch(arch)
    atomic_write_text(out / ARCH_FILE, dump_yaml(full.to_dict()))
    config = hf_config(full, model)
    write_json(out / CONFIG_FILE, config)
    save_weights(out / WEIGHTS_FILE, model)
    if tokenizer:
        from hybridnas import hf_tokenizer

        hf_tokenizer.save(out, arch.task.name, arch.task.params, arch.model.vocab_size,
                          config["max_position_embeddings"])
    return out


def load_weights_into(model: HybridLM, folder: str | Path) -> HybridLM:
    """Load ``folder``'s model.safetensors into ``model`` (strict: every tensor, no others); return ``model``."""
    wfile = Path(folder) / WEIGHTS_FILE
    if not wfile.exists():
        raise FileNotFoundError(f"{wfile} not found (pass load_weights=False for a freshly initialized model)")
    model.load_state_dict(st_load(wfile.read_bytes()), strict=True)
    return model


def build_model(path: str | Path, *, device: str | torch.device = "cpu", load_weights: bool = True,
                trust_custom_code: bool = False) -> HybridLM:
    """Rebuild the model saved in ``path`` (a folder or its architecture.yaml) and load its weights.

    A folder whose architecture names custom layers by import path is refused with :class:`UntrustedCodeError`
    (nothing imported) unless ``trust_custom_code=True``: importing a module runs its code.
    """
    p = Path(path)
    folder = p.parent if p.is_file() else p
    arch = load_arch(str(folder / ARCH_FILE), trust_custom_code=trust_custom_code)
    model = HybridLM(arch.model)
    if load_weights:
        load_weights_into(model, folder)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------- training checkpoints


def checkpoint_steps(out_dir: str | Path) -> list[int]:
    """Steps of the complete training checkpoints under ``out_dir/checkpoints``, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / TRAINER_STATE).is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def _step_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / CHECKPOINTS / f"step-{step:08d}"


def latest_train_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete training checkpoint folder under ``out_dir``, or None."""
    steps = checkpoint_steps(out_dir)
    return _step_dir(out_dir, steps[-1]) if steps else None


def save_train_checkpoint(out_dir: str | Path, arch: ArchConfig, model: HybridLM, plain: dict[str, Any],
                          state: dict[str, Any], *, keep: int | None = None) -> Path:
    """Write a training checkpoint (see the module docstring) at step ``plain["step"]`` atomically: into a temp
    folder, renamed into place once every file is there. Then only the newest ``keep`` are kept (None: all)."""
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    step = int(plain["step"])
    final = _step_dir(out_dir, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_checkpoint(tmp, arch, model)
        best = state.get("best_state")
        if best is not None:
            atomic_write_bytes(tmp / BEST_FILE, st_save({k: v.detach().to("cpu").contiguous()
                                                         for k, v in best.items()}))
        torch.save(state["tensors"], tmp / OPTIMIZER_FILE)
        write_json(tmp / TRAINER_STATE, plain)  # last: its presence marks a complete checkpoint
        if final.exists():
            old = root / f".tmp-old-{final.name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for old_step in checkpoint_steps(out_dir)[:-keep]:
            shutil.rmtree(_step_dir(out_dir, old_step), ignore_errors=True)
    return final


def load_train_checkpoint(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """``(plain, tensors, best_state)`` of a checkpoint folder (the model's weights: :func:`load_weights_into`)."""
    folder = Path(folder)
    plain = json.loads((folder / TRAINER_STATE).read_text())
    tensors = torch.load(folder / OPTIMIZER_FILE, weights_only=True, map_location="cpu")
    best = st_load((folder / BEST_FILE).read_bytes()) if (folder / BEST_FILE).exists() else None
    return plain, tensors, best
