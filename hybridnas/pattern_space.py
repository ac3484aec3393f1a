"""Pattern spaces beyond explicit lists: positional genomes and layer-share ratios.

Genome (``model.pattern.genome``): a length (fixed, list or range), the symbols allowed at every position,
optional per-position overrides (negative indices count from the end) and per-symbol count bounds::

    pattern:
      genome:
        length: {low: 4, high: 8}
        symbols: MAF
        positions: {0: M, -1: A}
        counts: {A: {min: 1, max: 2}}

Each position is one categorical Optuna parameter (``pattern.pos3``). Count bounds are hard, but Optuna's
categorical choices are fixed per parameter, so a sampled genome that breaks a bound is *repaired*
deterministically (over-used symbols replaced by the next allowed one, missing ones placed from the end)
and the trial records ``pattern_repaired``. The search then trains the repaired genes as a new trial
(``hybridnas.search.Objective``), so a trained trial's genes never need repair.

Ratio (``model.pattern.ratio``): a total length, a base symbol and shares of other symbols; each share's
layers are placed evenly over the positions still free, in the order the shares are written, as Megatron-LM
allocates attention and MLP layers in hybrid stacks::

    pattern:
      ratio:
        length: [8, 12]
        base: M
        shares: {A: [0.125, 0.25], F: 0.5}
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hybridnas import registry
from hybridnas.patterns import MAX_LAYERS
from hybridnas.schema import value_options
from hybridnas.validation import parse_searchable, suggest
from hybridnas.yamlio import PathT, Source


@dataclass
class GenomeSpace:
    length: Any  # int | list[int] | Range
    symbols: list[str]
    positions: dict[int, list[str]] = field(default_factory=dict)
    counts: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # symbol -> (min, max)

    def used_symbols(self) -> set[str]:
        used = set(self.symbols)
        for allowed in self.positions.values():
            used.update(allowed)
        return used

    def allowed_at(self, i: int, length: int) -> list[str]:
        for key in (i, i - length):
            if key in self.positions:
                return self.positions[key]
        return self.symbols


@dataclass
class RatioSpace:
    length: Any  # int | list[int] | Range
    base: str
    shares: dict[str, Any]  # symbol -> float | list[float] | Range

    def used_symbols(self) -> set[str]:
        return {self.base, *self.shares}


class RepairError(ValueError):
    pass


def _symbols(value: Any, path: PathT, src: Source) -> list[str]:
    if isinstance(value, str):
        chars = [c for c in value if not c.isspace()]
    elif isinstance(value, list) and all(isinstance(c, str) for c in value):
        chars = list(value)
    else:
        raise src.error(path, f"expected a string of layer symbols such as 'MAF', got {value!r}")
    if not chars:
        raise src.error(path, "needs at least one layer symbol")
    out = []
    for c in chars:
        try:
            out.append(registry.primary(c))
        except registry.RegistryError:
            raise src.error(path, f"unknown layer symbol {c!r}; registered: "
                                  f"{', '.join(sorted(registry.symbol_map()))}") from None
    return list(dict.fromkeys(out))


def _lengths(value: Any, path: PathT, src: Source) -> Any:
    length = parse_searchable(value, int, path, src)
    opts = value_options(length)  # a range's ends (or its values): bounds first, so a huge range is never listed
    if min(opts) < 1:
        raise src.error(path, f"lengths must be at least 1, got {min(opts)}")
    if max(opts) > MAX_LAYERS:
        raise src.error(path, f"a pattern has at most {MAX_LAYERS} layers, got length {max(opts)}")
    return length


def _mapping(value: Any, path: PathT, src: Source, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise src.error(path, f"expected a mapping {what}, got {value!r}")
    return value


def parse_pattern_space(value: dict, path: PathT, src: Source) -> GenomeSpace | RatioSpace:
    """Read a ``{genome: ...}`` or ``{ratio: ...}`` mapping (``path`` is ``model.pattern``)."""
    kinds = ["genome", "ratio"]
    if len(value) != 1 or next(iter(value)) not in kinds:
        key = next(iter(value), "")
        raise src.error(path + ((key,) if key else ()),
                        f"a pattern space is a list of patterns, {{genome: ...}} or {{ratio: ...}}; got key {key!r}"
                        + suggest(str(key), kinds))
    kind, body = next(iter(value.items()))
    p = path + (kind,)
    if not isinstance(body, dict):
        raise src.error(p, "expected a mapping")
    allowed = {"genome": ["length", "symbols", "positions", "counts"], "ratio": ["length", "base", "shares"]}[kind]
    for key in body:
        if key not in allowed:
            raise src.error(p + (key,), f"unknown key {key!r}" + suggest(str(key), allowed)
                            + f"; known keys: {', '.join(allowed)}")
    for key in ("length", "symbols") if kind == "genome" else ("length", "base"):
        if key not in body:
            raise src.error(p, f"missing required key {key!r}")
    length = _lengths(body["length"], p + ("length",), src)
    lengths = value_options(length, limit=MAX_LAYERS)
    if kind == "genome":
        symbols = _symbols(body["symbols"], p + ("symbols",), src)
        positions: dict[int, list[str]] = {}
        for k, v in _mapping(body.get("positions"), p + ("positions",), src, "POSITION: SYMBOLS").items():
            if not isinstance(k, int) or isinstance(k, bool):
                raise src.error(p + ("positions", k), f"a position is an integer index, got {k!r}")
            if k >= min(lengths) or k < -min(lengths):
                raise src.error(p + ("positions", k), f"position {k} is outside the shortest length {min(lengths)}")
            positions[k] = _symbols(v, p + ("positions", k), src)
        counts: dict[str, tuple[int, int | None]] = {}
        for sym, bounds in _mapping(body.get("counts"), p + ("counts",), src, "SYMBOL: {min, max}").items():
            bp = p + ("counts", sym)
            primary = _symbols(str(sym), bp, src)[0]
            if isinstance(bounds, int) and not isinstance(bounds, bool):
                bounds = {"max": bounds}
            if not isinstance(bounds, dict) or set(bounds) - {"min", "max"}:
                raise src.error(bp, "expected {min: N, max: N} (either may be left out)")
            lo, hi = bounds.get("min", 0), bounds.get("max")
            for name, v in (("min", lo), ("max", hi)):
                if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                    raise src.error(bp + (name,), f"expected a non-negative integer, got {v!r}")
            if hi is not None and lo > hi:
                raise src.error(bp, f"min ({lo}) is greater than max ({hi})")
            counts[primary] = (lo, hi)
        space = GenomeSpace(length, symbols, positions, counts)
        if sum(lo for lo, _ in counts.values()) > max(lengths):
            raise src.error(p + ("counts",), f"the minimum counts add up to more than the longest length "
                                             f"({max(lengths)})")
        for n in (lengths if counts else []):  # every length must admit at least one pattern (no bounds: any does)
            try:
                repair_genome([space.allowed_at(i, n)[0] for i in range(n)], space)
            except RepairError as e:
                raise src.error(p, f"no pattern of length {n} satisfies the bounds: {e}") from None
        return space
    base = _symbols(body["base"], p + ("base",), src)
    if len(base) != 1:
        raise src.error(p + ("base",), "the base is one layer symbol")
    shares: dict[str, Any] = {}
    for sym, share in _mapping(body.get("shares"), p + ("shares",), src, "SYMBOL: share").items():
        sp = p + ("shares", sym)
        primary = _symbols(str(sym), sp, src)[0]
        v = parse_searchable(share, float, sp, src)
        for opt in value_options(v):
            if not 0 <= opt <= 1:
                raise src.error(sp, f"a share is in [0, 1], got {opt}")
        shares[primary] = v
    if base[0] in shares:
        raise src.error(p + ("shares", base[0]), "the base symbol fills what the shares leave; it has no share")
    top = sum(max(value_options(v)) for v in shares.values())
    if top > 1 + 1e-9:
        raise src.error(p + ("shares",), f"the largest shares add up to {top:g} > 1")
    return RatioSpace(length, base[0], shares)


# ---------------------------------------------------------------------------------------------- sampling


def repair_genome(genome: list[str], space: GenomeSpace) -> list[str]:
    """Smallest deterministic change that meets the count bounds; raises RepairError if none exists."""
    n = len(genome)
    out = list(genome)
    counts = Counter(out)
    for i in range(n):  # too many: swap for the next allowed symbol that still has room
        sym = out[i]
        hi = space.counts.get(sym, (0, None))[1]
        if hi is not None and counts[sym] > hi:
            allowed = space.allowed_at(i, n)
            start = allowed.index(sym) if sym in allowed else -1
            for k in range(1, len(allowed) + 1):
                alt = allowed[(start + k) % len(allowed)]
                alt_hi = space.counts.get(alt, (0, None))[1]
                if alt != sym and (alt_hi is None or counts[alt] < alt_hi):
                    counts[sym] -= 1
                    counts[alt] += 1
                    out[i] = alt
                    break
    for sym, (lo, _) in space.counts.items():  # too few: place from the end where allowed and spare
        for i in range(n - 1, -1, -1):
            if counts[sym] >= lo:
                break
            cur = out[i]
            if cur == sym or sym not in space.allowed_at(i, n):
                continue
            if counts[cur] - 1 < space.counts.get(cur, (0, None))[0]:
                continue
            counts[cur] -= 1
            counts[sym] += 1
            out[i] = sym
    for sym, (lo, hi) in space.counts.items():
        if counts[sym] < lo or (hi is not None and counts[sym] > hi):
            raise RepairError(f"{sym} appears {counts[sym]} times, bounds [{lo}, {hi if hi is not None else '∞'}]")
    return out


def even_positions(free: list[int], k: int) -> list[int]:
    """``k`` of the ``free`` positions, spread evenly (centred in equal sections)."""
    m = len(free)
    return [free[int((j + 0.5) * m / k)] for j in range(k)] if k else []


def allocate(length: int, base: str, shares: dict[str, float]) -> str:
    """Place ``round(share * length)`` layers of each symbol evenly, in order; the base fills the rest."""
    layers = [base] * length
    free = list(range(length))
    for sym, share in shares.items():
        k = min(int(round(share * length)), len(free))
        chosen = even_positions(free, k)
        for i in chosen:
            layers[i] = sym
        taken = set(chosen)
        free = [i for i in free if i not in taken]
    return "".join(layers)


def sample_pattern(space: GenomeSpace | RatioSpace, trial, suggest) -> tuple[str, dict[str, Any]]:
    """Sample a pattern string; ``suggest(trial, name, value)`` asks Optuna. Returns (pattern, notes)."""
    length = int(suggest(trial, "pattern.length", space.length))
    if isinstance(space, RatioSpace):
        shares = {sym: float(suggest(trial, f"pattern.share.{sym}", v)) for sym, v in space.shares.items()}
        return allocate(length, space.base, shares), {}
    genome = []
    for i in range(length):
        allowed = space.allowed_at(i, length)
        name = f"pattern.pos{i}" if allowed == space.symbols else f"pattern.pos{i}[{''.join(allowed)}]"
        genome.append(allowed[0] if len(allowed) == 1 else suggest(trial, name, list(allowed)))
    repaired = repair_genome(genome, space)
    notes = {"pattern_repaired": "".join(genome)} if repaired != genome else {}
    return "".join(repaired), notes
