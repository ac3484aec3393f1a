"""Decoder.feed on a continued conversation: the new tokens run as chunks of one ``step`` each, not one step per
token (the state-cache path of ``hybridnas serve``), and give the logits a prefill of the whole text gives."""

from __future__ import annotations

import pytest
import torch

from hybridnas import generation
from hybridnas.generation import Decoder
from hybridnas.model import HybridLM
from hybridnas.schema import ModelConfig

SMALL = {"A": {"n_heads": 2}, "M": {"d_state": 8, "headdim": 16, "chunk_size": 4},
         "R": {"head_size": 16, "decay_rank": 8, "a_rank": 8, "v_rank": 4, "gate_rank": 8, "chunk_size": 4},
         "H": {"filter": "modal"}, "S": {"d_state": 8}, "E": {"n_experts": 4, "top_k": 2}}


def _model(pattern: str, layers: dict | None = None) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(ModelConfig(vocab_size=50, d_model=32, pattern=pattern, layers=layers or SMALL)).eval()


def _count_steps(model: HybridLM, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    step = model.step

    def counted(ids, states):
        calls.append(ids.shape[-1] if ids.dim() == 2 else 1)
        return step(ids, states)

    monkeypatch.setattr(model, "step", counted)
    return calls


def test_continued_feed_runs_new_tokens_as_one_step(monkeypatch):
    model = _model("MMMA")
    dec = Decoder(model)
    dec.feed(list(range(20)))
    calls = _count_steps(model, monkeypatch)
    dec.feed(list(range(20, 36)))
    assert calls == [16]
    assert dec.seen == 36


def test_continued_feed_bounds_the_chunk(monkeypatch):
    model = _model("MA")
    dec = Decoder(model)
    dec.feed([1, 2, 3])
    calls = _count_steps(model, monkeypatch)
    dec.feed([i % 50 for i in range(generation.FEED_CHUNK * 2 + 5)])
    assert calls == [generation.FEED_CHUNK, generation.FEED_CHUNK, 5]


@pytest.mark.parametrize("pattern", ["AA", "MM", "RR", "HH", "SS", "MFEA", "AMRHSFE"])
def test_continued_feed_equals_a_prefill_of_everything(pattern):
    model = _model(pattern)
    ids = [(7 * i + 3) % 50 for i in range(23)]
    whole, _ = model.prefill(torch.tensor([ids]))
    dec = Decoder(model)
    dec.feed(ids[:6])
    dec.feed(ids[6:15])   # a chunk
    dec.feed(ids[15:16])  # one token
    dec.feed(ids[16:])    # another chunk
    assert dec.seen == len(ids)
    torch.testing.assert_close(dec.logits, whole[:, -1], atol=1e-5, rtol=1e-4)
    # and the state goes on decoding as a prefill's does
    ref = Decoder(model)
    ref.feed(ids)
    sampling = generation.Sampling(temperature=0)
    assert list(dec.generate(8, sampling)) == list(ref.generate(8, sampling))



def test_custom_layer_code_is_stepped_token_by_token(monkeypatch):
    model = _model("MA")
    # pretend the M block comes from code outside ``layers``: the contract promises only one-token steps there
    monkeypatch.setattr(type(model.blocks[0].layer), "__module__", "mypkg.layers")
    dec = Decoder(model)
    dec.feed([1, 2, 3])
    calls = _count_steps(model, monkeypatch)
    dec.feed([4, 5, 6, 7])
    assert calls == [1, 1, 1, 1]
