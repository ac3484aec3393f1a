"""hybridnas.validation: pydantic errors worded as file:line: field.path: message; schema.py stays import-light."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from hybridnas.schema import SearchSettings, TrainConfig
from hybridnas.validation import check_train, check_value, field_problems, parse_dataclass
from hybridnas.yamlio import ConfigError, load_text


@dataclass
class Inner:
    a: int
    kind: Literal["p", "q"] | None = None


@dataclass
class Outer:
    inner: Inner
    items: list[Inner] = field(default_factory=list)
    either: int | str = 0


@pytest.mark.parametrize(("value", "path", "message"), [
    ({"inner": {"a": 1, "zz": 2}}, ("x", "inner", "zz"), "unknown key 'zz'; known keys: a, kind"),
    ({"inner": {"kind": "p"}}, ("x", "inner"), "missing required key 'a'"),
    ({"inner": {"a": 1, "kind": "r"}}, ("x", "inner", "kind"), "must be one of 'p', 'q', got 'r'"),
    ({"inner": {"a": 1}, "items": [{"a": "one"}]}, ("x", "items", 0, "a"), "expected an integer, got 'one'"),
    ({"inner": {"a": 1}, "either": 1.5}, ("x", "either"), "expected int or str, got 1.5"),
    ({"inner": 3}, ("x", "inner"), "expected a mapping of Inner fields, got 3"),
])
def test_nested_errors_name_the_field_path(value, path, message):
    _, src = load_text("x: 1\n", "n.yaml")
    with pytest.raises(ConfigError) as info:
        check_value(value, Outer, ("x",), src)
    assert info.value.path == path and info.value.line == 1
    assert info.value.message == message


def test_yaml_semantics():
    _, src = load_text("x: 1\n", "n.yaml")
    assert check_value("1e-3", float, ("x",), src) == pytest.approx(1e-3)  # YAML 1.1 reads 1e-3 as a string
    assert type(check_value(2, float, ("x",), src)) is float
    assert check_value({1: "a"}, dict[str, str], ("x",), src) == {"1": "a"}
    for value, tp in ((True, int), (True, float), (1, bool), ("3", int), (3, str)):
        with pytest.raises(ConfigError):
            check_value(value, tp, ("x",), src)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("n_trials", 0, "must be positive, got 0"),
    ("timeout", -1.0, "must be positive or null, got -1.0"),
    ("workers", 0, "must be at least 1, got 0"),
    ("confirm_top", -1, "must be >= 0, got -1"),
    ("n_startup_trials", -1, "must be >= 0, got -1"),
    ("constraints", {"params": 0}, "must be positive, got 0"),
])
def test_search_settings_bounds(key, value, message):
    _, src = load_text(f"search: {{{key}: 1}}\n", "s.yaml")
    with pytest.raises(ConfigError) as info:
        parse_dataclass(SearchSettings, {key: value}, ("search",), src)
    assert info.value.path[:2] == ("search", key)
    assert info.value.message == message


def test_field_problems_checks_only_the_given_fields():
    assert field_problems(TrainConfig, {"lr": 0.5}) == []
    assert field_problems(TrainConfig, {"beta2": 1.5}) == [("beta2", "must be in [0, 1], got 1.5")]


def test_check_train_rejects_nan():
    assert check_train(TrainConfig(lr=float("nan"))) == [("lr", "must be positive, got nan")]


def test_schema_imports_neither_yaml_nor_pydantic_nor_the_loader():
    code = ("import sys, hybridnas.schema, hybridnas.model; "
            "print(sorted(m for m in ('yaml', 'pydantic', 'hybridnas.config', 'hybridnas.tasks') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
