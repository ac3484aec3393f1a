"""A local Hugging Face causal LM folder (or a hybridnas export) as a distillation teacher.

:func:`load_hf_teacher` reads a folder and returns an :class:`HFTeacher` whose ``model`` maps ``input_ids (B, T)``
int64 to logits ``(B, T, V)`` in eval mode, in fp32:

- **Llama family** (``model_type`` ``llama``, ``mistral``, ``qwen2``): the weights are converted exactly into a
  :class:`HybridLM` with pattern ``(AF)xL`` and that model is the teacher (``hybrid`` is set, so post-training
  search can copy its blocks into students). A Llama decoder layer ``h = x + attn(ln1(x)); y = h + mlp(ln2(h))``
  is two hybridnas pre-norm blocks: ``A`` (norm = ``input_layernorm``; ``q/k/v_proj`` stacked row-wise into the
  fused ``qkv`` in that order, heads contiguous as transformers lays them out; ``o_proj`` -> ``out``) and ``F``
  (norm = ``post_attention_layernorm``; ``gate_proj`` -> ``w1``, ``up_proj`` -> ``w3``, ``down_proj`` -> ``w2``).
  Conventions that map through the layers' configs: RoPE (both rotate half of the head: pairs ``(i, i + hd/2)``)
  with ``rope_theta``; GQA ``num_key_value_heads``; ``head_dim``; RMSNorm ``rms_norm_eps`` (same formula: fp32
  ``x * rsqrt(mean(x^2) + eps) * weight``); softmax scale ``head_dim^-0.5`` (SDPA's default); q/k/v biases
  (Qwen2) -> ``qkv_bias``; ``mlp_bias`` -> the MLP's ``bias``; ``intermediate_size`` -> the MLP width; tied or
  untied head; Mistral's ``sliding_window`` and Qwen2's all-sliding ``layer_types`` -> the attention ``window``
  (both attend to the ``window`` most recent keys, the query's own included).
  What cannot map, and then falls back to the transformers model with the reason in ``not_mapped``: a RoPE
  ``rope_type`` other than ``default`` (linear, dynamic, yarn, llama3 scaling rescale the frequencies) or a
  ``partial_rotary_factor`` below 1; a bias on ``o_proj`` (Llama's ``attention_bias`` also biases the output
  projection; the ``A`` layer's ``out`` has none); an activation other than SiLU; layers with different attention
  windows (one ``A`` symbol has one window); weights missing or of unexpected shapes.
- **A hybridnas export** (``architecture.yaml`` beside ``config.json``): built with
  :func:`hybridnas.checkpoint.build_model`; ``trust_remote_code`` is passed on as its ``trust_custom_code``.
- **Any other architecture**: ``model`` wraps transformers' ``AutoModelForCausalLM`` (loaded with
  ``local_files_only=True``, so nothing downloads) and ``hybrid`` is None. A folder whose ``config.json`` names
  its own code (``auto_map``) is refused unless ``trust_remote_code=True``: the check reads the JSON only, and no
  file of the folder is imported without the opt-in. A ``model_type`` transformers does not know and no code to
  define it is refused too.

Bad folders raise :class:`TeacherError` (a ``ValueError``, so the CLI prints its one line and exits 2), naming the
path: no folder, no ``config.json``, broken JSON (with its line), no ``model_type``, not loadable as a causal LM.
Needs the ``hf`` extra (transformers) except for a hybridnas export; the Llama conversion reads
``model.safetensors`` (sharded or not) itself and asks transformers only for the config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridnas import registry
from hybridnas.config import HF_BLOCK_TYPES
from hybridnas.model import HybridLM
from hybridnas.schema import ModelConfig

LLAMA_FAMILY = HF_BLOCK_TYPES  # the model types converted into (AF)xL blocks; config.py checks teachers by it
CONFIG_FILE = "config.json"


class TeacherError(ValueError):
    """A folder that cannot be a teacher; the message is one line naming the path."""


class NotMapped(Exception):
    """A Llama-family folder whose weights do not map exactly onto hybridnas blocks (the message says why)."""


@dataclass
class HFTeacher:
    """``model``: ``input_ids (B, T)`` int64 -> logits ``(B, T, V)``, eval mode. ``hybrid``: the same model as a
    :class:`HybridLM` when the weights map exactly onto hybridnas blocks (then ``model is hybrid``), else None.
    ``kind``: the folder's ``model_type`` (``hybridnas`` for an export). ``not_mapped``: why a Llama-family
    folder was not converted (None otherwise)."""

    model: nn.Module
    hybrid: HybridLM | None
    vocab_size: int
    kind: str
    tokenizer_path: Path | None
    not_mapped: str | None = field(default=None)


class HFLogits(nn.Module):
    """A transformers causal LM as ``input_ids -> logits`` (no cache: a teacher scores whole sequences)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits


# ---------------------------------------------------------------------------------------------- the folder


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise TeacherError(f"{folder}: no such folder (a teacher is a local model folder)")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise TeacherError(f"{folder}: no config.json: not a model folder (expected a Hugging Face causal LM "
                           "saved with save_pretrained, or a hybridnas export)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TeacherError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TeacherError(f"{path}: cannot read: {e}") from None
    if not isinstance(raw, dict):
        raise TeacherError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if not isinstance(raw.get("model_type"), str) or not raw["model_type"]:
        raise TeacherError(f"{path}: model_type: missing (transformers needs it to know the architecture)")
    return raw


def _tokenizer(folder: Path) -> Path | None:
    path = folder / "tokenizer.json"
    return path if path.is_file() else None


def _transformers(folder: Path):
    try:
        import transformers
    except ImportError:
        raise TeacherError(f"{folder}: loading a Hugging Face teacher needs transformers: "
                           "pip install -e '.[hf]'") from None
    return transformers


def load_hf_teacher(path: str | Path, *, trust_remote_code: bool = False) -> HFTeacher:
    """Load the teacher in ``path`` (see the module docstring for what maps and what is refused)."""
    folder = Path(path)
    raw = _read_config(folder)
    kind = raw["model_type"]
    if kind == "hybridnas" or (folder / "architecture.yaml").is_file():
        from hybridnas.checkpoint import build_model

        model = build_model(folder, trust_custom_code=trust_remote_code).float().eval()
        return HFTeacher(model, model, model.cfg.vocab_size, "hybridnas", _tokenizer(folder))
    auto_map = raw.get("auto_map")
    if auto_map and not trust_remote_code:
        target = auto_map.get("AutoModelForCausalLM", auto_map) if isinstance(auto_map, dict) else auto_map
        raise TeacherError(f"{folder}: config.json names custom code (auto_map: {target}); loading it would run "
                           "that code: pass trust_remote_code=True if you trust it (nothing was imported)")
    transformers = _transformers(folder)
    if not auto_map:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if kind not in CONFIG_MAPPING_NAMES:
            raise TeacherError(f"{folder}: model_type {kind!r} is not one transformers {transformers.__version__} "
                               "knows, and the folder ships no code for it (no auto_map in config.json)")
    reason = None
    if kind in LLAMA_FAMILY and not auto_map:
        try:
            hf_cfg = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        except Exception as e:  # transformers' own validation (strict dataclass checks) raises several types
            raise TeacherError(f"{folder / CONFIG_FILE}: transformers refuses the config: {_first_line(e)}") from None
        try:
            hybrid = convert_llama(hf_cfg, _state_dict(folder, transformers))
            return HFTeacher(hybrid, hybrid, hybrid.cfg.vocab_size, kind, _tokenizer(folder))
        except NotMapped as e:
            reason = str(e)
    model = _load_transformers(folder, transformers, trust_remote_code)
    vocab = getattr(model.hf.config.get_text_config(), "vocab_size", None)
    if not isinstance(vocab, int):
        vocab = model.hf.get_output_embeddings().weight.shape[0]
    return HFTeacher(model, None, int(vocab), kind, _tokenizer(folder), reason)


def _load_transformers(folder: Path, transformers: Any, trust_remote_code: bool) -> HFLogits:
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            folder, local_files_only=True, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except Exception as e:  # config validation, missing or corrupt weights, remote code that fails: one line each
        raise TeacherError(f"{folder}: transformers cannot load it as a causal LM: {_first_line(e)}") from None
    return HFLogits(hf).eval()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _state_dict(folder: Path, transformers: Any) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by name: model.safetensors (or its shards) read directly; other formats through
    transformers (no remote code: only native model types get here)."""
    from safetensors.torch import load_file as _load

    def load_file(path: Path) -> dict[str, torch.Tensor]:
        try:
            return _load(path)
        except Exception as e:  # safetensors raises its own error type for a corrupt header
            raise TeacherError(f"{path}: cannot read safetensors: {_first_line(e)}") from None

    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise TeacherError(f"{index}: not a safetensors index ({e})") from None
        out: dict[str, torch.Tensor] = {}
        for shard in shards:
            out.update(load_file(folder / shard))
        return out
    return {k: v for k, v in _load_transformers(folder, transformers, False).hf.state_dict().items()}


# ---------------------------------------------------------------------------------------------- Llama -> (AF)xL


def _ffn_params(d_model: int, hidden: int, bias: bool) -> dict[str, Any]:
    """SwiGLU params whose width (``round_up(int(expand * d), multiple_of)``) is exactly ``hidden``."""
    from layers.ffn import ffn_hidden

    expand = hidden / d_model
    multiple_of = 1 if ffn_hidden(d_model, expand, 1) == hidden else hidden  # float rounding of expand * d
    return {"expand": expand, "multiple_of": multiple_of, "bias": bias}


def _windows(cfg: Any, kind: str, n: int) -> list[int | None]:
    window = getattr(cfg, "sliding_window", None)
    if kind == "llama" or window is None:
        return [None] * n
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is None:  # Mistral: every layer slides
        return [window] * n
    return [window if t == "sliding_attention" else None for t in layer_types]


def convert_llama(cfg: Any, weights: dict[str, torch.Tensor]) -> HybridLM:
    """A Llama / Mistral / Qwen2 checkpoint (its transformers config and tensors) as a :class:`HybridLM` ``(AF)xL``
    with the same logits; :class:`NotMapped` says why one cannot be."""
    kind = cfg.model_type
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise NotMapped(f"hidden_act {act!r}: the F layer's SwiGLU gates with SiLU")
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise NotMapped(f"rope_type {rope_type!r}: the A layer's RoPE has no frequency scaling (only 'default')")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise NotMapped(f"partial_rotary_factor {rope['partial_rotary_factor']}: the A layer rotates whole heads")
    theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0) or 10000.0))
    n, d = cfg.num_hidden_layers, cfg.hidden_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or d // heads
    windows = _windows(cfg, kind, n)
    if len(set(windows)) > 1:
        raise NotMapped(f"layers differ in attention window ({windows}): one A symbol has one window")
    prefix = "model." if any(k.startswith("model.") for k in weights) else ""
    attn0 = f"{prefix}layers.0.self_attn."
    if f"{attn0}o_proj.bias" in weights:
        raise NotMapped("o_proj has a bias (attention_bias): the A layer's output projection has none")
    qkv_bias = f"{attn0}q_proj.bias" in weights
    mlp_bias = f"{prefix}layers.0.mlp.gate_proj.bias" in weights
    hidden = cfg.intermediate_size
    tie = bool(getattr(cfg, "tie_word_embeddings", False))
    attn = {"n_heads": heads, "n_kv_heads": kv, "head_dim": hd, "rope": True, "rope_theta": theta,
            "window": windows[0], "qkv_bias": qkv_bias}
    mcfg = ModelConfig(vocab_size=cfg.vocab_size, d_model=d, pattern=f"(AF)x{n}",
                       layers={"A": attn, "F": _ffn_params(d, hidden, mlp_bias)},
                       norm_eps=float(cfg.rms_norm_eps), tie_embeddings=tie,
                       init_std=float(getattr(cfg, "initializer_range", 0.02)))

    def get(name: str) -> torch.Tensor:
        key = prefix + name
        if key not in weights:
            raise NotMapped(f"tensor {key} is missing from the checkpoint")
        return weights[key].float()

    sd: dict[str, torch.Tensor] = {"embed.weight": get("embed_tokens.weight"), "norm_f.weight": get("norm.weight")}
    for i in range(n):
        a, f, src = f"blocks.{2 * i}.", f"blocks.{2 * i + 1}.", f"layers.{i}."
        sd[a + "norm.weight"] = get(src + "input_layernorm.weight")
        sd[a + "layer.qkv.weight"] = torch.cat([get(f"{src}self_attn.{p}_proj.weight") for p in "qkv"])
        if qkv_bias:
            sd[a + "layer.qkv.bias"] = torch.cat([get(f"{src}self_attn.{p}_proj.bias") for p in "qkv"])
        sd[a + "layer.out.weight"] = get(src + "self_attn.o_proj.weight")
        sd[f + "norm.weight"] = get(src + "post_attention_layernorm.weight")
        for ours, theirs in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
            sd[f"{f}layer.{ours}.weight"] = get(f"{src}mlp.{theirs}_proj.weight")
            if mlp_bias:
                sd[f"{f}layer.{ours}.bias"] = get(f"{src}mlp.{theirs}_proj.bias")
    if not tie:
        if "lm_head.weight" not in weights:
            raise NotMapped("tensor lm_head.weight is missing and tie_word_embeddings is false")
        sd["lm_head.weight"] = weights["lm_head.weight"].float()
    registry.get("A"), registry.get("F")  # imported outside the meta context (module-level tensors stay real)
    with torch.device("meta"):  # no random init of weights about to be replaced
        model = HybridLM(mcfg)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:  # a shape that does not match the config
        raise NotMapped(f"weights do not fit the converted model: {str(e).splitlines()[-1].strip()}") from None
    return model.eval()
