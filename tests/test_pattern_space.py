"""Genome and ratio pattern spaces: parsing errors, sampling, repair, even placement, dedup."""

import optuna
import pytest

from hybridnas.config import load_space
from hybridnas.pattern_space import GenomeSpace, allocate, even_positions, repair_genome
from hybridnas.search import sample_arch
from hybridnas.yamlio import ConfigError

HEAD = "task: {name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 64, num_test: 16}\nmodel:\n"


def space(pattern_yaml: str):
    return load_space(text=HEAD + "  d_model: 64\n  pattern:\n" + pattern_yaml, file="s.yaml")


def test_even_positions_and_megatron_style_allocation():
    assert even_positions(list(range(8)), 2) == [2, 6]
    assert even_positions(list(range(8)), 0) == []
    assert allocate(8, "M", {"A": 0.125}) == "MMMMAMMM"
    assert allocate(8, "M", {"A": 0.25, "F": 0.5}) == "FMAFFMAF"  # A at 2, 6; F spread over the rest
    assert allocate(4, "M", {}) == "MMMM"
    assert allocate(6, "M", {"A": 1.0}) == "AAAAAA"


def test_repair_meets_bounds_deterministically():
    g = GenomeSpace(length=6, symbols=["M", "A", "F"], counts={"A": (1, 2)})
    assert repair_genome(list("AAAAMM"), g) == list("FFAAMM")  # excess replaced from the front
    assert repair_genome(list("MMMMMM"), g) == list("MMMMMA")
    assert repair_genome(list("MAMFMM"), g) == list("MAMFMM")


def test_genome_sampling_respects_positions_and_counts():
    sp = space("    genome:\n      length: {low: 4, high: 7}\n      symbols: MAF\n"
               "      positions: {0: M, -1: A}\n      counts: {A: {max: 2}}\n")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        trial = study.ask()
        pattern = sample_arch(sp, trial).model.pattern
        assert 4 <= len(pattern) <= 7
        assert pattern[0] == "M" and pattern[-1] == "A"
        assert pattern.count("A") <= 2
        study.tell(trial, 0.0)
    names = set().union(*(t.params for t in study.trials))
    assert "pattern.length" in names and "pattern.pos1" in names


def test_ratio_sampling():
    sp = space("    ratio:\n      length: [8]\n      base: M\n      shares: {A: [0.125, 0.25], '-': 0.5}\n")
    seen = set()
    for a in (0.125, 0.25):
        trial = optuna.trial.FixedTrial({"pattern.length": 8, "pattern.share.A": a})
        seen.add(sample_arch(sp, trial).model.pattern)
    assert seen == {"FMFMAFMF", "FMAFFMAF"}


@pytest.mark.parametrize("body, line, path, message", [
    ("    genome: {length: 4}\n", 5, ("model", "pattern", "genome"), "missing required key 'symbols'"),
    ("    genome: {length: 4, symbols: MQ}\n", 5, ("model", "pattern", "genome", "symbols"), "unknown layer symbol"),
    ("    genome: {length: 0, symbols: M}\n", 5, ("model", "pattern", "genome", "length"), "at least 1"),
    ("    genome: {length: 4, symbols: MA, positions: {9: A}}\n", 5,
     ("model", "pattern", "genome", "positions", 9), "outside"),
    ("    genome: {length: 4, symbols: MA, counts: {A: {min: 3, max: 1}}}\n", 5,
     ("model", "pattern", "genome", "counts", "A"), "greater than max"),
    ("    genome: {length: 3, symbols: MA, counts: {A: {min: 2}, M: {min: 2}}}\n", 5,
     ("model", "pattern", "genome", "counts"), "add up"),
    ("    genome: {length: 4, symbols: MA, positions: {0: M, 1: M}, counts: {A: {min: 3}}}\n", 5,
     ("model", "pattern", "genome"), "no pattern of length 4"),
    ("    genom: {length: 4}\n", 5, ("model", "pattern", "genom"), "did you mean 'genome'"),
    ("    ratio: {length: 8, base: M, shares: {A: 0.7, F: 0.5}}\n", 5,
     ("model", "pattern", "ratio", "shares"), "add up to 1.2"),
    ("    ratio: {length: 8, base: M, shares: {M: 0.5}}\n", 5,
     ("model", "pattern", "ratio", "shares", "M"), "base symbol"),
    ("    ratio: {length: 8, base: MA}\n", 5, ("model", "pattern", "ratio", "base"), "one layer symbol"),
    ("    ratio: {length: 8, base: M, shares: {A: 1.5}}\n", 5, ("model", "pattern", "ratio", "shares", "A"),
     "in [0, 1]"),
    ("    ratio: {length: 8, base: M, share: {A: 0.5}}\n", 5, ("model", "pattern", "ratio", "share"),
     "did you mean 'shares'"),
])
def test_pattern_space_errors(body, line, path, message):
    with pytest.raises(ConfigError) as info:
        space(body)
    e = info.value
    assert (e.file, e.line, e.path) == ("s.yaml", line, path)
    assert message in e.message


def test_layer_combinations_checked_for_genome_symbols():
    text = HEAD + "  d_model: 30\n  pattern:\n    genome: {length: 4, symbols: MA}\n  layers:\n    A: {n_heads: [4]}\n"
    with pytest.raises(ConfigError, match="not divisible"):
        load_space(text=text.replace("MA", "FA"), file="s.yaml")
