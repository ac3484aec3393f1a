"""Concurrent clients against ``hybridnas serve`` on 127.0.0.1.

Makes a tiny export (untrained: the load does not depend on the weights' values; byte tokenizer), starts
``hybridnas serve`` on a free port of 127.0.0.1 as its own process, then runs ``--clients`` clients at once
(asyncio + httpx, one connection each). Every client holds a conversation of ``--turns`` requests: the first sends
a text prompt, each later one sends only its new text with the ``conversation_id`` (continued from the server's
state cache); requests alternate plain JSON and SSE streaming. Reported: errors (any non-200, a malformed answer,
a wrong token count, a stream without ``[DONE]``), latency p50/p95 per request kind, time to first streamed token,
generated tokens per second over the whole run (wall clock, first request to last answer; tokens as
``usage.completion_tokens``, which counts a sampled end-of-text token: a request may stop there before
``--max-tokens``), and the server's own /metrics counters.

    python experiments/serve/load.py [--clients 64] [--turns 2] [--max-tokens 16] [--pattern MMMA] [--d-model 64]

The client code (:func:`run_clients`) is also what tests/test_serve_load.py runs against an in-process server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The cat sat on the mat. ", "Once upon a time, ", "State space models keep a fixed state; ",
           "Attention keeps every key and value. ", "In the beginning ", "A hybrid model mixes layers: "]


@dataclass
class Call:
    client: int
    turn: int
    stream: bool
    status: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    tokens: int = 0
    cached_tokens: int | None = None
    finish: str | None = None
    error: str | None = None


@dataclass
class LoadResult:
    clients: int
    turns: int
    max_tokens: int
    wall_s: float
    calls: list[Call] = field(default_factory=list)

    @property
    def errors(self) -> list[Call]:
        return [c for c in self.calls if c.error is not None]

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.calls)

    def summary(self) -> dict[str, Any]:
        def pct(xs: list[float], q: float) -> float | None:
            if not xs:
                return None
            xs = sorted(xs)
            return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]

        out: dict[str, Any] = {"clients": self.clients, "turns": self.turns, "max_tokens": self.max_tokens,
                               "requests": len(self.calls), "errors": len(self.errors), "tokens": self.tokens,
                               "wall_s": round(self.wall_s, 3),
                               "tokens_per_s": round(self.tokens / self.wall_s, 1) if self.wall_s else None}
        for name, sel in (("all", lambda c: True), ("plain", lambda c: not c.stream),
                          ("stream", lambda c: c.stream), ("first turn", lambda c: c.turn == 0),
                          ("continued", lambda c: c.turn > 0)):
            lat = [c.latency_s for c in self.calls if sel(c) and c.error is None]
            out[f"latency {name} p50/p95 s"] = (None if not lat else
                                                (round(pct(lat, 0.5), 3), round(pct(lat, 0.95), 3), len(lat)))
        ttft = [c.ttft_s for c in self.calls if c.ttft_s is not None]
        out["ttft stream p50/p95 s"] = None if not ttft else (round(pct(ttft, 0.5), 3), round(pct(ttft, 0.95), 3))
        return out


async def _one(http: Any, call: Call, prompt: str, max_tokens: int, conv: str | None) -> str | None:
    body: dict[str, Any] = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8,
                            "seed": call.client * 100 + call.turn, "stream": call.stream}
    if call.stream:
        body["stream_options"] = {"include_usage": True}
    if conv is not None:
        body["conversation_id"] = conv
    t0 = time.perf_counter()
    try:
        if not call.stream:
            r = await http.post("/v1/completions", json=body)
            call.status = r.status_code
            if r.status_code != 200:
                call.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return None
            data = r.json()
            call.tokens = data["usage"]["completion_tokens"]  # as streamed: counts an end-of-text token
            call.finish = data["choices"][0]["finish_reason"]
            call.cached_tokens = data["usage"]["cached_tokens"]
            conv = data["conversation_id"]
        else:
            done = False
            async with http.stream("POST", "/v1/completions", json=body) as r:
                call.status = r.status_code
                if r.status_code != 200:
                    call.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                    return None
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    payload = line[len("data: "):]
                    if payload == "[DONE]":
                        done = True
                        continue
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        call.error = f"stream error: {chunk['error']}"
                    elif chunk.get("usage"):
                        call.tokens = chunk["usage"]["completion_tokens"]
                        call.cached_tokens = chunk["usage"]["cached_tokens"]
                    else:
                        if call.ttft_s is None:
                            call.ttft_s = time.perf_counter() - t0
                        conv = chunk["conversation_id"]
                        call.finish = chunk["choices"][0]["finish_reason"] or call.finish
            if not done and call.error is None:
                call.error = "stream ended without [DONE]"
        if call.error is None and call.finish not in ("length", "stop"):
            call.error = f"finish_reason {call.finish!r}"
        if call.error is None and (call.tokens > max_tokens or call.finish == "length" and call.tokens != max_tokens):
            call.error = f"{call.tokens} tokens, expected {max_tokens} (finish_reason {call.finish})"
        if call.error is None and call.turn > 0 and not call.cached_tokens:
            call.error = "a continued turn did not start from the cached state"
    except Exception as e:  # noqa: BLE001  (every failure is counted, none stops the run)
        call.error = f"{type(e).__name__}: {e}"
    finally:
        call.latency_s = time.perf_counter() - t0
    return conv


async def _client(base_url: str, i: int, turns: int, max_tokens: int, calls: list[Call], timeout: float) -> None:
    import httpx

    conv = None
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as http:
        for turn in range(turns):
            call = Call(i, turn, stream=(i + turn) % 2 == 1)
            calls.append(call)
            prompt = PROMPTS[i % len(PROMPTS)] if turn == 0 else f" and then turn {turn}: "
            conv = await _one(http, call, prompt, max_tokens, conv)
            if conv is None:
                return


async def _run(base_url: str, clients: int, turns: int, max_tokens: int, timeout: float) -> LoadResult:
    calls: list[Call] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(base_url, i, turns, max_tokens, calls, timeout) for i in range(clients)))
    return LoadResult(clients, turns, max_tokens, time.perf_counter() - t0, sorted(calls, key=lambda c: (c.client,
                                                                                                        c.turn)))


def run_clients(base_url: str, clients: int, *, turns: int = 2, max_tokens: int = 16,
                timeout: float = 300.0) -> LoadResult:
    """``clients`` concurrent conversations of ``turns`` requests each against ``base_url``."""
    return asyncio.run(_run(base_url, clients, turns, max_tokens, timeout))


def make_export(folder: Path, pattern: str, d_model: int, seq_len: int) -> Path:
    import torch

    from hybridnas.checkpoint import save_checkpoint
    from hybridnas.config import ArchConfig, ModelConfig, TaskSpec, TrainConfig
    from hybridnas.model import HybridLM

    task = TaskSpec("lm", {"path": str(ROOT / "data/prose.txt"), "tokenizer": "bytes", "seq_len": seq_len})
    arch = ArchConfig(ModelConfig(vocab_size=257, d_model=d_model, pattern=pattern), task, TrainConfig(steps=1),
                      {}, "serve-load")
    torch.manual_seed(0)
    return save_checkpoint(folder, arch, HybridLM(arch.model).eval(), tokenizer=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base_url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"hybridnas serve exited with {proc.returncode}")
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("hybridnas serve did not answer /health")


def server_metrics(base_url: str) -> dict[str, float]:
    import httpx

    keep = ("hybridnas_requests_total", "hybridnas_generation_tokens_total", "hybridnas_prompt_tokens_total",
            "hybridnas_state_cache_hits_total", "hybridnas_state_cache_misses_total", "hybridnas_batch_size_count",
            "hybridnas_batch_size_sum", "hybridnas_batch_size_bucket")
    out = {}
    for line in httpx.get(base_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(keep):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--pattern", default="MMMA")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--json", help="also write the calls and the summary here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_export(Path(tmp) / "export", args.pattern, args.d_model, seq_len=1024)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "hybridnas.cli", "serve", str(folder), "--host", "127.0.0.1", "--port",
               str(port)]
        print(f"$ hybridnas serve EXPORT --host 127.0.0.1 --port {port}   (pattern {args.pattern}, d_model "
              f"{args.d_model}, vocab 257, untrained)", flush=True)
        proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            wait_healthy(base, proc)
            print(f"# uptime before: {os.popen('uptime').read().strip()}", flush=True)
            result = run_clients(base, args.clients, turns=args.turns, max_tokens=args.max_tokens)
            print(f"# uptime after:  {os.popen('uptime').read().strip()}", flush=True)
            metrics = server_metrics(base)
        finally:
            proc.terminate()
            proc.wait(30)
    summary = result.summary()
    for k, v in summary.items():
        print(f"{k}: {v}")
    for k, v in metrics.items():
        print(f"server {k} = {v:g}")
    if metrics.get("hybridnas_batch_size_count"):
        print(f"decode forwards: {metrics['hybridnas_batch_size_count']:g}, mean batch "
              f"{metrics['hybridnas_batch_size_sum'] / metrics['hybridnas_batch_size_count']:.2f}")
    for c in result.errors[:10]:
        print(f"error: client {c.client} turn {c.turn}: {c.error}")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "server_metrics": metrics,
                                               "calls": [asdict(c) for c in result.calls]}, indent=1))
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
