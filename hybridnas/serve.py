"""``hybridnas serve EXPORT``: an OpenAI-compatible completions server with a per-conversation state cache.

Endpoints (FastAPI + uvicorn; the ``serve`` extra):

- ``POST /v1/completions``: the OpenAI legacy completions request. ``prompt`` is a string (encoded with the
  folder's tokenizer), a list of token ids, or a one-element list of either; ``max_tokens`` (default 16),
  ``temperature`` (0-2, default 1; 0 is greedy), ``top_p`` (default 1), ``top_k`` and ``seed`` (extensions),
  ``stream`` (server-sent events: ``data: {chunk}`` lines, then ``data: [DONE]``; ``stream_options:
  {"include_usage": true}`` adds a usage chunk), ``model`` (echoed), ``n`` (only 1), ``conversation_id``.
- ``GET /health``: 200 ``{"status": "ok"}``.
- ``GET /metrics``: Prometheus text (``hybridnas_`` metrics: requests by status, prompt and generated tokens, request
  latency, time to first token and decode batch size histograms, state cache hits/misses/evictions, bytes and entries).

Conversations: every response carries a ``conversation_id``; the decoding state of every block after the reply
(the KV cache of attention blocks, the recurrent state of Mamba/RWKV/Hyena blocks) is kept under it. A request
that sends that id back continues the conversation: its prompt is only the new tokens, and only they are run
(``usage.prompt_tokens``; ``usage.cached_tokens`` counts the tokens the state already covers). The cache keeps at
most ``cache_bytes`` of state (least recently used evicted first) and drops an entry unused for ``cache_ttl``
seconds; an unknown or expired id is a 404. Concurrent requests are batched (:class:`Batcher`): one worker thread
runs the model, prefills each new request on its own, and steps all requests in their decode phase together in one
forward (recurrent states stacked along the batch axis; attention KV caches of different lengths as one ragged
state, each row attending to its own cache at its own positions: no padding, no mask; a state that grows otherwise,
such as implicit Hyena's cached inputs, batches with equally long ones); ``hybridnas_batch_size``
histograms the batch of every decode forward. A client that leaves a stream early ends its
conversation (its state is not kept).

Errors are JSON ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for a bad request (malformed
JSON, a missing or mistyped field, a negative count, a prompt past the context limit, an unknown conversation) and
500 for a failure of the server's own; no request stops the server.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from starlette.requests import Request  # module level: FastAPI resolves the endpoints' annotations here

from hybridnas import generation
from hybridnas.generation import Decoder, Export, Sampling, batch_key, step_batch
from hybridnas.hf_tokenizer import StreamDecoder

DEFAULT_CONTEXT = 2048


class RequestError(Exception):
    """A bad request: becomes a JSON error with ``status``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict[str, Any]:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------- state cache


@dataclass
class _Entry:
    decoder: Decoder
    nbytes: int
    last_used: float


class StateCache:
    """conversation id -> :class:`Decoder`, bounded by bytes (LRU eviction) and by idle time (TTL).

    ``take`` removes the entry (the request owns it while it decodes) and ``put`` stores it back."""

    def __init__(self, max_bytes: int, ttl: float, metrics: Metrics | None = None, clock=time.monotonic):
        self.max_bytes, self.ttl, self.metrics, self.clock = max_bytes, ttl, metrics, clock
        self.entries: OrderedDict[str, _Entry] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def _drop(self, key: str) -> None:
        entry = self.entries.pop(key)
        self.bytes -= entry.nbytes

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, e in self.entries.items() if now - e.last_used > self.ttl]:
            self._drop(key)
            self._count("evictions", reason="ttl")

    def _count(self, what: str, **labels) -> None:
        if self.metrics is not None:
            self.metrics.cache_event(what, **labels)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.cache_size(self.bytes, len(self.entries))

    def take(self, key: str) -> Decoder | None:
        with self.lock:
            self._expire()
            entry = self.entries.get(key)
            if entry is None:
                self._count("misses")
                self._gauge()
                return None
            self._drop(key)
            self._count("hits")
            self._gauge()
            return entry.decoder

    def put(self, key: str, decoder: Decoder) -> bool:
        """Store ``decoder`` under ``key``, evicting the least recently used entries to fit; False when it alone
        exceeds the budget (then it is not kept)."""
        nbytes = decoder.nbytes()
        with self.lock:
            self._expire()
            if key in self.entries:
                self._drop(key)
            if nbytes > self.max_bytes:
                self._count("evictions", reason="size")
                self._gauge()
                return False
            while self.entries and self.bytes + nbytes > self.max_bytes:
                self._drop(next(iter(self.entries)))
                self._count("evictions", reason="lru")
            self.entries[key] = _Entry(decoder, nbytes, self.clock())
            self.bytes += nbytes
            self._gauge()
            return True

    def __contains__(self, key: str) -> bool:
        with self.lock:
            self._expire()
            return key in self.entries


# ---------------------------------------------------------------------------------------------- metrics


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (two servers in one process do not clash)."""

    def __init__(self, model_name: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hybridnas_requests", "Completion requests by HTTP status", ["status"], registry=r)
        self.prompt_tokens = Counter("hybridnas_prompt_tokens", "Prompt tokens run through the model", registry=r)
        self.generation_tokens = Counter("hybridnas_generation_tokens", "Tokens generated", registry=r)
        self.latency = Histogram("hybridnas_e2e_request_latency_seconds", "Completion request latency", registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.ttft = Histogram("hybridnas_time_to_first_token_seconds", "Time to the first generated token",
                              registry=r, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.cache_hits = Counter("hybridnas_state_cache_hits", "Conversations continued from a cached state",
                                  registry=r)
        self.cache_misses = Counter("hybridnas_state_cache_misses", "Conversation ids not in the cache", registry=r)
        self.cache_evictions = Counter("hybridnas_state_cache_evictions", "States dropped (lru, ttl, size)",
                                       ["reason"], registry=r)
        self.cache_bytes = Gauge("hybridnas_state_cache_bytes", "Bytes of cached decoding state", registry=r)
        self.cache_entries = Gauge("hybridnas_state_cache_entries", "Cached conversations", registry=r)
        self.batch_size = Histogram("hybridnas_batch_size", "Sequences stepped together in one decode forward",
                                    registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.running = Gauge("hybridnas_num_requests_running", "Requests decoding now", registry=r)
        info = Gauge("hybridnas_build_info", "The served model", ["model"], registry=r)
        info.labels(model=model_name).set(1)

    def cache_event(self, what: str, reason: str | None = None) -> None:
        if what == "hits":
            self.cache_hits.inc()
        elif what == "misses":
            self.cache_misses.inc()
        else:
            self.cache_evictions.labels(reason=reason or "lru").inc()

    def cache_size(self, nbytes: int, entries: int) -> None:
        self.cache_bytes.set(nbytes)
        self.cache_entries.set(entries)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


# ---------------------------------------------------------------------------------------------- batching


@dataclass
class _Slot:
    """One request in the batcher: its decoder, what is left to do, and the queue its events go to."""

    decoder: Decoder
    ids: list[int]
    max_tokens: int
    sampling: Sampling
    eos: int | None
    events: queue.Queue
    generator: Any = None
    n: int = 0
    in_batch: bool = False  # prefilled and still decoding
    cancelled: bool = False


class Batcher:
    """Continuous batching of decode steps: one worker thread owns the model. Each turn of its loop it prefills
    the requests that arrived (one at a time), samples one token for every request in its decode phase (each with
    its own sampling settings and seeded generator), and steps the tokens in with one forward per group of
    requests whose states stack (:func:`hybridnas.generation.batch_key`: recurrent states of Mamba/RWKV/... have
    fixed shapes and are concatenated along the batch axis; the attention layer takes KV caches of different
    lengths as one ragged state, batching the projections and attending each row to its own cache at its own RoPE
    positions, so no padding or key mask is needed; a state nothing knows how to stack decodes alone). Requests
    join and leave between steps. A request that fails (its prefill, its sampling, or its own step after a failed
    batched step is retried row by row) gets the error; the others go on. Events on a slot's queue:
    ``("fed", None)``, ``("token", id)``, ``("end", finish)``, ``("error", exception)``."""

    def __init__(self, model, metrics: Metrics):
        self.model, self.metrics = model, metrics
        self.cond = threading.Condition()
        self.pending: list[_Slot] = []
        self.thread: threading.Thread | None = None

    def submit(self, slot: _Slot) -> None:
        with self.cond:
            self.pending.append(slot)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._loop, name="hybridnas-batcher", daemon=True)
                self.thread.start()
            self.cond.notify()

    def _loop(self) -> None:
        active: list[_Slot] = []
        while True:
            with self.cond:
                while not self.pending and not active:
                    self.cond.wait()
                arrived, self.pending = self.pending, []
            for slot in arrived:
                if slot.cancelled:
                    continue
                try:
                    slot.decoder.feed(slot.ids)
                    if slot.sampling.seed is not None and slot.sampling.temperature > 0:
                        slot.generator = torch.Generator(device=slot.decoder.logits.device).manual_seed(
                            slot.sampling.seed)
                except Exception as e:  # noqa: BLE001  (this request fails, the server goes on)
                    slot.events.put(("error", e))
                    continue
                slot.in_batch = True
                slot.events.put(("fed", None))
                if slot.max_tokens == 0:
                    slot.events.put(("end", "length"))
                else:
                    active.append(slot)
            active = [s for s in active if not s.cancelled]
            try:
                self._step(active)
            except Exception as e:  # noqa: BLE001  (a bug here must not leave requests waiting forever)
                for slot in active:
                    self._fail(slot, e)
            active = [s for s in active if not s.cancelled and s.n < s.max_tokens and s.in_batch]

    def _step(self, active: list[_Slot]) -> None:
        tokens: dict[int, int] = {}
        for slot in active:
            try:
                tokens[id(slot)] = int(generation.sample(slot.decoder.logits, slot.sampling, slot.generator)[0])
            except Exception as e:  # noqa: BLE001
                self._fail(slot, e)
        groups: dict[Any, list[_Slot]] = {}
        for slot in active:
            if id(slot) in tokens:
                sig = batch_key(self.model, slot.decoder.states)
                groups.setdefault(("alone", id(slot)) if sig is None else sig, []).append(slot)
        for group in groups.values():
            try:
                step_batch(self.model, [s.decoder for s in group], [tokens[id(s)] for s in group])
                done = group
                self.metrics.batch_size.observe(len(group))
            except Exception as e:  # noqa: BLE001  (one bad row must not fail the others: retry them one by one)
                if len(group) == 1:
                    self._fail(group[0], e)
                    continue
                done = []
                for slot in group:
                    try:
                        step_batch(self.model, [slot.decoder], [tokens[id(slot)]])
                        done.append(slot)
                        self.metrics.batch_size.observe(1)
                    except Exception as e1:  # noqa: BLE001
                        self._fail(slot, e1)
            for slot in done:
                tok = tokens[id(slot)]
                slot.n += 1
                slot.events.put(("token", tok))
                if slot.eos is not None and tok == slot.eos:
                    slot.events.put(("end", "stop"))
                    slot.in_batch = False  # leaves the batch
                elif slot.n >= slot.max_tokens:
                    slot.events.put(("end", "length"))

    @staticmethod
    def _fail(slot: _Slot, e: Exception) -> None:
        slot.events.put(("error", e))
        slot.in_batch = False  # leaves the batch


# ---------------------------------------------------------------------------------------------- requests


@dataclass
class Completion:
    """A validated completions request."""

    ids: list[int]
    max_tokens: int
    sampling: Sampling
    stream: bool
    include_usage: bool
    model: str
    conversation_id: str | None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class Server:
    """The model, its cache and metrics, and the request logic (no HTTP: :func:`make_app` wraps it)."""

    def __init__(self, export: Export, *, max_context: int | None = None, cache_bytes: int = 256 << 20,
                 cache_ttl: float = 600.0, model_name: str | None = None):
        self.export = export
        from pathlib import Path

        self.model_name = model_name or Path(export.folder).resolve().name
        config_ctx = export.config.get("max_position_embeddings")
        self.max_context = int(max_context or config_ctx or DEFAULT_CONTEXT)
        self.metrics = Metrics(self.model_name)
        self.cache = StateCache(cache_bytes, cache_ttl, self.metrics)
        self.batcher = Batcher(export.model, self.metrics)

    # -- validation ------------------------------------------------------------------------------------------

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if self.export.tokenizer is None:
                raise RequestError("this model has no tokenizer: send the prompt as a list of token ids", "prompt")
            try:
                ids = self.export.tokenizer.encode(prompt)
            except ValueError as e:
                raise RequestError(str(e), "prompt") from None
        elif isinstance(prompt, list) and all(_is_int(t) for t in prompt):
            ids = list(prompt)
        else:
            raise RequestError("prompt must be a string or a list of token ids (one prompt per request)", "prompt")
        if not ids:
            raise RequestError("prompt is empty", "prompt")
        try:
            self.export.check_ids(ids)
        except ValueError as e:
            raise RequestError(str(e), "prompt") from None
        return ids

    def parse(self, body: Any) -> Completion:
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        if "prompt" not in body:
            raise RequestError("missing required field 'prompt'", "prompt")
        ids = self._prompt_ids(body["prompt"])
        max_tokens = body.get("max_tokens", 16)
        if not _is_int(max_tokens) or max_tokens < 0:
            raise RequestError(f"max_tokens must be an integer >= 0, got {max_tokens!r}", "max_tokens")
        temperature = body.get("temperature", 1.0)
        if temperature is None:
            temperature = 1.0
        if not _is_number(temperature) or not 0 <= temperature <= 2:
            raise RequestError(f"temperature must be a number in [0, 2], got {temperature!r}", "temperature")
        top_p = body.get("top_p", 1.0)
        if top_p is None:
            top_p = 1.0
        if not _is_number(top_p) or not 0 < top_p <= 1:
            raise RequestError(f"top_p must be a number in (0, 1], got {top_p!r}", "top_p")
        top_k = body.get("top_k")
        if top_k is not None and (not _is_int(top_k) or top_k < 1):
            raise RequestError(f"top_k must be an integer >= 1, got {top_k!r}", "top_k")
        seed = body.get("seed")
        if seed is not None and not _is_int(seed):
            raise RequestError(f"seed must be an integer, got {seed!r}", "seed")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(f"stream must be true or false, got {stream!r}", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise RequestError("stream_options must be an object", "stream_options")
        n = body.get("n", 1)
        if n != 1 or not _is_int(n):
            raise RequestError(f"only n=1 is supported, got {n!r}", "n")
        model = body.get("model", self.model_name)
        if not isinstance(model, str):
            raise RequestError(f"model must be a string, got {model!r}", "model")
        conv = body.get("conversation_id")
        if conv is not None and (not isinstance(conv, str) or not conv):
            raise RequestError(f"conversation_id must be a non-empty string, got {conv!r}", "conversation_id")
        return Completion(ids, max_tokens, Sampling(float(temperature), top_k, float(top_p), seed), stream,
                          bool(options.get("include_usage", False)), model, conv)

    def start(self, req: Completion) -> tuple[str, Decoder]:
        """The decoder a request continues (taken out of the cache) or a new one; 404 for an unknown id, 400 past
        the context limit."""
        if req.conversation_id is not None:
            decoder = self.cache.take(req.conversation_id)
            if decoder is None:
                raise RequestError(f"unknown or expired conversation_id {req.conversation_id!r}", "conversation_id",
                                   404, "conversation_not_found")
            conv = req.conversation_id
        else:
            conv, decoder = f"conv-{uuid.uuid4().hex}", Decoder(self.export.model)
        total = decoder.seen + len(req.ids) + req.max_tokens
        if total > self.max_context:
            if req.conversation_id is not None:
                self.cache.put(conv, decoder)  # a refused request leaves the conversation as it was
            raise RequestError(f"{decoder.seen} cached + {len(req.ids)} prompt + {req.max_tokens} max_tokens = "
                               f"{total} tokens exceeds the context limit of {self.max_context}", "prompt", 400,
                               "context_length_exceeded")
        return conv, decoder

    # -- decoding --------------------------------------------------------------------------------------------

    def run(self, req: Completion, conv: str, decoder: Decoder) -> Iterator[tuple[str, int | None, str | None]]:
        """Yield ``(text delta, token or None, finish_reason or None)``; the state goes back to the cache at the
        end."""
        t0 = time.perf_counter()
        cached = decoder.seen
        text = StreamDecoder(self.export.tokenizer)
        eos = self.export.eos_id
        n = 0
        finish = "length"
        slot = _Slot(decoder, list(req.ids), req.max_tokens, req.sampling, eos, queue.Queue())
        self.metrics.running.inc()
        try:
            self.batcher.submit(slot)
            while True:
                # wait for the batcher's next event for this request; nothing is locked across a yield, so a client
                # that stops reading a stream holds up no one (its slot is cancelled when the generator closes)
                kind, value = slot.events.get()
                if kind == "error":
                    raise value
                if kind == "fed":
                    self.metrics.prompt_tokens.inc(len(req.ids))
                    continue
                if kind == "end":
                    finish = value
                    break
                tok = value
                if n == 0:
                    self.metrics.ttft.observe(time.perf_counter() - t0)
                n += 1
                self.metrics.generation_tokens.inc()
                if tok == eos:
                    continue  # the "end" event ("stop") follows
                yield text.push(tok), tok, None
            self.cache.put(conv, decoder)
            yield text.flush(), None, finish
        finally:
            slot.cancelled = True  # a closed generator (a client gone mid-stream) leaves the batch
            self.metrics.running.dec()
            decoder.extra["usage"] = {"prompt_tokens": len(req.ids), "completion_tokens": n,
                                      "total_tokens": len(req.ids) + n, "cached_tokens": cached}
            self.metrics.latency.observe(time.perf_counter() - t0)


def _chunk(cid: str, created: int, model: str, conv: str, text: str, finish: str | None) -> dict[str, Any]:
    return {"id": cid, "object": "text_completion", "created": created, "model": model, "conversation_id": conv,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}


def make_app(server: Server):
    """The FastAPI app around ``server``."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="hybridnas", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = server.metrics

    def error(e: RequestError) -> JSONResponse:
        metrics.requests.labels(status=str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse({"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}},
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": {"message": str(exc), "type": "invalid_request_error", "param": None,
                                       "code": None}}, status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}: {exc}",
                                       "type": "server_error", "param": None, "code": None}}, status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "hybridnas"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return error(RequestError("the request body is not valid JSON"))
        try:
            req = server.parse(body)
            conv, decoder = server.start(req)
        except RequestError as e:
            return error(e)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        if req.stream:
            def events() -> Iterator[str]:
                try:
                    for delta, _tok, finish in server.run(req, conv, decoder):
                        if delta or finish:
                            yield f"data: {json.dumps(_chunk(cid, created, req.model, conv, delta, finish))}\n\n"
                    if req.include_usage:
                        usage = {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                                 "choices": [], "usage": decoder.extra.get("usage")}
                        yield f"data: {json.dumps(usage)}\n\n"
                    metrics.requests.labels(status="200").inc()
                except Exception as e:  # noqa: BLE001  (headers are sent: report in the stream, keep serving)
                    metrics.requests.labels(status="500").inc()
                    err = {"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error"}}
                    yield f"data: {json.dumps(err)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        def complete() -> dict[str, Any]:
            pieces, tokens, finish = [], [], "length"
            for delta, tok, fin in server.run(req, conv, decoder):
                pieces.append(delta)
                if tok is not None:
                    tokens.append(tok)
                if fin:
                    finish = fin
            out = _chunk(cid, created, req.model, conv, "".join(pieces), finish)
            out["choices"][0]["tokens"] = tokens
            out["usage"] = decoder.extra.get("usage")
            return out

        try:
            result = await run_in_threadpool(complete)
        except Exception as e:  # noqa: BLE001  (a failure of one request never stops the server)
            metrics.requests.labels(status="500").inc()
            return JSONResponse({"error": {"message": f"internal error: {type(e).__name__}: {e}",
                                           "type": "server_error", "param": None, "code": None}}, status_code=500)
        metrics.requests.labels(status="200").inc()
        return result

    return app


def serve(folder: str, *, host: str = "127.0.0.1", port: int = 8000, max_context: int | None = None,
          cache_bytes: int = 256 << 20, cache_ttl: float = 600.0, trust_custom_code: bool = False,
          device: str = "cpu") -> None:
    """Load ``folder`` and serve it until interrupted."""
    import uvicorn

    from hybridnas.generation import load_export

    server = Server(load_export(folder, trust_custom_code=trust_custom_code, device=device), max_context=max_context,
                    cache_bytes=cache_bytes, cache_ttl=cache_ttl)
    print(f"serving {folder} ({server.model_name}) on http://{host}:{port}/v1/completions; context "
          f"{server.max_context} tokens, state cache {cache_bytes} bytes, ttl {cache_ttl:g} s (Ctrl-C stops it)",
          flush=True)
    uvicorn.run(make_app(server), host=host, port=port, log_level="warning")
