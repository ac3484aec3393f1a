"""Token-by-token decoding from a :class:`hybridnas.model.HybridLM`'s prefill/step, for ``hybridnas generate`` and
``hybridnas serve``.

:class:`Decoder` holds one sequence's decoding state (every block's state plus the logits for the next token) and
extends it: :meth:`Decoder.feed` runs new prompt tokens (a prefill when the state is empty, else one ``step`` per
chunk of up to :data:`FEED_CHUNK` new tokens, so a continued conversation processes only its new tokens, in one
layer call per chunk rather than one per token), :meth:`Decoder.generate` yields sampled tokens
one at a time and steps each one in, so the state afterwards covers every token seen. Greedy decoding
(``temperature=0``) picks the same tokens as ``HybridLM.generate``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from hybridnas.model import HybridLM

#: new tokens of a continued sequence run through one ``step`` call at most this many at a time (an attention
#: block's step attends a chunk to the whole cache with an explicit mask: chunk x cache scores in memory)
FEED_CHUNK = 256


def steps_chunks(model: HybridLM) -> bool:
    """Whether every block's ``step`` takes several tokens at once: true of the built-in layers (``layers.*``,
    tested in tests/test_decode_feed.py); the mixer contract asks a custom layer only for one-token steps."""
    return all(type(b.layer).__module__.split(".")[0] == "layers" for b in model.blocks)


@dataclass
class Sampling:
    """``temperature`` 0: greedy; else softmax at that temperature after the top-k and nucleus (top-p) cuts."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None

    def check(self) -> Sampling:
        if not (isinstance(self.temperature, int | float) and not isinstance(self.temperature, bool)
                and 0 <= self.temperature < float("inf")):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if not (isinstance(self.top_p, int | float) and not isinstance(self.top_p, bool) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        return self


def sample(logits: torch.Tensor, cfg: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits (B, V)``."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    scores = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < scores.size(-1):
        kth = torch.topk(scores, cfg.top_k).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = F.softmax(sorted_scores, -1)
        # drop a token when the tokens ranked above it already reach top_p (the first one always stays)
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    return torch.multinomial(F.softmax(scores, -1), 1, generator=generator)[:, 0]


@dataclass
class Decoder:
    """One sequence's decoding state: ``states`` (one entry per block), ``logits`` for the next token (``(1, V)``)
    and the number of tokens ``seen``."""

    model: HybridLM
    states: list[Any] | None = None
    logits: torch.Tensor | None = None
    seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def feed(self, ids: list[int]) -> None:
        """Run new tokens: a prefill on an empty state, else ``step`` from the state on chunks of at most
        :data:`FEED_CHUNK` tokens (one token at a time where a block's layer is custom code)."""
        if not ids:
            return
        device = self.model.embed.weight.device
        x = torch.tensor([ids], dtype=torch.long, device=device)
        if self.states is None:
            logits, self.states = self.model.prefill(x)
            self.logits = logits[:, -1]
        else:
            size = FEED_CHUNK if steps_chunks(self.model) else 1
            for i in range(0, x.shape[1], size):
                chunk = x[:, i:i + size]
                self.logits, self.states = self.model.step(chunk[:, 0] if size == 1 else chunk, self.states)
        self.seen += len(ids)

    @torch.no_grad()
    def generate(self, max_new_tokens: int, cfg: Sampling, eos_id: int | None = None) -> Iterator[int]:
        """Yield up to ``max_new_tokens`` tokens (stopping after ``eos_id``); each is stepped into the state."""
        if self.logits is None:
            raise ValueError("nothing to continue from: feed at least one token first")
        gen = None
        if cfg.seed is not None and cfg.temperature > 0:
            gen = torch.Generator(device=self.logits.device).manual_seed(cfg.seed)
        for _ in range(max_new_tokens):
            tok = sample(self.logits, cfg, gen)
            self.logits, self.states = self.model.step(tok, self.states)
            self.seen += 1
            yield int(tok[0])
            if eos_id is not None and int(tok[0]) == eos_id:
                return

    def nbytes(self) -> int:
        return state_nbytes([self.states, self.logits])


def state_nbytes(states: Any) -> int:
    """Bytes of every tensor in a model's decoding state (nested lists, tuples and dicts)."""
    total, stack = 0, [states]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return total


def state_signature(states: Any) -> tuple | None:
    """What must be equal for two one-sequence states of a block to be concatenated along the batch axis: the
    structure, every tensor's shape past the batch axis, dtype and device, and every other value. None when a
    tensor has no batch axis of 1 (a state that cannot be stacked this way)."""
    if isinstance(states, torch.Tensor):
        if states.dim() == 0 or states.shape[0] != 1:
            return None
        return ("T", tuple(states.shape[1:]), states.dtype, str(states.device))
    if isinstance(states, dict):
        parts = []
        for k in sorted(states, key=repr):
            sig = state_signature(states[k])
            if sig is None:
                return None
            parts.append((k, sig))
        return ("D", tuple(parts))
    if isinstance(states, (list, tuple)):
        parts = []
        for v in states:
            sig = state_signature(v)
            if sig is None:
                return None
            parts.append(sig)
        return ("L" if isinstance(states, list) else "U", tuple(parts))
    try:
        hash(states)
    except TypeError:
        return None
    return ("V", type(states).__name__, states)


def stack_states(rows: list[Any]) -> Any:
    """Stack one-sequence states of equal :func:`state_signature` along the batch axis (dim 0)."""
    first = rows[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(rows, dim=0)
    if isinstance(first, dict):
        return {k: stack_states([r[k] for r in rows]) for k in first}
    if isinstance(first, (list, tuple)):
        out = [stack_states([r[i] for r in rows]) for i in range(len(first))]
        return out if isinstance(first, list) else tuple(out)
    return first


def split_states(states: Any, n: int) -> list[Any]:
    """The inverse of :func:`stack_states`: ``n`` one-sequence states (each tensor row copied out of the batch, so
    a cached conversation keeps only its own bytes)."""
    if isinstance(states, torch.Tensor):
        return [states[i:i + 1].clone() for i in range(n)]
    if isinstance(states, dict):
        parts = {k: split_states(v, n) for k, v in states.items()}
        return [{k: parts[k][i] for k in states} for i in range(n)]
    if isinstance(states, (list, tuple)):
        cols = [split_states(v, n) for v in states]
        rows = [[c[i] for c in cols] for i in range(n)]
        return rows if isinstance(states, list) else [tuple(r) for r in rows]
    return [states] * n


def _ragged(layer: Any) -> bool:
    """Whether ``layer`` stacks its own states (sequences of different lengths in one batch: attention)."""
    return callable(getattr(layer, "stack_states", None)) and callable(getattr(layer, "split_state", None))


def batch_key(model: HybridLM, states: list[Any]) -> tuple | None:
    """What must be equal for two sequences' decoding states (one entry per block) to step in one batch: per block,
    :func:`state_signature`, except a layer that stacks its own states (``stack_states``/``split_state``, as the
    attention layer does for KV caches of different lengths), which takes any. None: the state decodes alone."""
    parts: list[Any] = []
    for block, s in zip(model.blocks, states, strict=True):
        if _ragged(block.layer):
            parts.append(("ragged", id(block.layer)))
            continue
        sig = state_signature(s)
        if sig is None:
            return None
        parts.append(sig)
    return tuple(parts)


def stack_model_states(model: HybridLM, rows: list[list[Any]]) -> list[Any]:
    """The batch state of ``rows`` (one-sequence states of equal :func:`batch_key`), block by block."""
    out = []
    for i, block in enumerate(model.blocks):
        col = [r[i] for r in rows]
        out.append(block.layer.stack_states(col) if _ragged(block.layer) else stack_states(col))
    return out


def split_model_states(model: HybridLM, states: list[Any], n: int) -> list[list[Any]]:
    """The inverse of :func:`stack_model_states`: ``n`` one-sequence states."""
    cols = [block.layer.split_state(s, n) if _ragged(block.layer) else split_states(s, n)
            for block, s in zip(model.blocks, states, strict=True)]
    return [[c[i] for c in cols] for i in range(n)]


@torch.no_grad()
def step_batch(model: HybridLM, decoders: list[Decoder], tokens: list[int]) -> None:
    """Step ``tokens[i]`` into ``decoders[i]`` for all of them in one forward of batch ``len(decoders)``: their
    states (equal :func:`batch_key`) are stacked, stepped and split back; each decoder's ``logits`` and ``seen``
    advance as :meth:`Decoder.generate` would."""
    device = model.embed.weight.device
    tok = torch.tensor(tokens, dtype=torch.long, device=device)
    if len(decoders) == 1:
        d = decoders[0]
        d.logits, d.states = model.step(tok, d.states)
        d.seen += 1
        return
    logits, states = model.step(tok, stack_model_states(model, [d.states for d in decoders]))
    for i, (d, s) in enumerate(zip(decoders, split_model_states(model, states, len(decoders)), strict=True)):
        d.logits, d.states = logits[i:i + 1].clone(), s
        d.seen += 1


@dataclass
class Export:
    """A loaded export folder: the model, its tokenizer (None without one) and its config.json."""

    folder: str
    model: HybridLM
    tokenizer: Any
    config: dict[str, Any]

    @property
    def eos_id(self) -> int | None:
        if self.tokenizer is not None and self.tokenizer.eos_id is not None:
            return int(self.tokenizer.eos_id)
        eos = self.config.get("eos_token_id")
        return eos if isinstance(eos, int) else None

    @property
    def vocab_size(self) -> int:
        return int(self.model.cfg.vocab_size)

    def check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")


def load_export(folder: str, *, trust_custom_code: bool = False, device: str = "cpu") -> Export:
    """Load an export folder (``hybridnas.build_model``) with its tokenizer; errors are ValueError/FileNotFoundError
    with one line naming the folder."""
    import json
    from pathlib import Path

    from hybridnas import hf_tokenizer
    from hybridnas.checkpoint import ARCH_FILE, CONFIG_FILE, build_model

    p = Path(folder)
    if not (p / ARCH_FILE).is_file():
        raise FileNotFoundError(f"{folder}: not an export folder (no {ARCH_FILE}); make one with hybridnas export")
    # custom layer code without trust_custom_code: UntrustedCodeError, a one-line ConfigError naming file and line
    model = build_model(p, device=device, trust_custom_code=trust_custom_code)
    config_file = p / CONFIG_FILE
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return Export(str(folder), model.eval(), hf_tokenizer.load(p), config)
