"""hybridnas serve over real HTTP on 127.0.0.1: OpenAI-style completions (plain and SSE), 4xx for every bad request
with the server still up, conversations continued from the cached state, eviction, metrics."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from hybridnas.checkpoint import save_checkpoint  # noqa: E402
from hybridnas.cli import main  # noqa: E402
from hybridnas.config import ArchConfig, ModelConfig, TaskSpec, TrainConfig  # noqa: E402
from hybridnas.generation import Decoder, Sampling, load_export  # noqa: E402
from hybridnas.model import HybridLM  # noqa: E402
from hybridnas.serve import Server, StateCache, make_app  # noqa: E402

MQAR = TaskSpec("mqar", {"vocab_size": 64, "seq_len": 16, "num_kv_pairs": 2})
BYTES = TaskSpec("lm", {"path": "data/prose.txt", "tokenizer": "bytes", "seq_len": 32})


def export(path, task, vocab, pattern="AM-"):
    arch = ArchConfig(ModelConfig(vocab_size=vocab, d_model=32, pattern=pattern, layers={"A": {"n_heads": 2}}), task,
                      TrainConfig(steps=3), {}, "srv")
    torch.manual_seed(0)
    model = HybridLM(arch.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return str(save_checkpoint(path, arch, model, tokenizer=True)), model


class Running:
    """A uvicorn server in a thread on a free port of 127.0.0.1."""

    def __init__(self, server: Server):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.uv = uvicorn.Server(uvicorn.Config(make_app(server), log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.uv.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)

    def stop(self):
        self.client.close()
        self.uv.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def mqar(tmp_path_factory):
    folder, model = export(tmp_path_factory.mktemp("mqar") / "exp", MQAR, 64)
    server = Server(load_export(folder), max_context=64)
    running = Running(server)
    yield running, model, server
    running.stop()


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    folder, model = export(tmp_path_factory.mktemp("text") / "exp", BYTES, 257, "MA")
    running = Running(Server(load_export(folder)))
    yield running, model
    running.stop()


def greedy(model, ids, n):
    return model.generate(torch.tensor([ids]), max_new_tokens=n)[0, len(ids):].tolist()


def metric(client, name: str, labels: str = "") -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + (("{" + labels + "}") if labels else " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_health_and_a_greedy_completion(mqar):
    run, model, _ = mqar
    h = run.client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    r = run.client.post("/v1/completions", json={"model": "m", "prompt": [1, 2, 3, 4], "max_tokens": 7,
                                                 "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "m" and body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert choice["tokens"] == greedy(model, [1, 2, 3, 4], 7) and choice["finish_reason"] == "length"
    assert choice["text"] == " ".join(map(str, choice["tokens"]))  # the decimal-id tokenizer
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11, "cached_tokens": 0}
    assert body["conversation_id"].startswith("conv-")


MALFORMED = [
    ("not json", None),
    ("[1, 2]", None),
    ('"a string"', None),
    (None, {"max_tokens": 3}),                                   # no prompt
    (None, {"prompt": 12}),                                      # wrong type
    (None, {"prompt": [1, "x"]}),                                # not ids
    (None, {"prompt": []}),                                      # empty
    (None, {"prompt": [1, 2], "max_tokens": -1}),                # negative count
    (None, {"prompt": [1, 2], "max_tokens": "5"}),               # wrong type
    (None, {"prompt": [1, 2], "max_tokens": 1.5}),
    (None, {"prompt": [1, 2], "temperature": -0.5}),
    (None, {"prompt": [1, 2], "temperature": "hot"}),
    (None, {"prompt": [1, 2], "top_p": 0}),
    (None, {"prompt": [1, 2], "top_k": 0}),
    (None, {"prompt": [1, 2], "stream": "yes"}),
    (None, {"prompt": [1, 2], "n": 2}),
    (None, {"prompt": [1, 2], "seed": "x"}),
    (None, {"prompt": list(range(60)), "max_tokens": 10}),       # past the context limit (64)
    (None, {"prompt": [1, 2], "max_tokens": 10 ** 9}),
    (None, {"prompt": [1, 99]}),                                 # outside the vocabulary
    (None, {"prompt": "text"}),                                  # the decimal-id tokenizer cannot encode it
    (None, {"prompt": [1, 2], "conversation_id": "conv-nope"}),  # unknown conversation
    (None, {"prompt": [1, 2], "conversation_id": 7}),
    (None, {"prompt": [1, 2], "model": 3}),
]


def test_malformed_requests_are_4xx_and_the_server_survives(mqar):
    run, _, _ = mqar
    statuses = []
    for raw, body in MALFORMED:
        if raw is not None:
            r = run.client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        else:
            r = run.client.post("/v1/completions", json=body)
        statuses.append(r.status_code)
        assert 400 <= r.status_code < 500, (raw, body, r.status_code, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"]
        assert run.client.get("/health").status_code == 200
    assert statuses.count(404) == 1  # the unknown conversation
    assert run.client.get("/v1/completions").status_code == 405
    assert run.client.get("/nowhere").status_code == 404
    assert metric(run.client, "hybridnas_requests_total", 'status="400"') >= 15


def test_a_continued_conversation_equals_decoding_from_scratch(mqar):
    run, model, _ = mqar
    p1, p2 = [5, 6, 7, 8, 9], [10, 11, 12]
    first = run.client.post("/v1/completions", json={"prompt": p1, "max_tokens": 6, "temperature": 0}).json()
    g1 = first["choices"][0]["tokens"]
    prompt_before = metric(run.client, "hybridnas_prompt_tokens_total")
    hits_before = metric(run.client, "hybridnas_state_cache_hits_total")
    second = run.client.post("/v1/completions", json={"prompt": p2, "max_tokens": 6, "temperature": 0,
                                                      "conversation_id": first["conversation_id"]})
    assert second.status_code == 200, second.text
    body = second.json()
    assert body["choices"][0]["tokens"] == greedy(model, p1 + g1 + p2, 6)
    assert body["conversation_id"] == first["conversation_id"]
    # only the new tokens were run: the cached state covered the rest
    assert body["usage"]["prompt_tokens"] == len(p2) and body["usage"]["cached_tokens"] == len(p1) + len(g1)
    assert metric(run.client, "hybridnas_prompt_tokens_total") - prompt_before == len(p2)
    assert metric(run.client, "hybridnas_state_cache_hits_total") - hits_before == 1
    # and a third turn, streamed
    third = run.client.post("/v1/completions", json={"prompt": [13], "max_tokens": 4, "temperature": 0,
                                                     "stream": True, "conversation_id": first["conversation_id"]})
    tokens = [int(t) for t in "".join(c["choices"][0]["text"] for c in sse(third.text)[0]).split()]
    assert tokens == greedy(model, p1 + g1 + p2 + body["choices"][0]["tokens"] + [13], 4)


def sse(text: str) -> tuple[list[dict], list[str]]:
    """The JSON chunks of an SSE body, and the raw data lines."""
    lines = [line for line in text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    data = [line[len("data: "):] for line in lines]
    assert data[-1] == "[DONE]" and text.endswith("data: [DONE]\n\n")
    return [json.loads(d) for d in data[:-1]], data


def test_streaming_text_equals_the_plain_completion(text):
    run, model = text
    req = {"prompt": "héllo", "max_tokens": 10, "temperature": 0}
    plain = run.client.post("/v1/completions", json=req).json()
    with run.client.stream("POST", "/v1/completions",
                           json={**req, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        body = "".join(r.iter_text())
    chunks, _ = sse(body)
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == len("héllo".encode())
    deltas = chunks[:-1]
    assert "".join(c["choices"][0]["text"] for c in deltas) == plain["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in deltas][-1] == plain["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in deltas[:-1])
    ids = greedy(model, list("héllo".encode()), 10)
    stop = ids.index(256) if 256 in ids else len(ids)
    assert plain["choices"][0]["tokens"] == ids[:stop]


def test_eviction_under_a_tiny_byte_budget(tmp_path):
    folder, model = export(tmp_path / "exp", MQAR, 64)
    probe = Decoder(model)
    probe.feed([1, 2, 3])
    list(probe.generate(2, Sampling(0)))
    one = probe.nbytes()
    server = Server(load_export(folder), max_context=64, cache_bytes=int(one * 1.5))
    run = Running(server)
    try:
        a = run.client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0}).json()
        b = run.client.post("/v1/completions", json={"prompt": [4, 5, 6], "max_tokens": 2, "temperature": 0}).json()
        assert metric(run.client, "hybridnas_state_cache_evictions_total", 'reason="lru"') == 1
        assert 0 < metric(run.client, "hybridnas_state_cache_bytes") <= one * 1.5
        assert metric(run.client, "hybridnas_state_cache_entries") == 1
        gone = run.client.post("/v1/completions", json={"prompt": [7], "conversation_id": a["conversation_id"]})
        assert gone.status_code == 404 and "conversation_id" in gone.json()["error"]["message"]
        kept = run.client.post("/v1/completions", json={"prompt": [7], "max_tokens": 1,
                                                        "conversation_id": b["conversation_id"]})
        assert kept.status_code == 200
        assert metric(run.client, "hybridnas_state_cache_misses_total") == 1
        text = run.client.get("/metrics").text
        for name in ("hybridnas_requests_total", "hybridnas_generation_tokens_total",
                     "hybridnas_e2e_request_latency_seconds_bucket", "hybridnas_time_to_first_token_seconds_count"):
            assert name in text
    finally:
        run.stop()


def test_state_cache_ttl_and_lru_order():
    now = [0.0]

    class Fake:
        def __init__(self, n):
            self.n = n

        def nbytes(self):
            return self.n

    cache = StateCache(max_bytes=100, ttl=10, clock=lambda: now[0])
    cache.put("a", Fake(40))
    cache.put("b", Fake(40))
    assert cache.take("a") is not None  # a is taken out ...
    cache.put("a", Fake(40))            # ... and back: now the most recent
    cache.put("c", Fake(40))            # evicts b, the least recently used
    assert "b" not in cache and "a" in cache and "c" in cache and cache.bytes == 80
    now[0] = 11
    assert "a" not in cache and cache.bytes == 0  # idle past the ttl
    assert not cache.put("big", Fake(101)) and cache.bytes == 0


@pytest.mark.parametrize("argv, message", [
    (["--port", "x"], "--port must be an integer"),
    (["--port", "70000"], "--port must be in"),
    (["--cache-bytes", "-1"], "--cache-bytes must be >= 0"),
    (["--cache-ttl", "0"], "--cache-ttl must be > 0"),
    (["--max-context", "0"], "--max-context must be >= 1"),
])
def test_serve_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    folder, _ = export(tmp_path / "exp", MQAR, 64)
    assert main(["serve", folder, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert main(["serve", str(tmp_path / "nope")]) == 2


def test_a_client_leaving_mid_stream_frees_the_model(mqar):
    run, model, _ = mqar
    with run.client.stream("POST", "/v1/completions", json={"prompt": [1, 2], "max_tokens": 40, "stream": True,
                                                            "temperature": 0}) as r:
        next(r.iter_lines())  # one event, then hang up
    r = httpx.post(f"http://127.0.0.1:{run.port}/v1/completions", json={"prompt": [3], "max_tokens": 2,
                                                                      "temperature": 0}, timeout=20)
    assert r.status_code == 200 and r.json()["choices"][0]["tokens"] == greedy(model, [3], 2)
