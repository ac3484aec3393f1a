"""Application-level registration on top of :mod:`layers.registry`: YAML import paths and per-file scoping.

The symbol -> layer API (``register``, ``unregister``, ``get``, ``primary``, ``symbols``, ``specs``,
``symbol_map``, ``check_layer``, ``LayerSpec``, ``RegistryError``) is :mod:`layers.registry`'s, re-exported so
``from hybridnas import registry; registry.register("X", MyMixer, aliases=("x",))`` works as before. A
registered symbol is usable in patterns at once.

A search-space or architecture YAML declares its own symbols (``symbols: {X: mypkg.mod:MyMixer}``).
``hybridnas.config`` registers them with ``register_path(..., scoped=True)`` after calling :func:`new_scope`,
which unregisters the symbols the previously loaded file declared: a file's symbols stay in force while it is
in use (trials build models after the load; a worker re-loads the space; an export re-loads the trial's
architecture, which carries the same symbols) and never leak into the next space or architecture loaded in
the same process. Symbols registered from Python are not scoped and stay until unregistered.
"""

from __future__ import annotations

from layers.registry import (
    BUILTINS,
    LayerSpec,
    RegistryError,
    check_layer,
    get,
    import_object,
    primary,
    register,
    register_layer,
    specs,
    symbol_map,
    symbols,
    unregister,
)

__all__ = ["BUILTINS", "LayerSpec", "RegistryError", "check_layer", "get", "import_object", "new_scope", "primary",
           "register", "register_layer", "register_path", "scoped_symbols", "specs", "symbol_map", "symbols",
           "unregister"]

_SCOPED: dict[str, LayerSpec] = {}  # symbols the file loaded last registered, with the spec it registered


def register_path(symbol: str, path: str, *, aliases: tuple[str, ...] = (), replace: bool = False,
                  scoped: bool = False) -> LayerSpec:
    """Register the class at import path ``path`` (as a YAML ``symbols:`` entry does). A symbol that already
    names that class is kept as it is. ``scoped``: the symbol belongs to the file being loaded and goes at the
    next :func:`new_scope`."""
    cls = import_object(path)
    existing = get(symbol) if symbol in symbols() else None
    if existing is not None and existing.cls is cls:
        return existing
    spec = register(symbol, cls, aliases=aliases, source=path, replace=replace)
    if scoped:
        _SCOPED[symbol] = spec
    return spec


def new_scope() -> None:
    """Start loading a new space or architecture file: unregister the symbols the previous one registered
    (unless something else has re-registered the symbol since)."""
    for symbol, spec in list(_SCOPED.items()):
        if symbol in symbols() and get(symbol) is spec:
            unregister(symbol)
    _SCOPED.clear()


def scoped_symbols() -> dict[str, str]:
    """The symbols the file loaded last registered -> their import paths."""
    return {s: spec.source for s, spec in _SCOPED.items()}
