"""Values from YAML checked against the schema's types, with ``file:line: field.path: message`` errors.

pydantic does the checking; this module says which YAML semantics it checks with and words its errors:

- bools are not integers, integers and strings are not interchangeable (pydantic's strict mode), but a float
  field takes an integer (widened) or a numeric string (YAML 1.1 reads ``1e-3`` as a string);
- a dataclass is read from a mapping whose unknown keys are errors with a did-you-mean, missing required keys are
  errors, and the bounds declared on its fields (``Annotated[int, Gt(0)]``) are enforced;
- each pydantic error's ``loc`` is appended to the YAML path to find the line, and its ``type``/``ctx`` become the
  message, so errors read as before pydantic ("expected an integer, got 'big'", "must be in [0, 1], got 1.5").

Searchable values (a list of choices or a ``{low, high, log, step}`` range, :func:`parse_searchable`) are built on
top: each choice is one :func:`check_value`, the range one :func:`parse_dataclass`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Iterable
from typing import Annotated, Any, Literal, NotRequired, Required, Union

import annotated_types as at
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Strict, StrictBool, StrictInt, StrictStr, TypeAdapter
from pydantic import ValidationError as PydanticError
from typing_extensions import TypedDict  # pydantic needs typing_extensions' TypedDict before Python 3.12

from hybridnas.schema import Range, TrainConfig
from hybridnas.yamlio import ConfigErrors, PathT, Source


def suggest(word: Any, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest option, or an empty string."""
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return type_name(typing.get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return getattr(origin, "__name__", str(tp))
    return getattr(tp, "__name__", str(tp))


# ----------------------------------------------------------------------------------------------------------
# schema types -> pydantic types with YAML semantics


def _yaml_number(value: Any) -> Any:
    if isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 as a string; accept it as users expect
            return float(value)
        except ValueError:
            pass
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


@functools.cache
def _pydantic_type(tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is int:
        return StrictInt
    if tp is bool:
        return StrictBool
    if tp is str:
        return StrictStr
    if tp is float:  # strict: ints are widened to float, bools are refused
        return Annotated[float, BeforeValidator(_yaml_number), Strict()]
    if origin is Annotated:
        return Annotated[(_pydantic_type(args[0]), *tp.__metadata__)]
    if origin in (Union, types.UnionType):
        return Union[tuple(_pydantic_type(a) for a in args)]  # noqa: UP007 (built from a runtime tuple)
    if origin is list:
        return list[_pydantic_type(args[0]) if args else Any]
    if origin is dict:
        value = _pydantic_type(args[1]) if args else Any
        return dict[Annotated[str, BeforeValidator(str)], value]  # YAML keys such as 1 or true read as strings
    if dataclasses.is_dataclass(tp):
        return _dataclass_type(tp)
    return tp  # Any, None, Literal


def _dataclass_type(cls: type) -> Any:
    """A TypedDict of ``cls``'s fields (unknown keys forbidden) that builds ``cls`` from the keys given."""
    hints = _hints(cls)
    keys = {}
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        keys[f.name] = (Required if required else NotRequired)[_pydantic_type(hints[f.name])]
    mapping = TypedDict(cls.__name__, keys)  # type: ignore[operator]
    mapping.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]
    return Annotated[mapping, AfterValidator(lambda data: cls(**data))]


@functools.cache
def _adapter(tp: Any) -> TypeAdapter:
    return TypeAdapter(_pydantic_type(tp))


# ----------------------------------------------------------------------------------------------------------
# pydantic errors -> messages


def _peel(tp: Any) -> tuple[Any, list[Any], bool]:
    """``tp`` without ``Annotated`` and ``| None``: (type, the metadata found, whether null is allowed)."""
    meta: list[Any] = []
    nullable = False
    while True:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is Annotated:
            tp = args[0]
            for m in args[1:]:
                meta.extend([m, *m] if isinstance(m, at.Interval) else m if isinstance(m, at.GroupedMetadata) else [m])
        elif origin in (Union, types.UnionType) and type(None) in args:
            nullable = True
            rest = tuple(a for a in args if a is not type(None))
            tp = rest[0] if len(rest) == 1 else Union[rest]  # noqa: UP007
        else:
            return tp, meta, nullable


def _type_at(tp: Any, loc: tuple) -> tuple[Any, list[Any], bool, int]:
    """The schema type a pydantic ``loc`` points at, its metadata, whether it is nullable, and how much of
    ``loc`` leads to it (a union stops the walk: pydantic adds its members' names to ``loc``)."""
    for depth, part in enumerate(loc):
        tp = _peel(tp)[0]
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            tp = _hints(tp).get(part, Any)
        elif origin is list:
            tp = args[0] if args else Any
        elif origin is dict:
            tp = args[1] if args else Any
        else:
            return (*_peel(tp), depth)
    return (*_peel(tp), len(loc))


def _expected(tp: Any, nullable: bool) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
             dict: "a mapping", type(None): "null"}
    name = names.get(typing.get_origin(tp) or tp)
    if name is None:
        name = f"a mapping of {tp.__name__} fields" if dataclasses.is_dataclass(tp) else type_name(tp)
    return name + (" or null" if nullable and tp is not type(None) else "")


def _bounds(meta: list[Any], kind: str = "") -> str:
    """How a bound reads: an ``Interval`` as a whole (``in [0, 1]``); otherwise the side ``kind`` broke (a lower
    bound such as ``positive``, or an upper bound written apart from it, ``at most 65536``)."""
    interval = next((m for m in meta if isinstance(m, at.Interval)), None)
    lo = next((m for m in meta if isinstance(m, (at.Gt, at.Ge))), None)
    hi = next((m for m in meta if isinstance(m, (at.Lt, at.Le))), None)
    if interval is not None and lo is not None and hi is not None:
        left = f"({lo.gt}" if isinstance(lo, at.Gt) else f"[{lo.ge}"
        right = f"{hi.lt})" if isinstance(hi, at.Lt) else f"{hi.le}]"
        return f"in {left}, {right}"
    if hi is not None and (kind in ("less_than", "less_than_equal") or lo is None):
        return f"< {hi.lt}" if isinstance(hi, at.Lt) else f"at most {hi.le}"
    if isinstance(lo, at.Gt):
        return "positive" if lo.gt == 0 else f"> {lo.gt}"
    if isinstance(lo, at.Ge):
        return ">= 0" if lo.ge == 0 else f"at least {lo.ge}"
    return "within its bounds"


_TYPE_ERRORS = {"int_type", "float_type", "bool_type", "string_type", "list_type", "dict_type", "none_required"}
_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _format(root: Any, err: dict[str, Any]) -> tuple[tuple, str]:
    """(loc, message) of one pydantic error against schema type ``root``."""
    kind, loc, value = err["type"], tuple(err["loc"]), err["input"]
    if kind == "extra_forbidden":
        names = [f.name for f in dataclasses.fields(_type_at(root, loc[:-1])[0])]
        return loc, f"unknown key {loc[-1]!r}" + suggest(loc[-1], names) + f"; known keys: {', '.join(names)}"
    if kind == "missing":
        return loc[:-1], f"missing required key {loc[-1]!r}"
    tp, meta, nullable, depth = _type_at(root, loc)
    if typing.get_origin(tp) in (Union, types.UnionType):  # one error per member: all become this one message
        return loc[:depth], f"expected {type_name(tp)}{' or null' if nullable else ''}, got {value!r}"
    if kind == "literal_error":
        options = typing.get_args(tp)
        return loc, (f"must be one of {', '.join(map(repr, options))}, got {value!r}"
                     + suggest(value, [str(o) for o in options]))
    if kind in _TYPE_ERRORS:
        return loc, f"expected {_expected(tp, nullable)}, got {value!r}"
    if kind in _BOUND_ERRORS:
        return loc, f"must be {_bounds(meta, kind)}{' or null' if nullable else ''}, got {value}"
    if kind == "predicate_failed":
        pred = next(m for m in meta if isinstance(m, at.Predicate))
        return loc, f"must be {pred.func.__doc__}, got {value!r}"
    return loc, err["msg"]


def _rank(err: dict[str, Any]) -> int:
    # unknown keys first, then wrong types, then bounds: the order the hand-written checks reported them in
    return 0 if err["type"] == "extra_forbidden" else 2 if err["type"] in _BOUND_ERRORS | {"predicate_failed"} else 1


def _validate(tp: Any, value: Any) -> tuple[Any, list[tuple[tuple, str]]]:
    try:
        return _adapter(tp).validate_python(value), []
    except PydanticError as e:
        problems: dict[tuple, str] = {}
        for err in sorted(e.errors(), key=_rank):
            loc, message = _format(tp, err)
            problems.setdefault(loc, message)  # a union reports each member's error at the same loc
        return None, list(problems.items())


# ----------------------------------------------------------------------------------------------------------
# the checks the loader uses


def check_value(value: Any, tp: Any, path: PathT, src: Source) -> Any:
    """Check ``value`` against type ``tp``; return it (ints widened to float where a float is wanted)."""
    out, problems = _validate(tp, value)
    if len(problems) == 1:
        loc, message = problems[0]
        raise src.error(path + loc, message)
    if problems:
        raise ConfigErrors([src.error(path + loc, message) for loc, message in problems])
    return out


def parse_dataclass(cls: type, data: Any, path: PathT, src: Source) -> Any:
    """Build dataclass ``cls`` from a mapping (None: all defaults); unknown keys are errors with a suggestion."""
    return check_value({} if data is None else data, cls, path, src)


def field_problems(cls: type, values: dict[str, Any]) -> list[tuple[str, str]]:
    """Problems with some fields of ``cls`` (types and declared bounds) as (field, message) pairs."""
    _, problems = _validate(cls, values)
    return [(str(loc[0]) if loc else "", message) for loc, message in problems]


def check_train(cfg: TrainConfig) -> list[tuple[str, str]]:
    """Problems with a concrete train config (a sampled trial's) as (field, message) pairs."""
    return field_problems(TrainConfig, dataclasses.asdict(cfg))


def _is_range(value: Any) -> bool:
    return isinstance(value, dict) and ("low" in value or "high" in value)


def parse_searchable(value: Any, tp: Any, path: PathT, src: Source) -> Any:
    """A fixed value, a list of choices, or a :class:`Range`; each checked against ``tp``."""
    if isinstance(value, list):
        if not value:
            raise src.error(path, "an empty list of choices")
        out = [check_value(v, tp, path + (i,), src) for i, v in enumerate(value)]
        if len({repr(v) for v in out}) != len(out):
            raise src.error(path, f"duplicate choices in {value!r}")
        return out
    if _is_range(value):
        r = parse_dataclass(Range, value, path, src)
        for k in ("low", "high", "step"):
            if getattr(r, k) is not None and not math.isfinite(getattr(r, k)):
                raise src.error(path + (k,), f"must be a finite number, got {getattr(r, k)!r}")
        base = set(typing.get_args(tp)) if typing.get_origin(tp) in (Union, types.UnionType) else {tp}
        if not base & {int, float}:
            raise src.error(path, f"a {{low, high}} range needs a numeric field, this one is {type_name(tp)}")
        if float not in base:
            for k in ("low", "high", "step"):
                if getattr(r, k) is not None and float(getattr(r, k)) != int(getattr(r, k)):
                    raise src.error(path + (k,), f"this field takes integers, got {getattr(r, k)!r}")
            r.low, r.high = int(r.low), int(r.high)
            r.step = None if r.step is None else int(r.step)
        if r.low > r.high:
            raise src.error(path, f"low ({r.low}) is greater than high ({r.high})")
        if r.log and r.low <= 0:
            raise src.error(path + ("low",), "a log range needs low > 0")
        if r.log and r.step is not None:
            raise src.error(path, "a range cannot have both log and step")
        return r
    return check_value(value, tp, path, src)


def check_search_overrides(settings: Any, overrides: dict[str, Any]) -> Any:
    """``settings`` (a :class:`~hybridnas.schema.SearchSettings`) with command-line ``overrides`` applied: values
    may be strings (``"0.5"``), converted by the field's current type; unknown fields and values out of their
    declared bounds are a ``ValueError`` naming the field."""
    current = dataclasses.asdict(settings)
    merged = dict(current)
    for key, value in overrides.items():
        if key not in current:
            raise ValueError(f"unknown search setting {key!r}" + suggest(key, current)
                             + f"; known: {', '.join(current)}")
        old = current[key]
        if isinstance(value, str) and isinstance(old, (int, float)) and not isinstance(old, bool):
            try:
                value = type(old)(float(value)) if isinstance(old, int) else float(value)
            except ValueError:
                raise ValueError(f"search.{key}: expected a number, got {value!r}") from None
        merged[key] = value
    problems = field_problems(type(settings), merged)
    if problems:
        fld, message = problems[0]
        raise ValueError(f"search.{fld}: {message}")
    return type(settings)(**merged)
