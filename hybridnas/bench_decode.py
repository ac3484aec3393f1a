"""``hybridnas bench --decode``: whole models (a pattern of blocks at one width) decoding after a context.

Two measurements, both on untrained models built from :class:`hybridnas.model.HybridLM` with a fixed seed (decode
cost does not depend on the weights' values):

* **context sweep** (:func:`run_decode`): every model is first warmed up (a 64-token prefill and a few steps,
  untimed). Then for each context length, each pattern prefills that many random tokens (timed once: at 32K
  tokens it is the expensive part on a CPU; ``prefill_repeat`` times when asked), and the patterns decode
  ``decode_tokens`` greedy tokens through ``step`` in lock-step (one token per pattern per round, after
  ``warmup`` untimed rounds), each step timed alone; ms/token is a pattern's median (tokens/s its inverse), with
  the fastest step beside it (on a shared machine a step that lost its core to another job takes about twice as
  long: the minimum is the uncontended cost). The patterns of one context thus share the same stretch of machine
  load. State bytes are measured on the state tensors after the prefill
  and shown beside the model's ``state_size`` formula.
* **continued conversation** (:func:`run_conversation`): a history of ``history`` tokens, then a new turn of
  ``turn`` tokens; *cached* feeds the turn to a :class:`hybridnas.generation.Decoder` holding the history's state
  (what ``hybridnas serve`` does with a ``conversation_id``), *re-prefill* feeds history and turn to a fresh one.
  Both end with the logits of the reply's first token (the reply's own decoding costs the same either way). The
  two alternate round by round (the order flips each round); medians and their ratio are reported, with the
  largest logit difference between the two (they must agree).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hybridnas.generation import Decoder, state_nbytes
from hybridnas.model import HybridLM
from hybridnas.schema import ModelConfig


class DecodeBenchError(ValueError):
    pass


def layer_params(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"M.d_state": 16, "H.filter": "modal"}`` -> ``{"M": {"d_state": 16}, "H": {"filter": "modal"}}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in params.items():
        sym, dot, name = key.partition(".")
        if not dot or not sym or not name:
            raise DecodeBenchError(f"--params key {key!r}: with --decode, name the symbol: SYMBOL.key=value "
                                   "(e.g. M.d_state=16)")
        out.setdefault(sym, {})[name] = value
    return out


def build(pattern: str, d_model: int, vocab_size: int, layers: dict[str, dict[str, Any]], seed: int) -> HybridLM:
    torch.manual_seed(seed)
    present = {s: p for s, p in layers.items() if s in pattern}
    return HybridLM(ModelConfig(vocab_size=vocab_size, d_model=d_model, pattern=pattern, layers=present)).eval()


def _tokens(n: int, vocab_size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # not every platform has it
        return "-"


@dataclass
class DecodeRow:
    pattern: str
    context: int
    prefill_s: float | None = None
    ms_per_token: float | None = None
    ms_per_token_min: float | None = None
    tokens_per_s: float | None = None
    state_bytes: int | None = None
    state_size_formula: int | None = None
    load: str = ""
    error: str | None = None


@dataclass
class DecodeResult:
    d_model: int
    vocab_size: int
    layers: dict[str, dict[str, Any]]
    params: dict[str, int]
    decode_tokens: int
    warmup: int
    threads: int
    torch: str = torch.__version__
    machine: str = field(default_factory=lambda: f"{platform.machine()}, {os.cpu_count()} cpus")
    rows: list[DecodeRow] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _check(patterns: list[str], lengths: list[int], d_model: int) -> None:
    if not patterns:
        raise DecodeBenchError("no pattern given (--patterns AAAA,MMMM,...)")
    if not lengths or any(n < 1 for n in lengths):
        raise DecodeBenchError(f"context lengths must be >= 1, got {lengths}")
    if d_model < 1:
        raise DecodeBenchError(f"d_model must be >= 1, got {d_model}")


def _warm(model: HybridLM, vocab_size: int) -> None:
    """A short prefill and a few steps, untimed: first calls pay one-time costs (allocator, lazy init)."""
    logits, states = model.prefill(_tokens(64, vocab_size, 1))
    tok = logits[:, -1].argmax(-1)
    for _ in range(4):
        logits, states = model.step(tok, states)
        tok = logits.argmax(-1)


@torch.no_grad()
def run_decode(patterns: list[str], contexts: list[int], *, d_model: int = 64, vocab_size: int = 256,
               layers: dict[str, dict[str, Any]] | None = None, decode_tokens: int = 32, warmup: int = 2,
               prefill_repeat: int = 1, seed: int = 0,
               log: Callable[[str], None] | None = None) -> DecodeResult:
    """ms/token and state bytes of each pattern after each context length (see the module docstring).

    At each context every pattern is prefilled in turn (timed), then the patterns decode in lock-step, one token
    each per round, so every pattern's per-token times are spread over the same stretch of machine load."""
    layers = layers or {}
    _check(patterns, contexts, d_model)
    if decode_tokens < 1:
        raise DecodeBenchError(f"decode tokens must be >= 1, got {decode_tokens}")
    models = {p: build(p, d_model, vocab_size, layers, seed) for p in patterns}  # bad patterns fail before timing
    result = DecodeResult(d_model, vocab_size, layers, {p: m.num_params() for p, m in models.items()},
                          decode_tokens, warmup, torch.get_num_threads())
    for model in models.values():
        _warm(model, vocab_size)
    for context in contexts:
        ids = _tokens(context, vocab_size, seed)
        rows = {p: DecodeRow(p, context, state_size_formula=m.state_size(1, context)) for p, m in models.items()}
        live: dict[str, list[Any]] = {}  # pattern -> [next logits, states, step times]
        for pattern, model in models.items():
            row = rows[pattern]
            try:
                times = []
                for _ in range(max(prefill_repeat, 1)):
                    t0 = time.perf_counter()
                    logits, states = model.prefill(ids)
                    times.append(time.perf_counter() - t0)
                    next_logits = logits[:, -1]
                    del logits
                row.prefill_s = statistics.median(times)
                row.state_bytes = state_nbytes(states)
                live[pattern] = [next_logits, states, []]
                del states
            except Exception as e:  # one failing pattern (e.g. out of memory) must not hide the others
                row.error = f"{type(e).__name__}: {e}"
        for i in range(warmup + decode_tokens):
            for pattern in list(live):
                cell = live[pattern]
                try:
                    tok = cell[0].argmax(-1)
                    t0 = time.perf_counter()
                    cell[0], cell[1] = models[pattern].step(tok, cell[1])
                    if i >= warmup:
                        cell[2].append(time.perf_counter() - t0)
                except Exception as e:
                    rows[pattern].error = f"{type(e).__name__}: {e}"
                    del live[pattern]
        for pattern, row in rows.items():
            if pattern in live:
                row.ms_per_token = statistics.median(live[pattern][2]) * 1e3
                row.ms_per_token_min = min(live[pattern][2]) * 1e3
                row.tokens_per_s = 1e3 / row.ms_per_token
            row.load = _load()
            result.rows.append(row)
            if log is not None:
                log(format_decode_row(row))
        live.clear()
    return result


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _fmt_s(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.1f} ms" if t < 10 else f"{t:.1f} s"


def format_decode_row(row: DecodeRow) -> str:
    ms = "-" if row.ms_per_token is None else f"{row.ms_per_token:.2f} ms/token"
    return (f"{row.pattern} context {row.context}: prefill {_fmt_s(row.prefill_s)}, decode {ms}, state "
            f"{_fmt_bytes(row.state_bytes)} (load {row.load})" + (f" ({row.error})" if row.error else ""))


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header) - 1)]
    return ["  ".join([c.ljust(w) for c, w in zip(r[:-1], widths)] + [r[-1]]).rstrip() for r in [header, *body]]


def format_decode_table(result: DecodeResult) -> str:
    layers = "; ".join(f"{s}: " + ",".join(f"{k}={v}" for k, v in p.items()) for s, p in result.layers.items())
    lines = [f"decode: d_model {result.d_model}, vocab {result.vocab_size}, batch 1, layers "
             f"({layers or 'defaults'}), median of {result.decode_tokens} tokens after {result.warmup} warm-up, "
             f"{result.threads} threads, torch {result.torch}, {result.machine}"]
    header = ["pattern", "params", "context", "prefill", "ms/token", "min", "tokens/s", "state bytes", "state_size()",
              "load avg (1 5 15 min)"]
    body = [[r.pattern, str(result.params.get(r.pattern, "-")), str(r.context), _fmt_s(r.prefill_s),
             "-" if r.ms_per_token is None else f"{r.ms_per_token:.2f}",
             "-" if r.ms_per_token_min is None else f"{r.ms_per_token_min:.2f}",
             "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.0f}",
             "-" if r.state_bytes is None else str(r.state_bytes),
             "-" if r.state_size_formula is None else str(r.state_size_formula),
             r.load + (f"  error: {r.error}" if r.error else "")] for r in result.rows]
    return "\n".join([*lines, *_table(header, body)])


# ---------------------------------------------------------------------------------------------------- conversation


@dataclass
class ConversationRow:
    pattern: str
    history: int
    turn: int
    rounds: int
    cached_s: float | None = None
    reprefill_s: float | None = None
    speedup: float | None = None
    cached_rounds_s: list[float] = field(default_factory=list)
    reprefill_rounds_s: list[float] = field(default_factory=list)
    max_logit_diff: float | None = None
    state_bytes: int | None = None
    load_before: str = ""
    load_after: str = ""
    error: str | None = None


@dataclass
class ConversationResult:
    d_model: int
    vocab_size: int
    layers: dict[str, dict[str, Any]]
    threads: int
    torch: str = torch.__version__
    machine: str = field(default_factory=lambda: f"{platform.machine()}, {os.cpu_count()} cpus")
    rows: list[ConversationRow] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


@torch.no_grad()
def run_conversation(patterns: list[str], history: int, turn: int, *, d_model: int = 64, vocab_size: int = 256,
                     layers: dict[str, dict[str, Any]] | None = None, rounds: int = 7, seed: int = 0,
                     log: Callable[[str], None] | None = None) -> ConversationResult:
    """A continued conversation from the state cache against re-prefilling it (see the module docstring)."""
    layers = layers or {}
    _check(patterns, [history, turn], d_model)
    if rounds < 1:
        raise DecodeBenchError(f"rounds must be >= 1, got {rounds}")
    models = {p: build(p, d_model, vocab_size, layers, seed) for p in patterns}
    result = ConversationResult(d_model, vocab_size, layers, torch.get_num_threads())
    ids = _tokens(history + turn, vocab_size, seed)[0].tolist()
    past, new = ids[:history], ids[history:]
    for pattern, model in models.items():
        row = ConversationRow(pattern, history, turn, rounds, load_before=_load())
        try:
            kept = Decoder(model)
            kept.feed(past)  # the server's cached state after the history (untimed: it exists already)
            row.state_bytes = state_nbytes(kept.states)
            diff = 0.0

            def cached(model: HybridLM = model, kept: Decoder = kept) -> torch.Tensor:
                dec = Decoder(model, states=kept.states, logits=kept.logits, seen=kept.seen)
                dec.feed(new)
                return dec.logits

            def reprefill(model: HybridLM = model) -> torch.Tensor:
                dec = Decoder(model)
                dec.feed(past + new)
                return dec.logits

            for r in range(rounds + 1):  # round 0 warms both paths up, untimed
                order = [("cached", cached), ("reprefill", reprefill)]
                for name, fn in order if r % 2 else order[::-1]:
                    t0 = time.perf_counter()
                    out = fn()
                    t = time.perf_counter() - t0
                    if name == "cached":
                        got = out
                    else:
                        ref = out
                    if r:
                        (row.cached_rounds_s if name == "cached" else row.reprefill_rounds_s).append(t)
                diff = max(diff, (got - ref).abs().max().item())
            row.cached_s = statistics.median(row.cached_rounds_s)
            row.reprefill_s = statistics.median(row.reprefill_rounds_s)
            row.speedup = row.reprefill_s / row.cached_s
            row.max_logit_diff = diff
        except Exception as e:
            row.error = f"{type(e).__name__}: {e}"
        row.load_after = _load()
        result.rows.append(row)
        if log is not None:
            log(format_conversation_row(row))
    return result


def format_conversation_row(row: ConversationRow) -> str:
    if row.error:
        return f"{row.pattern}: error {row.error}"
    return (f"{row.pattern}: history {row.history} + turn {row.turn}: cached {_fmt_s(row.cached_s)}, re-prefill "
            f"{_fmt_s(row.reprefill_s)}, {row.speedup:.1f}x (load {row.load_before} -> {row.load_after})")


def format_conversation_table(result: ConversationResult) -> str:
    layers = "; ".join(f"{s}: " + ",".join(f"{k}={v}" for k, v in p.items()) for s, p in result.layers.items())
    lines = [f"continued conversation: d_model {result.d_model}, vocab {result.vocab_size}, batch 1, layers "
             f"({layers or 'defaults'}), {result.threads} threads, torch {result.torch}, {result.machine}; "
             "cached and re-prefill alternate round by round, medians"]
    header = ["pattern", "history", "turn", "rounds", "cached", "re-prefill", "speed-up", "max |logit diff|",
              "state bytes", "load avg before -> after"]
    body = [[r.pattern, str(r.history), str(r.turn), str(r.rounds), _fmt_s(r.cached_s), _fmt_s(r.reprefill_s),
             "-" if r.speedup is None else f"{r.speedup:.1f}x",
             "-" if r.max_logit_diff is None else f"{r.max_logit_diff:.1e}",
             "-" if r.state_bytes is None else str(r.state_bytes),
             f"{r.load_before} -> {r.load_after}" + (f"  error: {r.error}" if r.error else "")] for r in result.rows]
    return "\n".join([*lines, *_table(header, body)])
