"""16 concurrent clients against hybridnas serve over real HTTP on 127.0.0.1: every request answered, none in error,
the continued turns started from the cached state. The clients are experiments/serve/load.py's (the 64-client
measurement); here a few tokens each, against an in-process server, so it runs in seconds."""

from __future__ import annotations

import importlib.util
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

from hybridnas.generation import load_export  # noqa: E402
from hybridnas.serve import Server, make_app  # noqa: E402

LOAD_PY = Path(__file__).resolve().parents[1] / "experiments" / "serve" / "load.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("serve_load", LOAD_PY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def load():
    return _load_module()


@pytest.fixture(scope="module")
def running(load, tmp_path_factory):
    import uvicorn

    folder = load.make_export(tmp_path_factory.mktemp("load") / "exp", "MA", 32, seq_len=256)
    server = Server(load_export(str(folder)))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(make_app(server), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not uv.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(10)
    sock.close()


def test_16_concurrent_clients_no_errors(load, running):
    result = load.run_clients(running, 16, turns=2, max_tokens=3, timeout=60)
    assert len(result.calls) == 32
    assert [c.error for c in result.errors] == []
    assert all(c.status == 200 for c in result.calls)
    assert {c.stream for c in result.calls} == {True, False}  # both kinds of request ran
    continued = [c for c in result.calls if c.turn == 1]
    assert len(continued) == 16 and all(c.cached_tokens and c.cached_tokens > 0 for c in continued)
    summary = result.summary()
    assert summary["errors"] == 0 and summary["requests"] == 32 and summary["tokens"] == result.tokens > 0
    assert summary["latency all p50/p95 s"][2] == 32
    # the server counted every request as a success
    metrics = load.server_metrics(running)
    assert metrics['hybridnas_requests_total{status="200"}'] >= 32


def test_the_client_counts_errors(load, running):
    """A client that cannot connect is an error per conversation, not a crash (so 0 errors means something)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: connection refused
        result = load.run_clients(dead, 3, turns=2, max_tokens=2, timeout=5)
    assert len(result.errors) == 3 and all("Connect" in c.error for c in result.errors)
