"""Next-token language modelling on text through the ``datasets`` library; validation loss and bits per byte.

Sources (``path``): a local text/json/jsonl/parquet file, a directory or glob of such files (one format), a list
of those (read in the order given), or a Hugging Face hub dataset name (``config_name`` is its configuration,
``split`` its split; needs the machine to be online). The field is not called ``name``: in a space's ``task:``
mapping ``name`` is the task's own name (``lm``).
Documents are read with ``streaming=True`` and tokenized as they stream, so a corpus larger than memory never
sits in memory: tokens go to a cache on disk, which later trials and worker processes reuse.

Tokenizer: ``bytes`` (default; UTF-8 bytes are the tokens, id 256 ends a document: vocabulary 257, nothing to
download) or the path of a ``tokenizers`` JSON file. Plain text files are read line by line with their line
breaks kept, so the token stream is the file itself; json/parquet/hub records (field ``text_field``) are
each followed by the end-of-document token (the tokenizer's ``<|endoftext|>``/``</s>``/``<eos>`` if it has one).

Split: the stream is cut into blocks of ``split_block`` tokens; with ``period = round(1 / valid_fraction)``,
block ``b`` is validation iff ``(b + seed) % period == period - 1`` (deterministic, needs no corpus length,
spread over the whole corpus). If that leaves no validation block, the last block is used.

Validation: non-overlapping windows of ``seq_len + 1`` tokens from the first ``max_valid_tokens`` validation
tokens (every token after the first is a target). Training: the same windows in memory when the train split
has at most ``in_memory_tokens`` tokens; otherwise ``train_stream`` samples random windows from the on-disk
memory map. ``bits_per_byte = loss / (ln 2 * bytes_per_token)``, with ``bytes_per_token`` the validation
split's UTF-8 bytes over its tokens (end-of-document tokens count 0 bytes).

The cache key covers the source files (absolute paths, sizes, modification times) or hub name, the
tokenizer (and its file's hash), ``text_field`` and the split settings; ``seq_len`` is not in it, so
trials with different sequence lengths share one cache.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hybridnas.tasks.base import TaskConfig, TaskConfigError, TaskData

CACHE_VERSION = 1
BYTE_VOCAB = 257  # 256 byte values + end of document
BYTE_EOS = 256
FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "[EOS]", "<|end_of_text|>")


@dataclass
class LMConfig(TaskConfig):
    """Text LM task; see the module docstring. ``vocab_size`` is filled in from the tokenizer."""

    path: str | list[str] = "data/prose.txt"  # a list: local files, folders or globs, read in order
    config_name: str | None = None  # a hub dataset's configuration (datasets' `name`)
    split: str = "train"
    text_field: str = "text"
    tokenizer: str = "bytes"
    seq_len: int = 128
    valid_fraction: float = 0.1
    split_block: int = 1024
    seed: int = 0
    max_train_tokens: int | None = None
    max_valid_tokens: int = 1 << 18
    in_memory_tokens: int = 1 << 24
    cache_dir: str = "runs/.cache/lm"
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.vocab_size is None:
            try:
                self.vocab_size = load_tokenizer(self.tokenizer).vocab_size
            except Exception:  # noqa: BLE001  (any problem: check() names it)
                pass

    def check(self) -> LMConfig:
        if isinstance(self.path, list):
            if not self.path or not all(isinstance(p, str) and p for p in self.path):
                raise TaskConfigError("path", f"a list of paths must hold non-empty strings, got {self.path!r}")
        elif not isinstance(self.path, str) or not self.path:
            raise TaskConfigError("path", f"must be a non-empty string or a list of them, got {self.path!r}")
        for name in ("split", "text_field", "tokenizer", "cache_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TaskConfigError(name, f"must be a non-empty string, got {getattr(self, name)!r}")
        if self.config_name is not None and not isinstance(self.config_name, str):
            raise TaskConfigError("config_name", f"must be a string or null, got {self.config_name!r}")
        for name, low in (("seq_len", 1), ("split_block", 1), ("seed", 0), ("max_valid_tokens", 2),
                          ("in_memory_tokens", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise TaskConfigError(name, f"must be an integer >= {low}, got {value!r}")
        if self.max_train_tokens is not None and (isinstance(self.max_train_tokens, bool)
                                                  or not isinstance(self.max_train_tokens, int)
                                                  or self.max_train_tokens < 2):
            raise TaskConfigError("max_train_tokens", f"must be an integer >= 2 or null, got {self.max_train_tokens!r}")
        if isinstance(self.valid_fraction, bool) or not isinstance(self.valid_fraction, int | float) \
                or not 0 < self.valid_fraction <= 0.5:
            raise TaskConfigError("valid_fraction", f"must be in (0, 0.5], got {self.valid_fraction!r}")
        if self.max_valid_tokens < self.seq_len + 1:
            raise TaskConfigError("max_valid_tokens", f"must be at least seq_len + 1 ({self.seq_len + 1})")
        resolve_source(self)  # raises for a missing local path or mixed formats
        tok = load_tokenizer(self.tokenizer)
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) \
                or self.vocab_size < tok.vocab_size:
            raise TaskConfigError("vocab_size", f"the tokenizer has {tok.vocab_size} tokens; leave vocab_size "
                                                f"unset or make it at least that, got {self.vocab_size!r}")
        return self

    def decode_seq_len(self) -> int:
        return int(self.seq_len)


# ---------------------------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """UTF-8 bytes; ``encode`` returns ``(ids, byte length of each token)``, ``decode`` the text of ids."""

    vocab_size = BYTE_VOCAB
    eos_id = BYTE_EOS
    fingerprint = "bytes"

    def encode(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for t in texts:
            ids = np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64)
            out.append((ids, np.ones(len(ids), dtype=np.int64)))
        return out

    def decode(self, ids) -> str:
        """Ids (a list or array) back to text: the byte values as UTF-8, an invalid or cut sequence replaced by
        U+FFFD; the end-of-document id, and any id past the bytes (a vocabulary padded beyond 257), is skipped."""
        return bytes(int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < 256).decode("utf-8",
                                                                                              errors="replace")


class JsonTokenizer:
    """A ``tokenizers`` JSON file. Token byte lengths come from the encoding's character offsets."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TaskConfigError("tokenizer", "a tokenizer file needs the `tokenizers` package "
                                               "(pip install tokenizers)") from None
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception on bad files)
            raise TaskConfigError("tokenizer", f"cannot read tokenizer file {path}: {e}") from None
        self.vocab_size = self.tok.get_vocab_size()
        vocab = self.tok.get_vocab()
        self.eos_id = next((vocab[n] for n in EOS_NAMES if n in vocab), None)
        self.fingerprint = hashlib.sha256(Path(path).read_bytes()).hexdigest()

    def encode(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for text, enc in zip(texts, self.tok.encode_batch(texts, add_special_tokens=False)):
            ids = np.asarray(enc.ids, dtype=np.int64)
            offs = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            if text.isascii():
                lens = offs[:, 1] - offs[:, 0]
            else:
                cum = np.concatenate([[0], np.cumsum([len(c.encode("utf-8")) for c in text])])
                lens = cum[offs[:, 1]] - cum[offs[:, 0]]
            out.append((ids, np.maximum(lens, 0)))
        return out

    def decode(self, ids) -> str:
        """Ids back to text through the file's decoder; the end-of-document id is skipped."""
        keep = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) != self.eos_id]
        return self.tok.decode(keep, skip_special_tokens=False)


def load_tokenizer(spec: str) -> ByteTokenizer | JsonTokenizer:
    if spec == "bytes":
        return ByteTokenizer()
    if not os.path.isfile(spec):
        raise TaskConfigError("tokenizer", f"'bytes' or the path of a tokenizers JSON file; no file {spec!r}")
    return JsonTokenizer(spec)


# ---------------------------------------------------------------------------------------------- sources


@dataclass
class Source:
    builder: str  # text | json | parquet | hub
    files: list[str] = field(default_factory=list)

    def fingerprint(self, cfg: LMConfig) -> Any:
        if self.builder == "hub":
            return ["hub", cfg.path, cfg.config_name, cfg.split]
        return [self.builder, [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in self.files]]


def resolve_source(cfg: LMConfig) -> Source:
    """Local file, directory or glob (or a list of them) -> its files and their ``datasets`` builder; anything
    else: a hub name."""
    if isinstance(cfg.path, list):
        files: list[str] = []
        builders = set()
        for p in cfg.path:
            one = resolve_source(LMConfig(path=p, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size))
            if one.builder == "hub":
                raise TaskConfigError("path", f"no such file or directory: {p} (a list names local files only)")
            builders.add(one.builder)
            files += [f for f in one.files if f not in files]
        if len(builders) > 1:
            raise TaskConfigError("path", f"files of several formats in the list: {sorted(builders)}; use one")
        return Source(builders.pop(), files)
    path = os.path.expanduser(cfg.path)
    if any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    elif os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and p.suffix.lower() in FORMATS)
    elif os.path.isfile(path):
        files = [path]
    else:
        first = Path(path).parts[0] if Path(path).parts else ""
        looks_local = (Path(path).suffix.lower() in FORMATS or path.startswith((".", "/", "~"))
                       or (os.sep in path and os.path.isdir(first)))
        if looks_local:
            raise TaskConfigError("path", f"no such file or directory: {cfg.path}")
        return Source("hub")  # e.g. "roneneldan/TinyStories": resolved by datasets when online
    if not files:
        raise TaskConfigError("path", f"no text/json/jsonl/parquet files under {cfg.path}")
    kinds = {FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if Path(f).suffix.lower() not in FORMATS)
        raise TaskConfigError("path", f"unsupported file type {bad} (known: {', '.join(sorted(FORMATS))})")
    if len(kinds) > 1:
        raise TaskConfigError("path", f"files of several formats under {cfg.path}: {sorted(kinds)}; use one")
    return Source(kinds.pop(), [os.path.abspath(f) for f in files])


def iter_texts(cfg: LMConfig, source: Source, batch: int = 256) -> Iterator[tuple[list[str], bool]]:
    """Batches of documents as they stream in, and whether each document ends with an end-of-document token."""
    from datasets import load_dataset

    if source.builder == "hub":
        ds = load_dataset(cfg.path, cfg.config_name, split=cfg.split, streaming=True)
    elif source.builder == "text":
        ds = load_dataset("text", data_files=source.files, split="train", streaming=True, keep_linebreaks=True)
    else:
        ds = load_dataset(source.builder, data_files=source.files, split="train", streaming=True)
    field_name = "text" if source.builder == "text" else cfg.text_field
    docs_end = source.builder != "text"
    buf: list[str] = []
    for row in ds:
        if field_name not in row:
            raise TaskConfigError("text_field", f"records have no field {field_name!r}; fields: {sorted(row)}")
        buf.append(str(row[field_name]))
        if len(buf) >= batch:
            yield buf, docs_end
            buf = []
    if buf:
        yield buf, docs_end


# ---------------------------------------------------------------------------------------------- the cache


def cache_path(cfg: LMConfig) -> Path:
    source = resolve_source(cfg)
    tok = load_tokenizer(cfg.tokenizer)
    key = json.dumps({"v": CACHE_VERSION, "source": source.fingerprint(cfg), "text_field": cfg.text_field,
                      "tokenizer": tok.fingerprint, "valid_fraction": cfg.valid_fraction,
                      "split_block": cfg.split_block, "seed": cfg.seed, "max_train_tokens": cfg.max_train_tokens},
                     sort_keys=True)
    return Path(cfg.cache_dir) / hashlib.sha256(key.encode()).hexdigest()[:20]


def tokenize_to_cache(cfg: LMConfig) -> Path:
    """Tokenize the corpus once (streaming) into ``train.bin``/``valid.bin`` + ``meta.json``; return the folder."""
    out = cache_path(cfg)
    if (out / "meta.json").exists():
        return out
    source = resolve_source(cfg)
    tok = load_tokenizer(cfg.tokenizer)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    period = max(1, round(1 / cfg.valid_fraction))
    counts = {"train": [0, 0], "valid": [0, 0]}  # tokens, bytes
    ids_buf: list[np.ndarray] = []
    len_buf: list[np.ndarray] = []
    buffered = 0
    block = 0
    last: tuple[np.ndarray, np.ndarray] | None = None
    with open(tmp / "train.bin", "wb") as ftrain, open(tmp / "valid.bin", "wb") as fvalid:
        files = {"train": ftrain, "valid": fvalid}

        def emit(ids: np.ndarray, lens: np.ndarray) -> None:
            nonlocal block, last
            split = "valid" if (block + cfg.seed) % period == period - 1 else "train"
            files[split].write(ids.astype(dtype).tobytes())
            counts[split][0] += len(ids)
            counts[split][1] += int(lens.sum())
            if split == "train":
                last = (ids, lens)
            block += 1

        def full() -> bool:
            return cfg.max_train_tokens is not None and counts["train"][0] >= cfg.max_train_tokens

        for texts, docs_end in iter_texts(cfg, source):
            for ids, lens in tok.encode(texts):
                if docs_end and tok.eos_id is not None:
                    ids = np.append(ids, tok.eos_id)
                    lens = np.append(lens, 0)
                ids_buf.append(ids)
                len_buf.append(lens)
                buffered += len(ids)
            while buffered >= cfg.split_block and not full():
                all_ids, all_lens = np.concatenate(ids_buf), np.concatenate(len_buf)
                n_blocks = len(all_ids) // cfg.split_block
                for b in range(n_blocks):
                    if full():
                        break
                    s = slice(b * cfg.split_block, (b + 1) * cfg.split_block)
                    emit(all_ids[s], all_lens[s])
                rest = n_blocks * cfg.split_block
                ids_buf, len_buf = [all_ids[rest:]], [all_lens[rest:]]
                buffered = len(ids_buf[0])
            if full():
                break
        if buffered and not full():
            emit(np.concatenate(ids_buf), np.concatenate(len_buf))
    if counts["valid"][0] == 0 and last is not None and counts["train"][0] > len(last[0]):
        # too small for one validation block per period: the last training block becomes validation
        n_last = len(last[0])
        with open(tmp / "train.bin", "r+b") as f:
            f.truncate((counts["train"][0] - n_last) * np.dtype(dtype).itemsize)
        with open(tmp / "valid.bin", "wb") as f:
            f.write(last[0].astype(dtype).tobytes())
        counts["train"][0] -= n_last
        counts["train"][1] -= int(last[1].sum())
        counts["valid"] = [n_last, int(last[1].sum())]
    meta = {"train_tokens": counts["train"][0], "train_bytes": counts["train"][1],
            "valid_tokens": counts["valid"][0], "valid_bytes": counts["valid"][1], "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id, "dtype": np.dtype(dtype).name, "tokenizer": cfg.tokenizer, "path": cfg.path}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        os.rename(tmp, out)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------- TaskData


@dataclass
class LMTaskData(TaskData):
    """Text LM data. ``train_stream`` is set (and ``train_*`` empty) when the train split is not in memory."""

    bytes_per_token: float = 1.0
    accuracy_metric: str = "micro"
    select_by: str = "loss"  # the trainer keeps the weights of the lowest validation loss
    meta: dict[str, Any] = field(default_factory=dict)


def _windows(tokens: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = (len(tokens) - 1) // seq_len
    t = torch.from_numpy(np.asarray(tokens[: n * seq_len + 1], dtype=np.int64))
    return t[:-1].reshape(n, seq_len), t[1:].reshape(n, seq_len)


def _memmap_stream(path: Path, dtype: str, seq_len: int) -> Callable[[int, int], Iterator]:
    def stream(batch_size: int, seed: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Random windows; ``skip``: start after that many batches (a resumed run), reading none of them."""
        data = np.memmap(path, dtype=dtype, mode="r")
        rng = np.random.default_rng(seed)
        high = len(data) - seq_len - 1
        for _ in range(skip):
            rng.integers(0, high + 1, size=batch_size)
        while True:
            starts = rng.integers(0, high + 1, size=batch_size)
            win = np.stack([np.asarray(data[s:s + seq_len + 1], dtype=np.int64) for s in starts])
            t = torch.from_numpy(win)
            yield t[:, :-1], t[:, 1:]

    return stream


def build(cfg: LMConfig) -> LMTaskData:
    cfg.check()
    folder = tokenize_to_cache(cfg)
    meta = json.loads((folder / "meta.json").read_text())
    dtype = meta["dtype"]
    T = cfg.seq_len
    if meta["valid_tokens"] < T + 1 or meta["train_tokens"] < T + 1:
        raise TaskConfigError("seq_len", f"the corpus split has {meta['train_tokens']} train and "
                                         f"{meta['valid_tokens']} validation tokens; seq_len {T} needs more than "
                                         f"{T} in each (use a shorter seq_len, smaller split_block or more text)")
    valid = np.memmap(folder / "valid.bin", dtype=dtype, mode="r")[: cfg.max_valid_tokens]
    vx, vy = _windows(valid, T)
    bytes_per_token = meta["valid_bytes"] / max(meta["valid_tokens"], 1)
    stream = None
    if meta["train_tokens"] <= cfg.in_memory_tokens:
        tx, ty = _windows(np.memmap(folder / "train.bin", dtype=dtype, mode="r"), T)
    else:
        tx = ty = torch.zeros(0, T, dtype=torch.long)
        stream = _memmap_stream(folder / "train.bin", dtype, T)
    return LMTaskData(tx, ty, vx, vy, int(cfg.vocab_size), bytes_per_token=bytes_per_token,
                      train_stream=stream, meta={**meta, "cache": str(folder)})
