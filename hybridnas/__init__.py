"""hybridnas: architecture search over hybrid sequence models.

``hybridnas.build_model(folder)`` rebuilds an exported model and loads its weights. With transformers installed,
``import hybridnas`` also makes ``AutoModelForCausalLM.from_pretrained(folder)`` work (:mod:`hybridnas.hf`).
"""

__version__ = "0.1.0"

__all__ = ["__version__", "build_model", "HybridLM", "registry", "patterns"]

from hybridnas import _autoreg

_autoreg.install()  # AutoConfig / AutoModelForCausalLM learn "hybridnas" when transformers loads them


def __getattr__(name: str):
    if name == "build_model":
        from hybridnas.checkpoint import build_model

        return build_model
    if name == "HybridLM":
        from hybridnas.model import HybridLM

        return HybridLM
    if name in ("registry", "patterns"):
        import importlib

        return importlib.import_module(f"hybridnas.{name}")
    raise AttributeError(f"module 'hybridnas' has no attribute {name!r}")
