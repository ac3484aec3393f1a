"""Register the hybridnas classes with transformers' Auto classes without importing transformers.

``import hybridnas`` calls :func:`install`. If transformers' Auto modules are already imported, it registers at
once; otherwise it puts a finder on ``sys.meta_path`` that waits for them: right after
``transformers.models.auto.configuration_auto`` runs, :class:`hybridnas.hf_config.HybridNASConfig` is registered
with ``AutoConfig``; right after ``transformers.models.auto.modeling_auto`` runs, :mod:`hybridnas.hf` is imported
and registers ``HybridNASForCausalLM`` with ``AutoModelForCausalLM``. So ``import hybridnas`` costs nothing when
transformers is not installed or not used, and a program that uses ``AutoConfig`` alone never loads the model
classes. A failure to register is a warning, never a failed transformers import.
"""

from __future__ import annotations

import importlib
import sys
import warnings

_CONFIG = "transformers.models.auto.configuration_auto"
_MODELING = "transformers.models.auto.modeling_auto"


def _register_config() -> None:
    from hybridnas.hf_config import register_config

    register_config()


def _register_models() -> None:
    importlib.import_module("hybridnas.hf")  # registers on import


_HOOKS = {_CONFIG: _register_config, _MODELING: _register_models}


def _run(name: str) -> None:
    try:
        _HOOKS[name]()
    except Exception as e:  # noqa: BLE001  (never break the user's transformers import)
        warnings.warn(f"hybridnas: could not register with transformers ({type(e).__name__}: {e})", stacklevel=2)


class _Loader:  # the loader protocol (importlib.abc is not imported: it costs more than the rest)
    def __init__(self, inner, name: str):
        self._inner, self._name = inner, name

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        _run(self._name)

    def __getattr__(self, attr):
        return getattr(self._inner, attr)


class _Finder:  # the meta path finder protocol
    """Finds nothing itself: wraps the loader of the two Auto modules so a hook runs after each."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


_FINDER = _Finder()


def install() -> None:
    """Register now for the Auto modules already imported; wait for the others."""
    pending = [name for name in _HOOKS if name not in sys.modules]
    for name in _HOOKS:
        if name in sys.modules:
            _run(name)
    if pending and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
