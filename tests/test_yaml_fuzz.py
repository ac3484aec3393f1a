"""Seeded fuzz of the YAML loader: random mutations of every ready space in search_spaces/, each loaded through
`hybridnas.config.load_space(path)` (what `hybridnas validate` and `hybridnas search` call). No case may end in a
traceback: each one loads, or raises the project's ConfigError naming the file and a line.

Mutations: on the parsed data (then written back as YAML): delete a key; replace a value by None, a huge, negative
or non-finite number, a string, a list or a mapping (a range among them). On the text: duplicate a key's line,
truncate the text, insert junk characters.
"""

from __future__ import annotations

import copy
import math
import random
import traceback
from pathlib import Path

import pytest
import yaml

from hybridnas.config import load_space
from hybridnas.yamlio import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted(p for p in (ROOT / "search_spaces").glob("*.yaml")
                if not p.name.startswith("distill_"))  # not search spaces: tests/test_distill.py reads them
CASES_PER_SPACE = 60
SEED = 20261129

REPLACEMENTS = [
    None, 0, 1, -1, -10 ** 9, 2 ** 31, 2 ** 63, -(2 ** 63), 10 ** 30, 10 ** 400, 1.5, -0.5, 1e308, -1e308,
    math.nan, math.inf, -math.inf, 1e-320, True, False, "", " ", "x", "AA", "(A)x4096", "((", "mqar", "lm",
    "1e-3", "nan", "-", "\u00e9\u4e2d", [], [None], [1, "a"], [[1]], [{"a": 1}], ["AA", "AA"], {}, {"a": 1},
    {"low": 1, "high": 0}, {"low": 2, "high": 10 ** 12}, {"low": 1.0e-3, "high": math.inf}, {"low": 0.5, "high": 2.5},
    {"low": 1, "high": 8, "step": 3}, {"low": 1, "high": 4, "log": True, "step": 1}, {"genome": {}},
    {"ratio": {"length": 4, "base": "M"}}, {"genome": {"length": 10 ** 6, "symbols": "A"}},
    {"name": {"a": 1}}, {"name": ["mqar"]}, {"n_heads": 3}, {"A": {"n_heads": 10 ** 30}},
]
JUNK = [":", "{", "}", "[", "]", ",", "-", "? ", "&a ", "*a", "!!python/object/apply:os.system ['true']", "%YAML",
        "\t", "\x00", "\x07", "\x85", "\u2028", "\ufeff", "'", '"', "#", "|", ">", "@", "`", "\\", "\n", "  ", "é",
        "x" * 500, "(" * 200, "0" * 50]


def _paths(data, prefix=()):
    """Every (path, value) inside ``data`` (mappings and lists), the root excluded."""
    if isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list):
        items = list(enumerate(data))
    else:
        return
    for key, value in items:
        yield prefix + (key,), value
        yield from _paths(value, prefix + (key,))


def _parent(data, path):
    for key in path[:-1]:
        data = data[key]
    return data


def _dump(data) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def mutate(text: str, rng: random.Random) -> tuple[str, str]:
    """One random mutation of ``text``: (the mutated text, what was done)."""
    kind = rng.choice(["delete", "replace", "replace", "replace", "duplicate", "truncate", "junk"])
    data = yaml.safe_load(text)
    paths = list(_paths(data))
    if kind == "delete":
        path, _ = rng.choice(paths)
        data = copy.deepcopy(data)
        parent = _parent(data, path)
        del parent[path[-1]]
        return _dump(data), f"delete {path}"
    if kind == "replace":
        path, _ = rng.choice(paths)
        data = copy.deepcopy(data)
        value = copy.deepcopy(rng.choice(REPLACEMENTS))
        _parent(data, path)[path[-1]] = value
        return _dump(data), f"replace {path} by {value!r:.80}"
    lines = text.splitlines(keepends=True)
    if kind == "duplicate":
        keyed = [i for i, line in enumerate(lines) if ":" in line and not line.lstrip().startswith("#")]
        i = rng.choice(keyed)
        return "".join(lines[:i + 1] + [lines[i]] + lines[i + 1:]), f"duplicate line {i + 1}"
    if kind == "truncate":
        cut = rng.randrange(len(text))
        return text[:cut], f"truncate at {cut}"
    at = rng.randrange(len(text) + 1)
    junk = "".join(rng.choice(JUNK) for _ in range(rng.randint(1, 3)))
    return text[:at] + junk + text[at:], f"insert {junk!r:.60} at {at}"


def test_yaml_loader_fuzz(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the lm space's data/prose.txt is relative to the repository
    assert len(SPACES) >= 6
    problems, outcomes = [], {"loaded": 0, "config error": 0, "traceback": 0}
    for space in SPACES:
        rng = random.Random(f"{SEED}:{space.name}")
        text = space.read_text(encoding="utf-8")
        for n in range(CASES_PER_SPACE):
            mutated, what = mutate(text, rng)
            path = tmp_path / f"{space.stem}-{n:03d}.yaml"
            path.write_text(mutated, encoding="utf-8", errors="surrogatepass")
            case = f"{space.name} #{n}: {what}"
            try:
                load_space(str(path))
                outcomes["loaded"] += 1
            except ConfigError as e:
                outcomes["config error"] += 1
                if e.file != str(path) or not isinstance(e.line, int) or e.line < 1 or not e.message:
                    problems.append(f"{case}: ConfigError without file and line: {e}")
            except Exception:  # noqa: BLE001  (the point: any other exception is a traceback for the user)
                outcomes["traceback"] += 1
                problems.append(f"{case}:\n{traceback.format_exc(limit=-3)}")
    total = sum(outcomes.values())
    print(f"yaml fuzz: {total} cases over {len(SPACES)} spaces: {outcomes}")
    assert not problems, f"{len(problems)} of {total} cases ended badly:\n" + "\n\n".join(problems[:20])
    assert total == len(SPACES) * CASES_PER_SPACE >= 300
    assert outcomes["loaded"] and outcomes["config error"], outcomes  # mutations that load and that do not


@pytest.mark.parametrize("space", SPACES, ids=lambda p: p.stem)
def test_ready_spaces_load_unmutated(space, monkeypatch):
    monkeypatch.chdir(ROOT)
    load_space(str(space))
