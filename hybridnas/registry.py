"""Symbol -> layer spec. The only place search and model learn what layers exist.

Built-in layers register themselves when ``layers`` is imported (done lazily here). Users register
their own from Python::

    from hybridnas import registry
    registry.register("X", MyMixer, aliases=("x",))

or from a search-space YAML by import path (``symbols: {X: mypkg.mod:MyMixer}``). A registered symbol is
usable in patterns at once.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

_FORBIDDEN = set("()0123456789xX×")


class RegistryError(ValueError):
    pass


@dataclass(frozen=True)
class LayerSpec:
    symbol: str
    cls: type
    aliases: tuple[str, ...] = ()
    source: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cls.__name__

    @property
    def kind(self) -> str:
        return getattr(self.cls, "kind", "mixer")

    def make_config(self, params: dict[str, Any] | None = None) -> Any:
        """The layer's config dataclass from defaults overridden by ``params`` (unknown keys are errors)."""
        merged = {**self.defaults, **(params or {})}
        known = set(self.cls.config_fields())
        unknown = sorted(set(merged) - known)
        if unknown:
            raise RegistryError(f"layer {self.symbol} ({self.name}) has no parameter(s) {unknown}; "
                                f"known: {sorted(known)}")
        return self.cls.Config(**merged)

    def build(self, d_model: int, params: dict[str, Any] | None = None, *, layer_idx: int = 0,
              n_layers: int = 1):
        return self.cls(d_model, self.make_config(params), layer_idx=layer_idx, n_layers=n_layers)

    def param_count(self, d_model: int, params: dict[str, Any] | None = None) -> int:
        return self.cls.param_count(d_model, self.make_config(params))


_SPECS: dict[str, LayerSpec] = {}
_ALIASES: dict[str, str] = {}
_BUILTINS_LOADED = False


def _ensure_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        importlib.import_module("layers")


def _check_char(ch: str, what: str) -> None:
    if not isinstance(ch, str) or len(ch) != 1 or ch.isspace() or ch in _FORBIDDEN:
        raise RegistryError(f"{what} {ch!r} must be one character, not whitespace, a digit, '(', ')' or 'x'")


def register(symbol: str, cls: type, *, aliases: tuple[str, ...] | list[str] = (), source: str = "",
             defaults: dict[str, Any] | None = None, replace: bool = False) -> LayerSpec:
    """Register ``cls`` (a ``layers.base.Layer`` subclass) under ``symbol`` and its aliases."""
    from layers.base import Layer

    _ensure_builtins()  # so a user symbol that clashes with a built-in is caught
    _check_char(symbol, "symbol")
    for a in aliases:
        _check_char(a, "alias")
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        raise RegistryError(f"symbol {symbol}: {cls!r} is not a subclass of layers.base.Layer")
    if not hasattr(cls, "Config"):
        raise RegistryError(f"symbol {symbol}: {cls.__name__} has no Config dataclass")
    taken = [c for c in (symbol, *aliases) if (c in _SPECS or c in _ALIASES)]
    if taken and not replace:
        owner = [(_ALIASES.get(c, c)) for c in taken]
        raise RegistryError(f"symbol(s) {taken} already registered (to {[_SPECS[o].name for o in owner]}); "
                            f"pass replace=True to override")
    if replace:
        for c in taken:
            unregister(_ALIASES.get(c, c))
    spec = LayerSpec(symbol, cls, tuple(aliases), source, dict(defaults or {}))
    if spec.defaults:
        spec.make_config()  # unknown default keys fail now
    _SPECS[symbol] = spec
    for a in aliases:
        _ALIASES[a] = symbol
    return spec


def register_layer(symbol: str, *, aliases: tuple[str, ...] = ()):
    """Class decorator form of :func:`register`."""

    def deco(cls: type) -> type:
        register(symbol, cls, aliases=aliases, source=f"{cls.__module__}:{cls.__qualname__}")
        return cls

    return deco


def import_object(path: str) -> Any:
    """Resolve ``package.module:Name`` (or ``package.module.Name``)."""
    if ":" in path:
        mod_name, _, attr = path.partition(":")
    else:
        mod_name, _, attr = path.rpartition(".")
    if not mod_name or not attr:
        raise RegistryError(f"import path {path!r} must look like 'package.module:ClassName'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise RegistryError(f"cannot import module {mod_name!r} for {path!r}: {e}") from None
    obj = mod
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RegistryError(f"module {mod_name!r} has no attribute {attr!r}") from None
    return obj


def register_path(symbol: str, path: str, *, aliases: tuple[str, ...] = (), replace: bool = False) -> LayerSpec:
    """Register the class at import path ``path`` (as a YAML ``symbols:`` entry does)."""
    _ensure_builtins()
    cls = import_object(path)
    existing = _SPECS.get(symbol)
    if existing is not None and existing.cls is cls:
        return existing
    return register(symbol, cls, aliases=aliases, source=path, replace=replace)


def unregister(symbol: str) -> None:
    spec = _SPECS.pop(symbol, None)
    if spec is not None:
        for a in spec.aliases:
            _ALIASES.pop(a, None)


def get(symbol: str) -> LayerSpec:
    _ensure_builtins()
    primary = _ALIASES.get(symbol, symbol)
    try:
        return _SPECS[primary]
    except KeyError:
        raise RegistryError(f"unknown layer symbol {symbol!r}; registered: {', '.join(sorted(symbol_map()))}") \
            from None


def primary(symbol: str) -> str:
    return get(symbol).symbol


def symbols() -> list[str]:
    """Primary symbols, sorted."""
    _ensure_builtins()
    return sorted(_SPECS)


def specs() -> list[LayerSpec]:
    _ensure_builtins()
    return [_SPECS[s] for s in sorted(_SPECS)]


def symbol_map() -> dict[str, str]:
    """Every accepted character (primary symbols and aliases) -> primary symbol."""
    _ensure_builtins()
    out = {s: s for s in _SPECS}
    out.update(_ALIASES)
    return out
