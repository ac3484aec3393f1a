"""The import graph runs one way (AST walk of every import, function-local ones included).

Rules: no cycle among the project's modules (a package ``__init__`` re-exporting its children is not one);
``layers`` imports nothing of ``hybridnas``; an op (``layers.ops``) imports no layer module; ``hybridnas.tasks``
imports neither the model, the trainer nor the config loader; the layers of DESIGN.md hold (``schema`` and
``model`` below ``train`` below ``search`` below ``cli``; ``checkpoint`` below ``export``, ``search``, ``confirm``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hybridnas", "layers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body."""
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                targets = [base_name] + [f"{base_name}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    edges[mod].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges[nxt]))))
                elif nxt in on_stack:
                    low[v] = min(low[v], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def reaches(edges: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports through any chain (child -> parent-package edges left out: a package's
    ``__init__`` lazily re-exporting its children is not a dependency of theirs)."""
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for t in edges.get(m, ()):
            if m.startswith(t + "."):
                continue
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


def test_no_import_cycle(graph):
    # child -> parent package edges are re-exports, not design cycles
    pruned = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    assert cycles(pruned) == []


def test_layers_import_nothing_of_hybridnas(graph):
    bad = {m: sorted(t for t in ts if t.startswith("hybridnas")) for m, ts in graph.items() if m.startswith("layers")}
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_ops_import_no_layer(graph):
    bad = {m: sorted(t for t in ts if t.startswith("layers") and not t.startswith("layers.ops") and t != "layers")
           for m, ts in graph.items() if m.startswith("layers.ops")}
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_tasks_know_neither_model_trainer_nor_loader(graph):
    forbidden = {"hybridnas.model", "hybridnas.train", "hybridnas.suite", "hybridnas.trainers", "hybridnas.config",
                 "hybridnas.search", "hybridnas.checkpoint"}
    for m, ts in graph.items():
        if m.startswith("hybridnas.tasks"):
            assert not ts & forbidden, (m, sorted(ts & forbidden))


@pytest.mark.parametrize("lower,upper", [
    ("hybridnas.schema", "hybridnas.config"), ("hybridnas.model", "hybridnas.train"),
    ("hybridnas.train", "hybridnas.search"), ("hybridnas.search", "hybridnas.cli"),
    ("hybridnas.checkpoint", "hybridnas.export"), ("hybridnas.checkpoint", "hybridnas.search"),
    ("hybridnas.checkpoint", "hybridnas.confirm"), ("hybridnas.model", "hybridnas.search"),
])
def test_layering(graph, lower, upper):
    # nothing below reaches what sits above it, through any chain of imports
    assert upper not in reaches(graph, lower), f"{lower} reaches {upper}"


def test_the_walk_sees_function_local_imports():
    # the guard against a vacuous graph: cli imports search only inside functions
    assert "hybridnas.search" in import_graph()["hybridnas.cli"]
