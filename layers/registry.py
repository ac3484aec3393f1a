"""Symbol -> layer class: the one place the model and the search learn what layers exist.

Built-in layers are declared here as import paths (:data:`BUILTINS`) and imported on first use: ``get("A")``
imports ``layers.attention`` and nothing else, and :func:`symbols` / :func:`symbol_map` import no layer module.
Anyone may add a layer under a new one-character symbol::

    from layers import registry
    registry.register("X", MyMixer, aliases=("x",))

Every class is checked against the layer contract when registered (a built-in when first loaded) and refused
with a :class:`RegistryError` naming what it lacks (:func:`layers.contract.check_class`); :func:`check_layer`
runs the contract's numerical checks on a registered symbol. ``hybridnas.registry`` adds YAML import paths and
per-file scoping on top of this module.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field
from typing import Any

from layers import contract

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


@dataclass(frozen=True)
class Builtin:
    """A built-in symbol before its module is imported: where its class lives, and its aliases."""

    path: str  # package.module:ClassName
    aliases: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.path.rpartition(":")[2]


BUILTINS: dict[str, Builtin] = {
    "A": Builtin("layers.attention:Attention", ("*",)),
    "E": Builtin("layers.moe:MoE"),
    "F": Builtin("layers.ffn:SwiGLU", ("-",)),
    "H": Builtin("layers.hyena:Hyena"),
    "M": Builtin("layers.mamba:Mamba"),
    "R": Builtin("layers.rwkv:RWKV7"),
    "S": Builtin("layers.s4:S4D"),
}

_SPECS: dict[str, LayerSpec] = {}  # loaded: primary symbol -> spec
_PENDING: dict[str, Builtin] = dict(BUILTINS)  # declared built-ins not imported yet
_ALIASES: dict[str, str] = {a: s for s, b in BUILTINS.items() for a in b.aliases}  # alias -> primary, both kinds
_LOCK = threading.RLock()


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


def _check_char(ch: str, what: str) -> None:
    if not isinstance(ch, str) or len(ch) != 1 or ch.isspace() or ch in _FORBIDDEN:
        raise RegistryError(f"{what} {ch!r} must be one character, not whitespace, a digit, '(', ')' or 'x'")


def _check_contract(symbol: str, cls: Any) -> None:
    problems = contract.check_class(cls)
    if problems:
        raise RegistryError(f"symbol {symbol}: " + "; ".join(problems))


def _make_spec(symbol: str, cls: type, aliases: tuple[str, ...], source: str,
               defaults: dict[str, Any]) -> LayerSpec:
    spec = LayerSpec(symbol, cls, aliases, source, dict(defaults))
    if spec.defaults:
        spec.make_config()  # unknown default keys fail now
    return spec


def _owner_name(symbol: str) -> str:
    return _SPECS[symbol].name if symbol in _SPECS else _PENDING[symbol].name


def register(symbol: str, cls: type, *, aliases: tuple[str, ...] | list[str] = (), source: str = "",
             defaults: dict[str, Any] | None = None, replace: bool = False) -> LayerSpec:
    """Register ``cls`` (a ``layers.base.Layer`` subclass meeting the contract) under ``symbol`` and its aliases."""
    _check_char(symbol, "symbol")
    for a in aliases:
        _check_char(a, "alias")
    _check_contract(symbol, cls)
    with _LOCK:
        taken = [c for c in (symbol, *aliases) if (c in _SPECS or c in _PENDING or c in _ALIASES)]
        if taken and not replace:
            owner = [(_ALIASES.get(c, c)) for c in taken]
            raise RegistryError(f"symbol(s) {taken} already registered (to {[_owner_name(o) for o in owner]}); "
                                f"pass replace=True to override")
        spec = _make_spec(symbol, cls, tuple(aliases), source, defaults or {})
        for c in taken:
            unregister(_ALIASES.get(c, c))
        _SPECS[symbol] = spec
        for a in spec.aliases:
            _ALIASES[a] = symbol
    return spec


def register_layer(symbol: str, *, aliases: tuple[str, ...] = ()):
    """Class decorator form of :func:`register`."""

    def deco(cls: type) -> type:
        register(symbol, cls, aliases=aliases, source=f"{cls.__module__}:{cls.__qualname__}")
        return cls

    return deco


def unregister(symbol: str) -> None:
    """Forget ``symbol`` (a primary symbol) and its aliases; a built-in too. Unknown symbols are ignored."""
    with _LOCK:
        entry = _SPECS.pop(symbol, None) or _PENDING.pop(symbol, None)
        if entry is not None:
            for a in entry.aliases:
                _ALIASES.pop(a, None)


def _load(symbol: str) -> LayerSpec:
    """Import a declared built-in and check it, once."""
    with _LOCK:
        if symbol in _SPECS:
            return _SPECS[symbol]
        builtin = _PENDING[symbol]
        cls = import_object(builtin.path)
        _check_contract(symbol, cls)
        spec = _make_spec(symbol, cls, builtin.aliases, builtin.path, {})
        del _PENDING[symbol]
        _SPECS[symbol] = spec
        return spec


def primary(symbol: str) -> str:
    """The primary symbol of a symbol or alias (imports nothing)."""
    p = _ALIASES.get(symbol, symbol)
    if p in _SPECS or p in _PENDING:
        return p
    return get(symbol).symbol  # raises the unknown-symbol error


def get(symbol: str) -> LayerSpec:
    """The spec of a symbol or alias, importing its module if it is a built-in not used before."""
    p = _ALIASES.get(symbol, symbol)
    spec = _SPECS.get(p)
    if spec is not None:
        return spec
    if p in _PENDING:
        return _load(p)
    raise RegistryError(f"unknown layer symbol {symbol!r}; registered: {', '.join(sorted(symbol_map()))}")


def symbols() -> list[str]:
    """Primary symbols, sorted (imports nothing)."""
    return sorted({*_SPECS, *_PENDING})


def specs() -> list[LayerSpec]:
    """Every spec, sorted by symbol (imports every built-in not loaded yet)."""
    return [get(s) for s in symbols()]


def symbol_map() -> dict[str, str]:
    """Every accepted character (primary symbols and aliases) -> primary symbol (imports nothing)."""
    out = {s: s for s in symbols()}
    out.update(_ALIASES)
    return out


def check_layer(layer: str | LayerSpec, d_model: int = 32, params: dict[str, Any] | None = None, *,
                batch: int = 2, seq_len: int = 12) -> list[str]:
    """The contract's numerical checks (:func:`layers.contract.check_behaviour`) for a symbol or spec with
    ``params``: a list of problems, empty when the layer passes. The test suite runs them on every built-in;
    ``hybridnas validate`` on every custom symbol."""
    spec = layer if isinstance(layer, LayerSpec) else get(layer)
    try:
        config = spec.make_config(params)
    except (TypeError, ValueError) as e:
        return [f"config: {e}"]
    return contract.check_behaviour(spec.cls, d_model, config, batch=batch, seq_len=seq_len)
