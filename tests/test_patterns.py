"""The layer-pattern grammar. An explicit symbol map keeps these tests independent of the layer registry."""

from __future__ import annotations

import pytest

from hybridnas.patterns import (
    Group,
    PatternError,
    Symbol,
    arch_hash,
    canonical,
    expand,
    layer_symbols,
    normalize,
    parse,
    render,
    to_primary,
    used_symbols,
)

SYMBOLS = {"M": "M", "A": "A", "*": "A", "F": "F", "-": "F", "E": "E", "H": "H", "R": "R"}

NEMOTRON_H_8B = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"


# ---------------------------------------------------------------- parsing and rendering


def test_nemotron_h_8b_parses_and_renders_back():
    tree = parse(NEMOTRON_H_8B, SYMBOLS)
    assert all(isinstance(node, Symbol) for node in tree)
    assert normalize(NEMOTRON_H_8B, SYMBOLS) == NEMOTRON_H_8B
    assert render(tree) == NEMOTRON_H_8B
    assert expand(NEMOTRON_H_8B, SYMBOLS) == NEMOTRON_H_8B
    assert len(expand(NEMOTRON_H_8B, SYMBOLS)) == 52
    primary = to_primary(NEMOTRON_H_8B, SYMBOLS)
    assert primary.count("A") == 4 and primary.count("M") == 24 and primary.count("F") == 24
    assert set(primary) == {"M", "A", "F"}


def test_symbol_positions():
    tree = parse("M (A)x2", SYMBOLS)
    assert tree[0] == Symbol("M", 0)
    assert isinstance(tree[1], Group) and tree[1].count == 2
    assert tree[1].items == (Symbol("A", 3),)


def test_group_repeat():
    assert expand("(MMMA)x4", SYMBOLS) == "MMMA" * 4
    assert len(expand("(MMMA)x4", SYMBOLS)) == 16
    assert normalize("(MMMA)x4", SYMBOLS) == "(MMMA)x4"
    assert expand("(MA)x1", SYMBOLS) == "MA"
    assert expand("(M)x12", SYMBOLS) == "M" * 12


def test_nested_groups():
    assert expand("((MA)x2F)x3", SYMBOLS) == "MAMAF" * 3
    assert normalize("((MA)x2F)x3", SYMBOLS) == "((MA)x2F)x3"
    tree = parse("((MA)x2F)x3", SYMBOLS)
    assert len(tree) == 1 and tree[0].count == 3
    inner = tree[0].items
    assert isinstance(inner[0], Group) and inner[0].count == 2 and inner[1] == Symbol("F", 7)


def test_published_hybrid_strings():
    assert expand("M-MEM-MEA-MEM-ME", SYMBOLS) == "M-MEM-MEA-MEM-ME"
    assert to_primary("M-MEM-MEA-MEM-ME", SYMBOLS) == "MFMEMFMEAFMEMFME"
    assert expand("(HFAF)x4", SYMBOLS) == "HFAF" * 4


def test_whitespace_is_ignored():
    assert expand(" ( M M\tM A ) x 4 \n", SYMBOLS) == "MMMA" * 4
    assert normalize(" ( M M\tM A ) x 4 \n", SYMBOLS) == "(MMMA)x4"
    assert expand("M - M *", SYMBOLS) == "M-M*"


def test_count_marker_variants():
    assert expand("(MA)X2", SYMBOLS) == "MAMA"
    assert expand("(MA)×2", SYMBOLS) == "MAMA"


def test_aliases_kept_in_expand_and_mapped_in_to_primary():
    assert expand("(M-)x2 M*", SYMBOLS) == "M-M-M*"
    assert to_primary("(M-)x2 M*", SYMBOLS) == "MFMFMA"
    assert layer_symbols("M-M*", SYMBOLS) == ["M", "F", "M", "A"]
    assert used_symbols("M-M*E", SYMBOLS) == ["M", "F", "A", "E"]
    assert used_symbols("(AM)x3", SYMBOLS) == ["A", "M"]


def test_custom_symbol_map():
    custom = {**SYMBOLS, "X": "X", "x": "X"}  # 'x' stays the repeat marker after a group
    assert expand("MXM", custom) == "MXM"
    with pytest.raises(PatternError):
        parse("MXM", SYMBOLS)


# ---------------------------------------------------------------- canonical form and hash


def test_canonical_equality_of_aliases():
    assert canonical("M-M*", symbols=SYMBOLS) == canonical("MFMA", symbols=SYMBOLS)
    assert arch_hash("M-M*", symbols=SYMBOLS) == arch_hash("MFMA", symbols=SYMBOLS)
    assert arch_hash("(MF)x2", symbols=SYMBOLS) == arch_hash("M-M-", symbols=SYMBOLS)
    assert arch_hash("MFMA", symbols=SYMBOLS) != arch_hash("MFAM", symbols=SYMBOLS)
    assert arch_hash("MFMA", symbols=SYMBOLS) != arch_hash("MFMAM", symbols=SYMBOLS)


def test_params_of_unused_symbols_do_not_change_the_hash():
    base = {"M": {"d_state": 64}}
    with_unused = {"M": {"d_state": 64}, "H": {"order": 3}, "E": {"num_experts": 8}}
    assert canonical("MMA", base, SYMBOLS) == canonical("MMA", with_unused, SYMBOLS)
    assert arch_hash("MMA", base, symbols=SYMBOLS) == arch_hash("MMA", with_unused, symbols=SYMBOLS)


def test_different_params_change_the_hash():
    h1 = arch_hash("MMA", {"M": {"d_state": 64}}, symbols=SYMBOLS)
    h2 = arch_hash("MMA", {"M": {"d_state": 128}}, symbols=SYMBOLS)
    h3 = arch_hash("MMA", {"A": {"n_heads": 4}}, symbols=SYMBOLS)
    assert len({h1, h2, h3}) == 3
    assert arch_hash("MMA", symbols=SYMBOLS) != arch_hash("MMA", extra={"d_model": 256}, symbols=SYMBOLS)
    assert arch_hash("MMA", extra={"d_model": 128}, symbols=SYMBOLS) != \
        arch_hash("MMA", extra={"d_model": 256}, symbols=SYMBOLS)


def test_params_given_by_alias_equal_params_by_primary():
    by_alias = canonical("M-M*", {"*": {"n_heads": 4}, "-": {"hidden_mult": 4}}, SYMBOLS)
    by_primary = canonical("MFMA", {"A": {"n_heads": 4}, "F": {"hidden_mult": 4}}, SYMBOLS)
    assert by_alias == by_primary


def test_hash_is_stable_and_order_insensitive():
    p1 = {"M": {"d_state": 64, "expand": 2}, "A": {"n_heads": 4}}
    p2 = {"A": {"n_heads": 4}, "M": {"expand": 2, "d_state": 64}}
    h = arch_hash("(MMMA)x2", p1, symbols=SYMBOLS)
    assert h == arch_hash("MMMAMMMA", p2, symbols=SYMBOLS)
    assert len(h) == 16 and all(c in "0123456789abcdef" for c in h)


# ---------------------------------------------------------------- errors


def _error(pattern: str) -> PatternError:
    with pytest.raises(PatternError) as info:
        parse(pattern, SYMBOLS)
    return info.value


def test_bad_symbol():
    err = _error("MMQA")
    assert err.position == 2
    msg = str(err)
    assert "'Q'" in msg and "position 2" in msg
    for ch in SYMBOLS:
        assert ch in msg
    assert "  ^" in msg  # a caret under the offending character
    assert isinstance(err, ValueError)
    assert err.pattern == "MMQA"


def test_bad_symbol_position_counts_whitespace_and_groups():
    assert _error("M (MA)x2 Z").position == 9
    assert _error("(MQ)x2").position == 2


@pytest.mark.parametrize("pattern,position", [
    ("(MMA", 0),
    ("MM(MA", 2),
    ("((MA)x2", 0),
    ("(M(A)x2", 0),
])
def test_unbalanced_open(pattern, position):
    err = _error(pattern)
    assert "unbalanced '('" in str(err)
    assert err.position == position


@pytest.mark.parametrize("pattern,position", [
    ("MA)", 2),
    ("(MA)x2)", 6),
    (")M", 0),
])
def test_unbalanced_close(pattern, position):
    err = _error(pattern)
    assert "unbalanced ')'" in str(err)
    assert err.position == position


@pytest.mark.parametrize("pattern,position,text", [
    ("(MA)", 3, "repeat count"),
    ("(MA)M", 4, "repeat count"),
    ("(MA)x", 4, "missing repeat count"),
    ("(MA)xM", 5, "missing repeat count"),
    ("(MA)x²", 5, "missing repeat count"),
])
def test_missing_count(pattern, position, text):
    err = _error(pattern)
    assert text in str(err)
    assert err.position == position


@pytest.mark.parametrize("pattern,position", [("(MA)x0", 5), ("M(MA)x00", 6)])
def test_zero_count(pattern, position):
    err = _error(pattern)
    assert "at least 1" in str(err)
    assert err.position == position


@pytest.mark.parametrize("pattern,position", [("()x2", 0), ("M( )x2", 1), ("(()x2)x2", 1)])
def test_empty_group(pattern, position):
    err = _error(pattern)
    assert "empty group" in str(err)
    assert err.position == position


@pytest.mark.parametrize("pattern", ["", "   ", "\n\t"])
def test_empty_pattern(pattern):
    err = _error(pattern)
    assert "empty pattern" in str(err)
    assert err.position is None  # nothing to point at


def test_non_string_pattern():
    with pytest.raises(PatternError):
        parse(["M", "A"], SYMBOLS)  # type: ignore[arg-type]


def test_errors_propagate_through_every_entry_point():
    for fn in (expand, normalize, to_primary, layer_symbols, used_symbols):
        with pytest.raises(PatternError):
            fn("MQ", SYMBOLS)
    with pytest.raises(PatternError):
        canonical("MQ", symbols=SYMBOLS)
    with pytest.raises(PatternError):
        arch_hash("(MA", symbols=SYMBOLS)


def test_huge_repeat_counts_are_rejected_before_expansion():
    with pytest.raises(PatternError, match="at most"):
        parse("(M)x99999999999", SYMBOLS)
    assert len(expand("((MA)x32)x64", SYMBOLS)) == 4096


@pytest.mark.parametrize("bad", ["MM(A", "MA)M", "(MA)", "(MA)x0", "()x2", "MQ"])
def test_every_grammar_error_lists_the_registered_symbols(bad):
    with pytest.raises(PatternError) as info:
        parse(bad, SYMBOLS)
    assert "registered symbols:" in str(info.value)
    assert f"at position {info.value.position}" in str(info.value)
