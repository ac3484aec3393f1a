"""Hugging Face transformers classes for a hybridnas model (the ``hf`` extra: ``pip install -e ".[hf]"``).

After ``import hybridnas`` (the registration runs when transformers' Auto modules are first imported, see
:mod:`hybridnas._autoreg`), an export folder loads as a transformers causal LM::

    import hybridnas
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("best/")
    tok = AutoTokenizer.from_pretrained("best/")
    out = model.generate(**tok("hello", return_tensors="pt"), max_new_tokens=20, do_sample=False)

- :class:`HybridNASConfig` (``model_type`` ``"hybridnas"``) reads the folder's ``config.json``.
- :class:`HybridNASForCausalLM` holds the :class:`hybridnas.model.HybridLM` modules under their own names
  (``embed``, ``blocks.N...``, ``norm_f``), so the folder's ``model.safetensors`` loads as it is, and
  ``save_pretrained`` writes the same names back.
- :class:`HybridNASCache` is the ``Cache`` that ``generate`` carries between forward calls: the list of every
  block's decoding state (KV tensors for attention, conv + recurrent state for Mamba, RWKV, Hyena; ``None`` for
  MLPs). The first forward with a cache runs ``HybridLM.prefill``; later ones run ``HybridLM.step`` token by
  token, so greedy ``generate`` gives exactly ``HybridLM.generate``'s tokens. The model builds this cache itself
  (``_supports_default_dynamic_cache`` is False); passing another ``Cache`` class is refused. Recurrent states
  cannot be rewound, so ``crop`` (assisted / speculative decoding) is refused too.
- Padding (an ``attention_mask`` with zeros) is refused: batch prompts of equal length, or one at a time.
- A folder whose config names custom layers by import path (``custom_symbols``) is refused unless
  ``trust_remote_code=True`` (or ``trust_custom_code=True``) is passed: importing them runs their code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from hybridnas import registry
from hybridnas.checkpoint import ARCH_FILE, CONFIG_FILE, UntrustedCodeError
from hybridnas.generation import state_nbytes
from hybridnas.hf_config import HybridNASConfig, register_config
from hybridnas.model import HybridLM, _layer_params
from hybridnas.yamlio import load_file

__all__ = ["HybridNASCache", "HybridNASConfig", "HybridNASForCausalLM", "register"]

_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _map_tensors(obj: Any, fn) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


class HybridNASCache(Cache):
    """Every block's decoding state (``states``, one entry per block, batch first) and the tokens seen."""

    def __init__(self, states: list[Any] | None = None, seen_tokens: int = 0):
        try:
            super().__init__(layers=[])
        except TypeError:  # pragma: no cover (transformers 4.x)
            super().__init__()
        self.states = states
        self.seen_tokens = seen_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_linear(self) -> list[bool]:
        # not "all linear": generate then slices a prompt that repeats the cached tokens by get_seq_length
        return [False]

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.states is not None

    @property
    def batch_size(self) -> int:
        sizes = []
        _map_tensors(self.states, lambda t: sizes.append(t.shape[0]))
        return sizes[0] if sizes else -1

    def nbytes(self) -> int:
        return state_nbytes(self.states)

    def reset(self) -> None:
        self.states, self.seen_tokens = None, 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.states = _map_tensors(self.states, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.states = _map_tensors(self.states, lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.states = _map_tensors(self.states, lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a hybridnas cache cannot be cropped: recurrent states are not rewound "
                                      "(assisted and speculative decoding are not supported)")

    def activate_past_recording(self) -> None:
        raise NotImplementedError("a hybridnas cache cannot record past states (assisted and speculative decoding "
                                  "are not supported)")

    def __repr__(self) -> str:
        return f"HybridNASCache(seen_tokens={self.seen_tokens}, bytes={self.nbytes()})"


class HybridNASPreTrainedModel(PreTrainedModel):
    config_class = HybridNASConfig
    base_model_prefix = "hybridnas"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _is_stateful = True  # recurrent states: no assisted decoding, no cache cropping

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Nothing: every layer initializes itself (``HybridLM.init_weights``), including Mamba's ``A_log``,
        dt-bias and ``D``, which transformers' generic init would overwrite."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own HybridNASCache on the first forward


def custom_modules(symbols: Any) -> dict[str, str]:
    """``{symbol: import path}`` of each custom layer a ``symbols`` / ``custom_symbols`` mapping names."""
    if not isinstance(symbols, dict):
        return {}
    return {str(sym): str(entry.get("path") if isinstance(entry, dict) else entry) for sym, entry in symbols.items()}


def _folder_symbols(path: Any, config: Any) -> dict[str, str]:
    """Custom layer import paths a folder (or a given config) names: config.json's ``custom_symbols`` and
    architecture.yaml's ``symbols``."""
    found: dict[str, str] = {}
    if isinstance(config, HybridNASConfig):
        found.update(custom_modules(config.custom_symbols))
    folder = Path(str(path))
    if folder.is_dir():
        import json

        cfg_file = folder / CONFIG_FILE
        if cfg_file.exists() and not isinstance(config, HybridNASConfig):
            try:
                found.update(custom_modules(json.loads(cfg_file.read_text()).get("custom_symbols")))
            except (ValueError, AttributeError):
                pass
        if (folder / ARCH_FILE).exists():
            data, _ = load_file(folder / ARCH_FILE)
            if isinstance(data, dict):
                found.update(custom_modules(data.get("symbols")))
    return found


def _register_custom(symbols: dict[str, Any]) -> None:
    registry.new_scope()
    for sym, entry in symbols.items():
        path = entry.get("path") if isinstance(entry, dict) else entry
        aliases = tuple(entry.get("aliases") or ()) if isinstance(entry, dict) else ()
        registry.register_path(str(sym), str(path), aliases=aliases, scoped=True)


class HybridNASForCausalLM(HybridNASPreTrainedModel, GenerationMixin):
    """A :class:`hybridnas.model.HybridLM` as a transformers causal LM (see the module docstring)."""

    def __init__(self, config: HybridNASConfig):
        super().__init__(config)
        core = HybridLM(config.model_config())
        # the core's modules become this model's own (same names as HybridLM's state dict); the core keeps
        # references to them and runs prefill/step, so the two are one model
        self.embed = core.embed
        self.blocks = core.blocks
        self.norm_f = core.norm_f
        if core.lm_head is not None:
            self.lm_head = core.lm_head
        self.__dict__["core"] = core
        self.post_init()

    @classmethod
    def from_hybridlm(cls, model: HybridLM, config: HybridNASConfig | None = None) -> HybridNASForCausalLM:
        """Wrap an in-memory HybridLM (its weights copied)."""
        from dataclasses import asdict

        if config is None:
            m = model.cfg
            config = HybridNASConfig(vocab_size=m.vocab_size, hidden_size=m.d_model,
                                     hybrid_override_pattern=m.pattern, layer_configs=asdict(m)["layers"],
                                     rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
                                     initializer_range=m.init_std)
        out = cls(config)
        out.load_state_dict(model.state_dict(), strict=True)
        return out.eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' loader, after the trust rule: custom layer code is imported only with
        ``trust_remote_code=True`` or ``trust_custom_code=True``."""
        trust = bool(kwargs.pop("trust_custom_code", False)) or bool(kwargs.get("trust_remote_code"))
        symbols = _folder_symbols(pretrained_model_name_or_path, kwargs.get("config"))
        if symbols:
            if not trust:
                names = ", ".join(f"{s} -> {m}" for s, m in symbols.items())
                raise UntrustedCodeError(
                    f"names custom layer code to import ({names}); loading it runs that code. Pass "
                    "trust_remote_code=True (or trust_custom_code=True) if you trust this folder",
                    str(Path(str(pretrained_model_name_or_path)) / CONFIG_FILE), None, ("custom_symbols",))
            config = kwargs.get("config")
            if isinstance(config, HybridNASConfig) and config.custom_symbols:
                _register_custom(config.custom_symbols)
            else:
                _register_custom(symbols)
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        if isinstance(model, HybridNASForCausalLM):
            model._restore_buffers()
        return model

    def _restore_buffers(self) -> None:
        """Recompute non-persistent buffers (Hyena's filter decay rates): they are not in the weights file, and
        transformers builds the model on the meta device, so they would be left uninitialized."""
        cfg = self.core.cfg
        params = _layer_params(cfg)
        for i, (sym, block) in enumerate(zip(self.core.symbols, self.blocks, strict=True)):
            if not any(m._non_persistent_buffers_set for m in block.layer.modules()):
                continue
            with torch.device("cpu"):
                fresh = registry.get(sym).build(cfg.d_model, params.get(sym), layer_idx=i, n_layers=len(self.blocks))
            for mod_name, mod in fresh.named_modules():
                target = block.layer.get_submodule(mod_name)
                for name in mod._non_persistent_buffers_set:
                    old = target._buffers[name]
                    target._buffers[name] = mod._buffers[name].to(device=old.device, dtype=old.dtype)

    # -- embeddings ------------------------------------------------------------------------------------------

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.embed = value
        self.core.embed = value

    def get_output_embeddings(self) -> torch.nn.Module | None:
        return self._modules.get("lm_head")

    # -- forward ---------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: Cache | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, return_dict: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """Without a cache (training, scoring): ``HybridLM.forward`` on the whole sequence, with gradients. With
        one (``use_cache``, or a cache passed in): the first call prefills it, later calls step through the new
        tokens one at a time from the cached state."""
        cache = cache if cache is not None else past_key_values
        if inputs_embeds is not None:
            raise ValueError("hybridnas models take input_ids, not inputs_embeds")
        if input_ids is None:
            raise ValueError("input_ids is required")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("padding is not supported (attention_mask has zeros): recurrent layers would read the "
                             "pad tokens; pass prompts of equal length, or one at a time")
        if cache is not None and not isinstance(cache, HybridNASCache):
            raise TypeError(f"hybridnas models keep their own HybridNASCache; got a {type(cache).__name__}")
        if use_cache is None:
            use_cache = bool(self.config.use_cache) and not self.training
        core = self.core
        if cache is None and not use_cache:
            logits = core(input_ids)
        else:
            cache = cache if cache is not None else HybridNASCache()
            if cache.states is None:
                logits, states = core.prefill(input_ids)
            else:
                states, outs = cache.states, []
                for i in range(input_ids.shape[1]):
                    step_logits, states = core.step(input_ids[:, i], states)
                    outs.append(step_logits[:, None])
                logits = torch.cat(outs, dim=1)
            cache.states = states
            cache.seen_tokens += input_ids.shape[1]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})


def register() -> None:
    """Register the config with ``AutoConfig`` and the model with ``AutoModelForCausalLM`` (idempotent)."""
    register_config()
    AutoModelForCausalLM.register(HybridNASConfig, HybridNASForCausalLM, exist_ok=True)


register()
