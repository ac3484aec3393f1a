"""Continuous batching in hybridnas serve: concurrent requests in their decode phase step together in one forward,
and every greedy reply is token for token the sequential greedy decode of its own prompt (a recurrent-only pattern
and one with attention, prompts of different lengths, fresh and continued conversations); the batch-size histogram
shows batches > 1 when 8 clients send at once; a request that fails inside a batch fails alone."""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from hybridnas.generation import (  # noqa: E402
    Decoder,
    batch_key,
    load_export,
    split_states,
    stack_states,
    state_signature,
)
from hybridnas.serve import Server  # noqa: E402
from tests.test_serve import MQAR, Running, export, greedy  # noqa: E402


def batch_counts(client) -> tuple[float, float]:
    """(decode forwards, forwards of batch 1) from the hybridnas_batch_size histogram."""
    total = ones = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("hybridnas_batch_size_count"):
            total = float(line.rsplit(" ", 1)[1])
        if line.startswith('hybridnas_batch_size_bucket{le="1.0"}'):
            ones = float(line.rsplit(" ", 1)[1])
    return total, ones


def at_once(port: int, bodies: list[dict]) -> list[httpx.Response]:
    """POST every body from its own thread, all released together."""
    out: list[httpx.Response | None] = [None] * len(bodies)
    gate = threading.Barrier(len(bodies))

    def one(i: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            gate.wait()
            out[i] = c.post("/v1/completions", json=bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert all(r is not None for r in out)
    return out


@pytest.fixture(scope="module", params=["MM", "MA"])
def served(request, tmp_path_factory):
    folder, model = export(tmp_path_factory.mktemp(request.param) / "exp", MQAR, 64, request.param)
    server = Server(load_export(folder), max_context=64)
    run = Running(server)
    yield run, model, request.param
    run.stop()


PROMPTS = [[1, 2, 3], [4, 5, 6, 7], [8], [9, 10, 11, 12, 13, 14, 15], [16, 17], [18, 19, 20, 21, 22],
           [23, 24, 25, 26, 27, 28], [29, 30, 31, 32, 33, 34, 35, 36, 37]]  # all of different lengths


def test_concurrent_greedy_equals_sequential_and_is_batched(served):
    run, model, pattern = served
    before = batch_counts(run.client)
    n = 12
    rs = at_once(run.port, [{"prompt": p, "max_tokens": n, "temperature": 0} for p in PROMPTS])
    assert [r.status_code for r in rs] == [200] * len(PROMPTS), [r.text for r in rs]
    firsts = [r.json()["choices"][0]["tokens"] for r in rs]
    for p, got in zip(PROMPTS, firsts, strict=True):
        assert got == greedy(model, p, n), (pattern, p)
    after = batch_counts(run.client)
    forwards, ones = after[0] - before[0], after[1] - before[1]
    assert forwards > ones, f"{pattern}: no decode forward had a batch > 1 ({forwards} forwards, all of batch 1)"
    # second turns continue every conversation from its cached state, again all at once
    extra = [[40 + i] * (1 + i % 3) for i in range(len(PROMPTS))]
    rs2 = at_once(run.port, [{"prompt": e, "max_tokens": 6, "temperature": 0,
                              "conversation_id": r.json()["conversation_id"]} for e, r in zip(extra, rs, strict=True)])
    assert [r.status_code for r in rs2] == [200] * len(PROMPTS), [r.text for r in rs2]
    for p, g, e, r in zip(PROMPTS, firsts, extra, rs2, strict=True):
        assert r.json()["choices"][0]["tokens"] == greedy(model, p + g + e, 6), (pattern, p)
        assert r.json()["usage"]["cached_tokens"] == len(p) + n


def test_eight_clients_at_once_are_batched(served):
    run, _, pattern = served
    before = batch_counts(run.client)
    rs = at_once(run.port, [{"prompt": [1, 2, 3, 4], "max_tokens": 16, "temperature": 1.0, "seed": i}
                            for i in range(8)])
    assert all(r.status_code == 200 for r in rs)
    after = batch_counts(run.client)
    assert after[0] - before[0] > after[1] - before[1], pattern  # some forward stepped more than one request
    # seeded sampling in a batch is each request's own: the same seed alone gives the same tokens
    alone = run.client.post("/v1/completions", json={"prompt": [1, 2, 3, 4], "max_tokens": 16, "temperature": 1.0,
                                                     "seed": 3}).json()
    assert alone["choices"][0]["tokens"] == rs[3].json()["choices"][0]["tokens"]


def test_a_request_failing_inside_a_batch_fails_alone(served, monkeypatch):
    """One request's sampled token is outside the vocabulary: the batched forward raises, the batch is retried row
    by row, that request gets a 500 and the others their exact greedy tokens; the server goes on."""
    import hybridnas.generation as generation

    run, model, pattern = served
    real = generation.sample

    def poisoned(logits, cfg, gen=None):
        tok = real(logits, cfg, gen)
        return torch.full_like(tok, 10 ** 6) if cfg.seed == 666 else tok

    monkeypatch.setattr(generation, "sample", poisoned)
    bodies = [{"prompt": [5, 6, 7, 8], "max_tokens": 8, "temperature": 0, "seed": 666 if i == 2 else i}
              for i in range(6)]
    rs = at_once(run.port, bodies)
    assert rs[2].status_code == 500 and "server_error" in rs[2].text
    for i, r in enumerate(rs):
        if i != 2:
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["tokens"] == greedy(model, [5, 6, 7, 8], 8)
    monkeypatch.setattr(generation, "sample", real)
    ok = run.client.post("/v1/completions", json={"prompt": [9], "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["tokens"] == greedy(model, [9], 3)


def test_stack_and_split_states_round_trip(tmp_path):
    _, model = export(tmp_path / "exp", MQAR, 64, "MA")
    a, b, c = Decoder(model), Decoder(model), Decoder(model)
    a.feed([1, 2, 3])
    b.feed([4, 5, 6])
    c.feed([7, 8])
    assert state_signature(a.states) == state_signature(b.states) != state_signature(c.states)
    back = split_states(stack_states([a.states, b.states]), 2)
    for orig, got in zip((a.states, b.states), back, strict=True):
        for so, sg in zip(orig, got, strict=True):
            for k in so:
                assert (torch.equal(so[k], sg[k]) if isinstance(so[k], torch.Tensor) else so[k] == sg[k]), k


@pytest.mark.parametrize("cfg", [{}, {"window": 3}, {"n_kv_heads": 1}, {"rope": False}])
def test_attention_ragged_step_equals_each_row_alone(cfg):
    """Sequences of different lengths step in one batch through the attention layer: every row's output and new
    state are those of stepping that sequence alone (up to float rounding: a CPU matmul of B rows does not round
    exactly as B matmuls of one row; the attention of each row is the one-sequence kernel on its own cache)."""
    from layers.attention import Attention

    torch.manual_seed(0)
    layer = Attention(16, Attention.Config(n_heads=2, **cfg)).eval()
    lengths = [1, 4, 2, 7]
    rows = []
    with torch.no_grad():
        for n in lengths:
            _, st = layer.prefill(torch.randn(1, n, 16))
            rows.append(st)
        x = torch.randn(len(lengths), 1, 16)
        y, st = layer.step(x, layer.stack_states(rows))
        y2, st2 = layer.step(torch.randn(len(lengths), 1, 16), st)  # a second step on the ragged state
        back = layer.split_state(st, len(lengths))
        for i, row in enumerate(rows):
            yi, si = layer.step(x[i:i + 1], row)
            assert torch.allclose(y[i:i + 1], yi, rtol=1e-5, atol=1e-7), (cfg, i)
            assert back[i]["k"].shape == si["k"].shape and torch.allclose(back[i]["k"], si["k"], rtol=1e-5, atol=1e-7)
            assert torch.allclose(back[i]["v"], si["v"], rtol=1e-5, atol=1e-7)
            assert back[i]["pos"] == si["pos"] == lengths[i] + 1
    assert y2.shape == (len(lengths), 1, 16)


def test_batch_key_takes_attention_caches_of_any_length(tmp_path):
    _, model = export(tmp_path / "exp", MQAR, 64, "MA")
    a, b = Decoder(model), Decoder(model)
    a.feed([1, 2, 3])
    b.feed([4, 5, 6, 7, 8])
    assert batch_key(model, a.states) == batch_key(model, b.states) is not None


@pytest.mark.parametrize("pattern", ["MA", "AM-", "HA", "M"])
def test_step_batch_equals_each_decoder_alone(tmp_path, pattern):
    """step_batch over conversations of different lengths: every decoder's next logits and state are those of
    stepping it alone (to float rounding), over several steps."""
    from hybridnas.generation import step_batch

    _, model = export(tmp_path / "exp", MQAR, 64, pattern)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    batched, alone = [Decoder(model) for _ in prompts], [Decoder(model) for _ in prompts]
    for b, a, p in zip(batched, alone, prompts, strict=True):
        b.feed(p)
        a.feed(p)
    for t in range(4):
        toks = [20 + t + i for i in range(len(prompts))]
        groups: dict = {}  # as the server groups them (a Hyena state grows with length: equal lengths only)
        for i, b in enumerate(batched):
            groups.setdefault(batch_key(model, b.states), []).append(i)
        if pattern != "HA":
            assert len(groups) == 1  # recurrent states and attention caches of any length: one batch
        for idx in groups.values():
            step_batch(model, [batched[i] for i in idx], [toks[i] for i in idx])
        for a, tok in zip(alone, toks, strict=True):
            step_batch(model, [a], [tok])
        for b, a in zip(batched, alone, strict=True):
            assert b.seen == a.seen
            assert torch.allclose(b.logits, a.logits, rtol=1e-4, atol=1e-6), (pattern, t)
