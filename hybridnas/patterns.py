"""The layer-pattern grammar: parse, expand, render, canonical form and hash.

A pattern is a string of single-character layer symbols, each one pre-norm residual block:

    pattern := item*
    item    := SYMBOL | "(" pattern ")" "x" COUNT

Whitespace is ignored anywhere. ``(MMMA)x4`` expands to 16 symbols. Aliases (``*`` for ``A``,
``-`` for ``F``) are kept as written so that published strings such as Nemotron-H's
``M-M-M-M*-...`` render back unchanged; the canonical form maps every alias to its primary symbol.

Symbols come from the registry, never from this file: a symbol registered at run time is usable at once.

Size limits, checked before anything is expanded: at most :data:`MAX_CHARS` characters (refused before parsing, so
a 5 MB string costs nothing), groups nested at most :data:`MAX_DEPTH` deep, and at most :data:`MAX_LAYERS` layers
once expanded, computed arithmetically as each group closes (``((A)x100)x100`` is refused at its second ``x100``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

MAX_LAYERS = 4096
#: longest pattern string: every layer written out, with a space between
MAX_CHARS = 4 * MAX_LAYERS
#: deepest nesting of groups
MAX_DEPTH = 32


class PatternError(ValueError):
    """A malformed pattern; ``position`` is the 0-based character index in the original string."""

    def __init__(self, message: str, pattern: str, position: int | None = None):
        self.pattern = pattern
        self.position = position
        if position is not None:
            shown, at = pattern, position
            if len(pattern) > 100:  # a window around the position, not the whole string
                lo = max(0, position - 40)
                shown = ("…" if lo else "") + pattern[lo:position + 40] + ("…" if position + 40 < len(pattern) else "")
                at = position - lo + (1 if lo else 0)
            message = f"{message}\n  {shown}\n  {' ' * at}^"
        super().__init__(message)


@dataclass(frozen=True)
class Group:
    """``(items)xcount``."""

    items: tuple[Symbol | Group, ...]
    count: int


@dataclass(frozen=True)
class Symbol:
    """One block, as written (``char`` may be an alias)."""

    char: str
    position: int


Node = Symbol | Group


def _known_symbols(symbols: dict[str, str] | None) -> dict[str, str]:
    """Map of every accepted character (symbols and aliases) to its primary symbol."""
    if symbols is not None:
        return symbols
    from hybridnas import registry

    return registry.symbol_map()


def _listing(symbols: dict[str, str]) -> str:
    parts = []
    for ch in sorted(symbols):
        primary = symbols[ch]
        parts.append(ch if primary == ch else f"{ch} (={primary})")
    return ", ".join(parts)


def parse(pattern: str, symbols: dict[str, str] | None = None) -> tuple[Node, ...]:
    """Parse ``pattern`` into a tree of symbols and groups.

    ``symbols`` maps accepted characters to primary symbols; by default the registry's.
    Raises :class:`PatternError` naming the position for a bad symbol, an unbalanced
    parenthesis, a missing or zero repeat count, or an empty pattern.
    """
    if not isinstance(pattern, str):
        raise PatternError(f"a pattern must be a string, got {type(pattern).__name__}", str(pattern))
    if len(pattern) > MAX_CHARS:  # before anything else: a long string is never parsed, let alone expanded
        raise PatternError(f"a pattern of {len(pattern)} characters; at most {MAX_CHARS} are allowed", "")
    known = _known_symbols(symbols)
    pos = 0
    n = len(pattern)

    def fail(message: str, at: int) -> PatternError:
        return PatternError(f"{message} at position {at}; registered symbols: {_listing(known)}", pattern, at)

    def skip_ws() -> None:
        nonlocal pos
        while pos < n and pattern[pos].isspace():
            pos += 1

    def parse_seq(depth: int, open_pos: int | None) -> list[Node]:
        nonlocal pos
        if depth > MAX_DEPTH:  # one Python frame per level: refused long before the recursion limit
            raise PatternError(f"groups nest more than {MAX_DEPTH} deep (at position {open_pos})", "")
        items: list[Node] = []
        while True:
            skip_ws()
            if pos >= n:
                if depth > 0:
                    raise fail("unbalanced '(': no matching ')'", open_pos)
                return items
            ch = pattern[pos]
            if ch == "(":
                start = pos
                pos += 1
                inner = parse_seq(depth + 1, start)
                # parse_seq returns at the matching ')'
                pos += 1
                if not inner:
                    raise fail("empty group '()'", start)
                skip_ws()
                if pos >= n or pattern[pos] not in "xX×":
                    raise fail("a group must be followed by a repeat count, as in (MMMA)x4", min(pos, n - 1))
                pos += 1
                skip_ws()
                digits_start = pos
                while pos < n and pattern[pos] in "0123456789":  # not isdigit(): int('²') fails
                    pos += 1
                if digits_start == pos:
                    raise fail("missing repeat count after 'x'", min(pos, n - 1))
                digits = pattern[digits_start:pos].lstrip("0") or "0"
                if len(digits) > len(str(MAX_LAYERS)):  # int() of thousands of digits is slow, then refused
                    raise PatternError(f"repeat count of {len(digits)} digits at position {digits_start}: a pattern "
                                       f"has at most {MAX_LAYERS} layers", "")
                count = int(digits)
                if count < 1:
                    raise fail("repeat count must be at least 1", digits_start)
                group = Group(tuple(inner), count)
                layers = _count((group,))
                if layers > MAX_LAYERS:
                    raise PatternError(f"the group at position {start} expands to {layers} layers; at most "
                                       f"{MAX_LAYERS} are allowed", "")
                items.append(group)
            elif ch == ")":
                if depth == 0:
                    raise fail("unbalanced ')': no matching '('", pos)
                return items
            elif ch in known:
                items.append(Symbol(ch, pos))
                pos += 1
            else:
                raise fail(f"unknown layer symbol {ch!r}", pos)

    tree = parse_seq(0, None)
    if not tree:
        raise PatternError(f"empty pattern: it needs at least one layer symbol; registered symbols: "
                           f"{_listing(known)}", pattern)
    n_layers = _count(tuple(tree))
    if n_layers > MAX_LAYERS:
        raise PatternError(f"pattern expands to {n_layers} layers; at most {MAX_LAYERS} are allowed", pattern)
    return tuple(tree)


def _count(nodes: tuple[Node, ...]) -> int:
    return sum(1 if isinstance(node, Symbol) else node.count * _count(node.items) for node in nodes)


def _expand_nodes(nodes: tuple[Node, ...]) -> list[str]:
    out: list[str] = []
    for node in nodes:
        if isinstance(node, Symbol):
            out.append(node.char)
        else:
            inner = _expand_nodes(node.items)
            out.extend(inner * node.count)
    return out


def expand(pattern: str, symbols: dict[str, str] | None = None) -> str:
    """Expand groups, drop whitespace; aliases are kept as written. ``(MA)x2 -`` -> ``MAMA-``."""
    return "".join(_expand_nodes(parse(pattern, symbols)))


def _render_nodes(nodes: tuple[Node, ...]) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, Symbol):
            parts.append(node.char)
        else:
            parts.append(f"({_render_nodes(node.items)})x{node.count}")
    return "".join(parts)


def render(tree: tuple[Node, ...]) -> str:
    """Render a parsed tree back to a string: groups kept, whitespace dropped."""
    return _render_nodes(tree)


def normalize(pattern: str, symbols: dict[str, str] | None = None) -> str:
    """The pattern re-rendered from its parse (whitespace removed, groups and aliases kept)."""
    return render(parse(pattern, symbols))


def to_primary(pattern: str, symbols: dict[str, str] | None = None) -> str:
    """Expanded pattern with every alias replaced by its primary symbol: ``M-M*`` -> ``MFMA``."""
    known = _known_symbols(symbols)
    return "".join(known[ch] for ch in expand(pattern, known))


def layer_symbols(pattern: str, symbols: dict[str, str] | None = None) -> list[str]:
    """Primary symbol of each layer, in order."""
    return list(to_primary(pattern, symbols))


def used_symbols(pattern: str, symbols: dict[str, str] | None = None) -> list[str]:
    """Primary symbols that occur in the pattern, in order of first use."""
    seen: dict[str, None] = {}
    for ch in to_primary(pattern, symbols):
        seen.setdefault(ch, None)
    return list(seen)


def canonical(pattern: str, params: dict[str, dict[str, Any]] | None = None,
              symbols: dict[str, str] | None = None) -> str:
    """Canonical form: the expanded primary-symbol string plus the parameters of every symbol it uses.

    ``params`` maps a symbol (alias or primary) to that symbol's complete parameter dict. Parameters of
    symbols the pattern does not use are ignored, so they never make two equal architectures differ.
    """
    known = _known_symbols(symbols)
    flat = to_primary(pattern, known)
    merged: dict[str, dict[str, Any]] = {}
    for sym, values in (params or {}).items():
        primary = known.get(sym, sym)
        merged.setdefault(primary, {}).update(values or {})
    used = {sym: dict(sorted(merged.get(sym, {}).items())) for sym in sorted(set(flat))}
    return flat + "|" + json.dumps(used, sort_keys=True, separators=(",", ":"), default=str)


def arch_hash(pattern: str, params: dict[str, dict[str, Any]] | None = None, extra: dict[str, Any] | None = None,
              symbols: dict[str, str] | None = None) -> str:
    """Short stable hash of the canonical form (plus model-wide ``extra`` such as d_model)."""
    text = canonical(pattern, params, symbols)
    if extra:
        text += "|" + json.dumps(extra, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
