"""``hybridnas bench --decode`` on tiny shapes: it runs and prints its columns (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from hybridnas import bench_decode
from hybridnas.cli import main

TINY = ["--d-model", "32", "--vocab-size", "40", "--params", "A.n_heads=2,M.d_state=8,M.headdim=16,H.filter=modal,"
        "R.head_size=16,R.decay_rank=8,R.a_rank=8,R.v_rank=4,R.gate_rank=8"]


def test_decode_table_has_every_pattern_and_context(capsys):
    rc = main(["bench", "--decode", "--patterns", "AA,MM,RR,HA,MA", "--contexts", "8,24", "--decode-tokens", "3",
               "--quiet", *TINY])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.strip().splitlines()
    assert lines[0].startswith("decode: d_model 32, vocab 40, batch 1")
    header = lines[1].split()
    assert header[:6] == ["pattern", "params", "context", "prefill", "ms/token", "min"]
    assert "tokens/s" in header and "state_size()" in lines[1] and "state bytes" in lines[1]
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[2]) for r in rows] == [(p, c) for c in ("8", "24") for p in ("AA", "MM", "RR", "HA", "MA")]
    assert all("error" not in line for line in lines)
    assert all(len(r) >= 11 for r in rows)  # every column filled


def test_decode_json_and_state_growth(capsys):
    rc = main(["bench", "--decode", "--patterns", "AA,MM", "--contexts", "8,32", "--decode-tokens", "2", "--json",
               *TINY])
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    rows = {(r["pattern"], r["context"]): r for r in data["rows"]}
    assert set(rows) == {("AA", 8), ("MM", 8), ("AA", 32), ("MM", 32)}
    for r in rows.values():
        assert r["error"] is None and r["prefill_s"] > 0 and r["ms_per_token"] > 0 and r["tokens_per_s"] > 0
        assert 0 < r["ms_per_token_min"] <= r["ms_per_token"]
        assert r["state_bytes"] == r["state_size_formula"]  # the state measured is what state_size() predicts
    assert rows["AA", 32]["state_bytes"] == 4 * rows["AA", 8]["state_bytes"]  # a KV cache grows with the context
    assert rows["MM", 32]["state_bytes"] == rows["MM", 8]["state_bytes"]      # a recurrent state does not
    assert data["params"]["AA"] > 0 and data["decode_tokens"] == 2


def test_progress_lines_without_quiet(capsys):
    assert main(["bench", "--decode", "--patterns", "MA", "--contexts", "6", "--decode-tokens", "1", *TINY]) == 0
    out = capsys.readouterr().out
    assert "MA context 6: prefill" in out and "ms/token" in out


def test_conversation_table(capsys):
    rc = main(["bench", "--decode", "--patterns", "MMMA,MM", "--conversation", "40+4", "--rounds", "2", "--quiet",
               *TINY])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.strip().splitlines()
    assert lines[0].startswith("continued conversation: d_model 32")
    assert lines[1].split()[:6] == ["pattern", "history", "turn", "rounds", "cached", "re-prefill"]
    assert "speed-up" in lines[1] and "max |logit diff|" in lines[1]
    assert [line.split()[:4] for line in lines[2:]] == [["MMMA", "40", "4", "2"], ["MM", "40", "4", "2"]]


def test_conversation_paths_agree():
    result = bench_decode.run_conversation(["MA", "AR"], 30, 5, d_model=32, vocab_size=40, rounds=2, layers={
        "M": {"d_state": 8, "headdim": 16}, "A": {"n_heads": 2}, "R": {"head_size": 16}})
    for row in result.rows:
        assert row.error is None
        assert len(row.cached_rounds_s) == len(row.reprefill_rounds_s) == 2
        assert row.max_logit_diff < 1e-4  # cached state and re-prefill give the same next-token logits
        assert row.speedup == pytest.approx(row.reprefill_s / row.cached_s)


@pytest.mark.parametrize("argv, message", [
    (["--decode", "--contexts", "8"], "no pattern given"),
    (["--decode", "--patterns", "AA", "--params", "n_heads=2"], "name the symbol: SYMBOL.key=value"),
    (["--decode", "--patterns", "AA", "--conversation", "2048"], "expected HISTORY+TURN"),
    (["--decode", "--patterns", "AA", "--conversation", "a+b"], "expected HISTORY+TURN"),
    (["--decode", "--patterns", "AA", "--contexts", "0"], "context lengths must be >= 1"),
    ([], "--mixer is required"),
])
def test_bad_decode_arguments_are_one_line_exit_2(capsys, argv, message):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err


def test_a_bad_pattern_is_the_pattern_error_before_any_timing(capsys):
    assert main(["bench", "--decode", "--patterns", "AA,AQ", "--contexts", "8"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: unknown layer symbol 'Q' at position 1") and "Traceback" not in captured.err
    assert captured.out == ""  # nothing was timed
