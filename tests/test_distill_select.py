"""Budgeted choice of the layers that stay attention (hybridnas.distill_select): the exact MILP against brute force
on many random small cases, greedy's known shortfall, refusals, and the state-bytes costs against the assembled
models' HybridLM.state_size."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from hybridnas import patterns
from hybridnas.distill_select import (
    base_cost,
    brute_force,
    kept_budget,
    layer_costs,
    select_layers,
    student_model_config,
)
from hybridnas.model import HybridLM
from hybridnas.schema import ModelConfig


def _utility(scores, chosen):
    return sum(scores[i] for i in chosen)


def _cost(costs, chosen):
    return sum(costs[i] for i in chosen)


def _random_case(rng: random.Random):
    n = rng.randint(1, 10)
    scores = [round(rng.uniform(-3, 5), 3) for _ in range(n)]
    if rng.random() < 0.2:  # ties
        scores = [float(rng.randint(-2, 3)) for _ in range(n)]
    costs = [round(rng.uniform(0, 10), 3) for _ in range(n)]
    if rng.random() < 0.25:  # some negative costs (a student whose state is bigger than the KV cache)
        costs = [round(rng.uniform(-4, 10), 3) for _ in range(n)]
    if rng.random() < 0.25:  # integer costs: budgets that some subsets meet exactly
        costs = [float(rng.randint(0, 6)) for _ in range(n)]
    k = rng.choice([None, rng.randint(0, n)])
    budget = rng.choice([None, round(rng.uniform(-2, sum(abs(c) for c in costs)), 3),
                         float(rng.randint(0, 12))])
    if k is None and budget is None:
        budget = 5.0
    return scores, k, costs, budget


def test_milp_equals_brute_force_on_random_small_cases():
    rng = random.Random(1234)
    solved = infeasible = 0
    for _ in range(400):
        scores, k, costs, budget = _random_case(rng)
        use_costs = costs if budget is not None else rng.choice([None, costs])
        try:
            want = brute_force(scores, k, use_costs, budget)
        except ValueError:
            with pytest.raises(ValueError):
                select_layers(scores, k, use_costs, budget, method="milp")
            infeasible += 1
            continue
        got = select_layers(scores, k, use_costs, budget, method="milp")
        assert got == sorted(got) and len(set(got)) == len(got)
        assert math.isclose(_utility(scores, got), _utility(scores, want), abs_tol=1e-9), (scores, k, costs, budget)
        if k is not None:
            assert len(got) == k
        if budget is not None:
            assert _cost(costs, got) <= budget + 1e-9
        if k is None:  # the fewest layers among the best choices: brute force says how many
            assert len(got) == len(want)
        solved += 1
    assert solved > 250 and infeasible > 10  # both branches exercised


def test_budget_only_never_keeps_a_non_positive_score_when_costs_are_non_negative():
    rng = random.Random(7)
    for _ in range(100):
        n = rng.randint(1, 10)
        scores = [float(rng.randint(-3, 3)) for _ in range(n)]
        costs = [float(rng.randint(0, 5)) for _ in range(n)]
        got = select_layers(scores, None, costs, float(rng.randint(0, 15)))
        assert all(scores[i] > 0 for i in got)


def test_negative_score_kept_when_its_negative_cost_makes_room():
    # item 0 is useless but frees 10 units of budget; item 1 only fits alongside it
    assert select_layers([-1.0, 5.0], None, [-10.0, 10.0], 0.0) == [0, 1]
    assert brute_force([-1.0, 5.0], None, [-10.0, 10.0], 0.0) == [0, 1]


def test_greedy_is_suboptimal_where_milp_is_exact():
    scores, costs, budget = [10.0, 6.0, 6.0, 1.0], [9.0, 5.0, 5.0, 1.0], 10.0
    greedy = select_layers(scores, 2, costs, budget, method="greedy")
    exact = select_layers(scores, 2, costs, budget, method="milp")
    assert greedy == [0, 3] and _utility(scores, greedy) == 11.0
    assert exact == [1, 2] and _utility(scores, exact) == 12.0
    assert exact == brute_force(scores, 2, costs, budget)
    # budget only: greedy takes the best item and then nothing fits
    assert select_layers([10.0, 6.0, 6.0], None, [10.0, 5.0, 5.0], 10.0, method="greedy") == [0]
    assert select_layers([10.0, 6.0, 6.0], None, [10.0, 5.0, 5.0], 10.0, method="milp") == [1, 2]


def test_greedy_order_and_ties():
    assert select_layers([1.0, 3.0, 3.0, 2.0], 2, method="greedy") == [1, 2]
    assert select_layers([1.0, 3.0, 3.0, 2.0], 1, method="greedy") == [1]  # tie broken by index
    assert select_layers([1.0, 3.0, 3.0, 2.0], 2) == [1, 2]
    assert select_layers([5.0, 4.0], 0) == []


def test_greedy_that_cannot_fill_k_says_so():
    with pytest.raises(ValueError, match="greedy.*milp"):
        select_layers([10.0, 6.0, 6.0], 2, [10.0, 5.0, 5.0], 10.0, method="greedy")


def test_infeasible_names_k_budget_and_cheapest_cost():
    with pytest.raises(ValueError) as e:
        select_layers([1.0, 2.0, 3.0], 2, [4.0, 5.0, 6.0], 8.5)
    msg = str(e.value)
    assert "k=2" in msg and "8.5" in msg and "9" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="cheapest.*-3"):
        select_layers([1.0, 2.0], None, [-3.0, 1.0], -4.0)


@pytest.mark.parametrize("scores,k,costs,budget,match", [
    ([1.0, float("nan")], 1, None, None, r"scores\[1\].*nan"),
    ([1.0, float("inf")], 1, None, None, r"scores\[1\].*inf"),
    ([1.0, 2.0], 1, [1.0, float("nan")], 3.0, r"costs\[1\]"),
    ([1.0, 2.0], 1, [1.0, 1.0], float("nan"), "budget"),
    ([1.0, 2.0], 3, None, None, "k=3"),
    ([1.0, 2.0], -1, None, None, "k=-1"),
    ([1.0, 2.0], None, None, None, "k or a budget"),
    ([1.0, 2.0], 1, None, 3.0, "costs"),
    ([1.0, 2.0], 1, [1.0], 3.0, "costs"),
    ([1.0, 2.0], 1, None, None, "method"),
])
def test_bad_arguments_refused(scores, k, costs, budget, match):
    method = "nope" if match == "method" else "milp"
    with pytest.raises(ValueError, match=match):
        select_layers(scores, k, costs, budget, method=method)


# ---------------------------------------------------------------- costs


TEACHER = ModelConfig(vocab_size=64, d_model=32, pattern="(AF)x4", layers={"A": {"n_heads": 4, "n_kv_heads": 2}})
POSITIONS = [0, 2, 4, 6]
STUDENT = {"d_state": 8}


def test_state_bytes_costs_match_the_assembled_models():
    seq_len, batch = 96, 2
    costs = layer_costs(TEACHER, POSITIONS, "M", STUDENT, "state_bytes", seq_len, batch)
    teacher_bytes = HybridLM(TEACHER).state_size(batch, seq_len)
    for j, pos in enumerate(POSITIONS):
        others = [p for p in POSITIONS if p != pos]
        one_replaced = HybridLM(student_model_config(TEACHER, others, "M", STUDENT)).state_size(batch, seq_len)
        assert costs[j] == teacher_bytes - one_replaced
    all_student = HybridLM(student_model_config(TEACHER, [], "M", STUDENT)).state_size(batch, seq_len)
    assert base_cost(TEACHER, POSITIONS, "M", STUDENT, seq_len, batch) == all_student
    # a total budget turns into the budget over the kept layers: keeping candidates 1 and 3 (positions 2, 6)
    kept = [1, 3]
    model_bytes = HybridLM(student_model_config(TEACHER, [POSITIONS[i] for i in kept], "M", STUDENT)).state_size(
        batch, seq_len)
    assert all_student + sum(costs[i] for i in kept) == model_bytes
    budget = kept_budget(model_bytes, TEACHER, POSITIONS, "M", STUDENT, seq_len, batch)
    assert budget == sum(costs[i] for i in kept)
    assert select_layers([1.0, 1.0, 5.0, 4.0], 2, costs, budget) == [2, 3]
    assert costs[0] > 0  # the KV cache at 96 tokens outweighs the Mamba state


def test_student_model_config_keeps_the_listed_positions_only():
    cfg = student_model_config(TEACHER, [2], "M", STUDENT)
    assert patterns.layer_symbols(cfg.pattern) == list("MFAFMFMF")
    assert cfg.layers["M"] == STUDENT and cfg.layers["A"] == TEACHER.layers["A"]
    with pytest.raises(ValueError, match="position 9"):
        layer_costs(TEACHER, [9], "M", STUDENT, "state_bytes", 16)
    with pytest.raises(ValueError, match="metric"):
        layer_costs(TEACHER, [0], "M", STUDENT, "watts", 16)


def test_decode_ms_costs_are_measured_and_shared_by_equal_layers():
    costs = layer_costs(TEACHER, POSITIONS, "M", STUDENT, "decode_ms", 64, repeats=3)
    assert len(costs) == len(POSITIONS) and all(math.isfinite(c) for c in costs)
    assert len(set(costs)) == 1  # the four attention layers are alike: measured once


@pytest.mark.parametrize("student,params", [("M", {"variant": "mamba2"}), ("M", {}), ("S", {}), ("H", {}),
                                            ("R", {"head_size": 16})])
def test_state_bytes_of_every_mixer_student_match_the_built_models(student, params):
    cfg = ModelConfig(vocab_size=32, d_model=32, pattern="AFAF", layers={"A": {"n_heads": 2}})
    seq_len = 40
    costs = layer_costs(cfg, [0, 2], student, params, "state_bytes", seq_len)
    full = HybridLM(cfg).state_size(1, seq_len)
    one = HybridLM(student_model_config(cfg, [2], student, params)).state_size(1, seq_len)
    none = HybridLM(student_model_config(cfg, [], student, params)).state_size(1, seq_len)
    assert costs[0] == full - one and costs[0] + costs[1] == full - none
    assert base_cost(cfg, [0, 2], student, params, seq_len) == none


@pytest.mark.parametrize("answer,match", [
    (lambda n: (np.ones(n), -2.0), "not k=1"),                      # wrong count
    (lambda n: (np.array([0.5, 0.5, 0.0]), -1.0), "non-binary"),   # fractional
    (lambda n: (np.array([1.0, 0.0, 0.0]), -1.0), "exceeds budget"),  # over the budget, every re-solve
    (lambda n: (np.array([0.0, 1.0, 0.0]), -5.0), "objective"),     # claims more utility than the layer has
])
def test_trust_but_verify_catches_a_wrong_solver_answer(monkeypatch, answer, match):
    import hybridnas.distill_select as ds

    monkeypatch.setattr(ds, "_solve", lambda s, k, c, rhs, min_utility=None: answer(len(s)))
    with pytest.raises(RuntimeError, match=match):
        select_layers([3.0, 2.0, 1.0], 1, [5.0, 1.0, 1.0], 2.0)
