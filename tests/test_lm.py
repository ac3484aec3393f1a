"""Text LM task: local sources through `datasets`, byte tokenizer, deterministic split, the on-disk cache,
streaming for large corpora, bits per byte, a tokenizers JSON file, and the shipped search space."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")

from hybridnas.config import ArchConfig, ModelConfig, TaskSpec, TrainConfig, load_space  # noqa: E402
from hybridnas.tasks import build_task  # noqa: E402
from hybridnas.tasks.base import TaskConfigError  # noqa: E402
from hybridnas.tasks.lm import (  # noqa: E402
    BYTE_EOS,
    LMConfig,
    build,
    cache_path,
    resolve_source,
    tokenize_to_cache,
)
from hybridnas.train import train  # noqa: E402
from hybridnas.trainers import trainer_for  # noqa: E402

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}. Café.\n" for i in range(300))


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def cfg(path, tmp_path, **kw) -> LMConfig:
    return LMConfig(**{"path": path if isinstance(path, list) else str(path), "seq_len": 32, "split_block": 256,
                       "valid_fraction": 0.2, "cache_dir": str(tmp_path / "cache"), **kw})


def _stream(folder: Path, name: str, dtype: str = "uint16") -> bytes:
    import numpy as np

    return np.fromfile(folder / name, dtype=dtype)


def test_text_file_bytes_round_trip_and_split(corpus, tmp_path):
    c = cfg(corpus, tmp_path)
    assert c.vocab_size == 257
    folder = tokenize_to_cache(c)
    meta = json.loads((folder / "meta.json").read_text())
    raw = TEXT.encode("utf-8")
    assert meta["train_tokens"] + meta["valid_tokens"] == len(raw)  # text files: the stream is the file
    assert meta["train_bytes"] + meta["valid_bytes"] == len(raw)
    train_ids, valid_ids = _stream(folder, "train.bin"), _stream(folder, "valid.bin")
    # blocks 4, 9, 14, ... (period 5) are validation; interleave them back into the file
    blocks, t, v = [], 0, 0
    b = 0
    while t < len(train_ids) or v < len(valid_ids):
        if b % 5 == 4:
            blocks.append(valid_ids[v:v + 256])
            v += 256
        else:
            blocks.append(train_ids[t:t + 256])
            t += 256
        b += 1
    assert bytes(int(x) for blk in blocks for x in blk) == raw
    assert 0.1 < meta["valid_tokens"] / len(raw) < 0.3


def test_build_windows_and_bits_per_byte(corpus, tmp_path):
    data = build(cfg(corpus, tmp_path))
    assert data.vocab_size == 257 and data.bytes_per_token == 1.0
    assert data.train_inputs.shape[1] == 32 and data.valid_inputs.shape[1] == 32
    assert torch.equal(data.train_inputs[:, 1:], data.train_labels[:, :-1])  # next-token targets
    assert torch.equal(data.train_inputs[1:, 0], data.train_labels[:-1, -1])  # windows tile the stream
    assert data.train_stream is None
    arch = ArchConfig(ModelConfig(vocab_size=257, d_model=32, pattern="AF", layers={"A": {"n_heads": 2}}),
                      TaskSpec("lm", {}), TrainConfig(steps=6, batch_size=8, eval_every=3, warmup_steps=1,
                                                      target_accuracy=None, device="cpu"))
    res = train(arch, data)
    assert res.metrics["bits_per_byte"] == pytest.approx(res.metrics["loss"] / math.log(2))
    assert "bits_per_byte" in res.history[-1]
    assert res.metrics["bits_per_byte"] < math.log2(257) + 0.5


def test_deterministic_and_cached(corpus, tmp_path):
    a, b = build(cfg(corpus, tmp_path)), build(cfg(corpus, tmp_path))
    assert torch.equal(a.train_inputs, b.train_inputs) and torch.equal(a.valid_inputs, b.valid_inputs)
    folder = cache_path(cfg(corpus, tmp_path))
    assert (folder / "meta.json").exists()
    stamp = (folder / "train.bin").stat().st_mtime_ns
    build(cfg(corpus, tmp_path, seq_len=16))  # seq_len is not part of the cache key
    assert (folder / "train.bin").stat().st_mtime_ns == stamp
    assert len(list((tmp_path / "cache").iterdir())) == 1
    corpus.write_text(TEXT + "more text\n")  # a changed file is a new cache entry
    assert cache_path(cfg(corpus, tmp_path)) != folder


@pytest.mark.parametrize("field,value", [("seed", 1), ("valid_fraction", 0.5), ("split_block", 128),
                                         ("seq_len", 16), ("max_train_tokens", 2000), ("max_valid_tokens", 300)])
def test_fields_change_the_data(corpus, tmp_path, field, value):
    base = cfg(corpus, tmp_path)
    a, b = build(base), build(dataclasses.replace(base, **{field: value}))
    same = all(getattr(a, f).shape == getattr(b, f).shape and torch.equal(getattr(a, f), getattr(b, f))
               for f in ("train_inputs", "valid_inputs"))
    assert not same


def test_jsonl_records_end_with_eos_and_directory_sources(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    for k in range(2):
        (d / f"part{k}.jsonl").write_text("\n".join(json.dumps({"body": f"document {k}-{i} é"}) for i in range(60)))
    c = cfg(d, tmp_path, text_field="body", seq_len=16, split_block=64)
    folder = tokenize_to_cache(c)
    meta = json.loads((folder / "meta.json").read_text())
    ids = _stream(folder, "train.bin")
    assert int((ids == BYTE_EOS).sum()) > 0
    total_bytes = sum(len(f"document {k}-{i} é".encode()) for k in range(2) for i in range(60))
    assert meta["train_bytes"] + meta["valid_bytes"] == total_bytes  # EOS tokens count 0 bytes
    assert meta["train_tokens"] + meta["valid_tokens"] == total_bytes + 120
    data = build(c)
    assert data.bytes_per_token < 1.0
    with pytest.raises(TaskConfigError) as e:
        tokenize_to_cache(cfg(d, tmp_path, text_field="nope", cache_dir=str(tmp_path / "c2")))
    assert e.value.field == "text_field"


def test_parquet_source(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": [f"row {i} of the table" for i in range(200)]}), p)
    data = build(cfg(p, tmp_path, seq_len=16, split_block=128))
    assert data.train_inputs.size(0) > 0 and data.valid_inputs.size(0) > 0


def test_large_corpus_streams_from_disk(corpus, tmp_path):
    data = build(cfg(corpus, tmp_path, in_memory_tokens=100))
    assert data.train_inputs.numel() == 0 and data.train_stream is not None
    x, y = next(data.train_stream(4, 0))
    assert x.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = next(data.train_stream(4, 0))
    assert torch.equal(x, x2)  # seeded
    arch = ArchConfig(ModelConfig(vocab_size=257, d_model=32, pattern="AF", layers={"A": {"n_heads": 2}}),
                      TaskSpec("lm", {}), TrainConfig(steps=4, batch_size=4, eval_every=2, warmup_steps=1,
                                                      target_accuracy=None, device="cpu"))
    res = trainer_for("lm")(arch, data)
    assert res.metrics["steps"] == 4 and math.isfinite(res.metrics["bits_per_byte"])


def test_a_list_of_files_reads_as_their_concatenation(tmp_path):
    first, second, both = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "both.txt"
    first.write_text("".join(f"first file line {i}\n" for i in range(200)))
    second.write_text("".join(f"second file row {i * 7}\n" for i in range(200)))
    both.write_text(first.read_text() + second.read_text())
    listed = build(cfg([str(first), str(second)], tmp_path))
    whole = build(cfg(both, tmp_path))
    assert torch.equal(listed.train_inputs, whole.train_inputs)
    assert torch.equal(listed.valid_inputs, whole.valid_inputs)


def test_a_list_of_paths_is_checked_in_a_file(tmp_path):
    from hybridnas.config import load_arch
    from hybridnas.yamlio import ConfigError

    (tmp_path / "a.txt").write_text("hello\n" * 100)
    good = f"task: {{name: lm, path: [{tmp_path / 'a.txt'}], seq_len: 8}}\nmodel: {{d_model: 16, pattern: F}}\n"
    assert load_arch(text=good).task.params["path"] == [str(tmp_path / "a.txt")]
    bad = good.replace(f"[{tmp_path / 'a.txt'}]", f"[{tmp_path / 'a.txt'}, {tmp_path / 'missing.txt'}]")
    with pytest.raises(ConfigError, match=r"<arch>:1: task.path: no such file or directory: .*missing.txt"):
        load_arch(text=bad)
    with pytest.raises(ConfigError, match=r"task.path"):
        load_arch(text=good.replace(f"[{tmp_path / 'a.txt'}]", "[]"))


def test_stream_skip_starts_where_drawing_would_have_reached(corpus, tmp_path):
    """A resumed run reopens the stream past the batches it already drew, without reading them."""
    data = build(cfg(corpus, tmp_path, in_memory_tokens=100))
    drawn = data.train_stream(4, 3)
    for _ in range(5):
        next(drawn)
    x, y = next(drawn)
    x2, y2 = next(data.train_stream(4, 3, skip=5))
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_tokenizers_json_file(corpus, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "</s>"]))
    path = tmp_path / "tok.json"
    tok.save(str(path))
    c = cfg(corpus, tmp_path, tokenizer=str(path), seq_len=16)
    assert c.vocab_size == tok.get_vocab_size()
    data = build(c)
    assert data.bytes_per_token > 1.0  # subword tokens cover several bytes
    assert int(data.train_inputs.max()) < c.vocab_size


@pytest.mark.parametrize("kw,field", [
    ({"path": "no/such/file.txt"}, "path"),
    ({"tokenizer": "missing.json"}, "tokenizer"),
    ({"valid_fraction": 0.9}, "valid_fraction"),
    ({"seq_len": 0}, "seq_len"),
    ({"vocab_size": 100}, "vocab_size"),
    ({"max_train_tokens": 1}, "max_train_tokens"),
])
def test_errors_name_their_field(corpus, tmp_path, kw, field):
    with pytest.raises(TaskConfigError) as e:
        kw = dict(kw)
        cfg(kw.pop("path", corpus), tmp_path, **kw).check()
    assert e.value.field == field


def test_hub_names_are_not_local_paths():
    assert resolve_source(LMConfig(path="someone/some_dataset")).builder == "hub"
    assert resolve_source(LMConfig(path="wikitext")).builder == "hub"
    for local in ("data/missing_dir", "./corpus", "no/such/file.txt", "/abs/missing"):
        with pytest.raises(TaskConfigError) as e:
            resolve_source(LMConfig(path=local))
        assert e.value.field == "path"


def test_too_short_for_seq_len(corpus, tmp_path):
    with pytest.raises(TaskConfigError) as e:
        build(cfg(corpus, tmp_path, seq_len=4000, max_valid_tokens=5000))
    assert e.value.field == "seq_len"


def test_shipped_text_and_space():
    text = Path("data/prose.txt").read_bytes()
    assert 10_000 < len(text) <= 200_000
    space = load_space("search_spaces/lm_text.yaml")
    assert space.task.name == "lm" and space.task.params["vocab_size"] == 257
    assert space.search.objective == "loss"


def test_build_task_by_name(corpus, tmp_path):
    data = build_task("lm", {"path": str(corpus), "seq_len": 32, "split_block": 256,
                             "cache_dir": str(tmp_path / "cache")})
    assert data.valid_inputs.size(0) > 0
