"""``HybridNASConfig``: the transformers config of a hybridnas model (``model_type`` ``"hybridnas"``).

Kept apart from :mod:`hybridnas.hf` (the model classes) because it needs only transformers' configuration module:
registering it with ``AutoConfig`` (see :mod:`hybridnas._autoreg`) then costs nothing on top of what importing
``AutoConfig`` costs. It reads the ``config.json`` that :func:`hybridnas.checkpoint.hf_config` writes.
"""

from __future__ import annotations

from typing import Any

try:  # transformers v5 name; v4 spells it PretrainedConfig
    from transformers import PreTrainedConfig as _BaseConfig
except ImportError:  # pragma: no cover (transformers 4.x)
    from transformers import PretrainedConfig as _BaseConfig

from hybridnas.schema import ModelConfig

#: the layer_types a hybridnas config may hold: transformers' attention/recurrent names plus Nemotron-H's "mlp"
LAYER_TYPES = ("full_attention", "sliding_attention", "linear_attention", "conv", "moe", "mlp")


class HybridNASConfig(_BaseConfig):
    """The pattern and per-symbol layer configs of a :class:`hybridnas.model.HybridLM`, under transformers' names.

    ``hybrid_override_pattern`` (the pattern, Nemotron-H's field name) and ``layer_configs`` (every symbol's
    resolved parameters) rebuild the model; ``layer_types`` says what each block is in transformers' vocabulary
    (derived, informative); ``custom_symbols`` names the import paths of custom layers (loading such a folder
    needs ``trust_remote_code=True``)."""

    model_type = "hybridnas"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(self, vocab_size: int = 256, hidden_size: int = 128, hybrid_override_pattern: str = "AA",
                 layer_configs: dict[str, dict[str, Any]] | None = None, rms_norm_eps: float = 1e-6,
                 tie_word_embeddings: bool = True, initializer_range: float = 0.02,
                 custom_symbols: dict[str, Any] | None = None, layer_types: list[str] | None = None,
                 num_hidden_layers: int | None = None, max_position_embeddings: int | None = None,
                 task: str | None = None, **kwargs):
        if "pattern" in kwargs:
            hybrid_override_pattern = kwargs.pop("pattern")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.hybrid_override_pattern = hybrid_override_pattern
        self.layer_configs = dict(layer_configs or {})
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.custom_symbols = dict(custom_symbols or {})
        self.num_hidden_layers = num_hidden_layers if num_hidden_layers is not None else (
            len(layer_types) if layer_types is not None else None)
        self.max_position_embeddings = max_position_embeddings
        self.task = task
        use_cache = kwargs.pop("use_cache", True)
        # transformers' own validation (run by its __init__) knows no "mlp": layer_types is set after it, and
        # checked by this class's validate_layer_type
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.layer_types = list(layer_types) if layer_types is not None else None
        self.use_cache = use_cache
        self.validate_layer_type()

    def validate(self):
        """transformers' validators, with this class's ``layer_types`` check in place of its own."""
        layer_types = self.__dict__.pop("layer_types", None)
        try:
            super().validate()
        finally:
            self.__dict__["layer_types"] = layer_types
        self.validate_layer_type()

    def validate_layer_type(self):
        """transformers' check with Nemotron-H's "mlp" allowed (a dense MLP block has no cache)."""
        types = getattr(self, "layer_types", None)
        if types is None:
            return
        bad = [t for t in types if t not in LAYER_TYPES]
        if bad:
            raise ValueError(f"layer_types entries must be in {LAYER_TYPES}, got {bad}")
        if self.num_hidden_layers is not None and self.num_hidden_layers != len(types):
            raise ValueError(f"num_hidden_layers ({self.num_hidden_layers}) must equal the number of layer_types "
                             f"({len(types)})")

    def model_config(self) -> ModelConfig:
        """The :class:`hybridnas.schema.ModelConfig` this config describes."""
        return ModelConfig(vocab_size=int(self.vocab_size), d_model=int(self.hidden_size),
                           pattern=str(self.hybrid_override_pattern),
                           layers={k: dict(v) for k, v in self.layer_configs.items()},
                           norm_eps=float(self.rms_norm_eps), tie_embeddings=bool(self.tie_word_embeddings),
                           init_std=float(self.initializer_range))


def register_config() -> None:
    """``AutoConfig.register("hybridnas", HybridNASConfig)`` (idempotent)."""
    from transformers import AutoConfig

    AutoConfig.register(HybridNASConfig.model_type, HybridNASConfig, exist_ok=True)
