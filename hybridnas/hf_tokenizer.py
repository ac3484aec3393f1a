"""The tokenizer saved beside a model: ``tokenizer.json`` + ``tokenizer_config.json`` (``AutoTokenizer`` reads them).

Which one follows from the task the model was trained on:

- text LM with the byte tokenizer (``task: lm``, ``tokenizer: bytes``): byte-level BPE with no merges whose
  ids are the byte values (0-255) and ``<|endoftext|>`` = 256, so "héllo" is its 6 UTF-8 bytes and decodes back
  exactly;
- text LM with a ``tokenizers`` JSON file: that file, copied (when it is still where the architecture says);
- every other task (MQAR, MAD): a word-level vocabulary whose tokens are the ids written in decimal, so
  ``"3 17 42"`` is ``[3, 17, 42]`` and decodes to the same string.

Writing needs the ``tokenizers`` package (installed with transformers, or the ``text`` extra); without it no
tokenizer is written and ids are used as they are. :func:`load` reads one back with ``tokenizers`` alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from hybridnas.yamlio import atomic_write_text

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
EOS = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the ``ByteLevel`` alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_tokenizer():
    """Byte-level tokenizer: id = byte value, ``<|endoftext|>`` = 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return tok


def id_tokenizer(vocab_size: int):
    """Word-level tokenizer over the decimal ids ``"0" .. str(vocab_size - 1)``, split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab={str(i): i for i in range(vocab_size)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def save(out: str | Path, task: str, task_params: dict[str, Any], vocab_size: int,
         max_length: int | None = None) -> bool:
    """Write the task's tokenizer into ``out``; False (nothing written) without the ``tokenizers`` package or when
    a text task's tokenizer file is gone."""
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return False
    out = Path(out)
    special: dict[str, Any] = {}
    kind = "ids"
    if task == "lm":
        spec = task_params.get("tokenizer", "bytes")
        if spec == "bytes":
            atomic_write_text(out / TOKENIZER_FILE, byte_tokenizer().to_str())
            special = {"eos_token": EOS}
            kind = "bytes"
        elif Path(spec).is_file():
            from tokenizers import Tokenizer

            from hybridnas.tasks.lm import EOS_NAMES

            shutil.copyfile(spec, out / TOKENIZER_FILE)
            kind = "file"
            vocab = Tokenizer.from_file(spec).get_vocab()
            eos = next((name for name in EOS_NAMES if name in vocab), None)  # the task's end of document
            if eos is not None:
                special = {"eos_token": eos}
        else:
            return False
    else:
        atomic_write_text(out / TOKENIZER_FILE, id_tokenizer(vocab_size).to_str())
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "hybridnas_tokenizer": kind,
           "clean_up_tokenization_spaces": False, **special}
    if max_length:
        cfg["model_max_length"] = int(max_length)
    atomic_write_text(out / TOKENIZER_CONFIG_FILE, json.dumps(cfg, indent=2) + "\n")
    return True


class FolderTokenizer:
    """A folder's ``tokenizer.json`` through ``tokenizers``: ``encode(text) -> ids``, ``decode(ids) -> text``."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.tok = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        cfg_file = folder / TOKENIZER_CONFIG_FILE
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        self.kind = cfg.get("hybridnas_tokenizer", "file")
        eos = cfg.get("eos_token")
        self.eos_id = self.tok.token_to_id(eos) if isinstance(eos, str) else None

    def encode(self, text: str) -> list[int]:
        """ValueError when the tokenizer cannot encode ``text`` (a word outside a word-level vocabulary)."""
        try:
            return list(self.tok.encode(text, add_special_tokens=False).ids)
        except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception)
            raise ValueError(f"the tokenizer cannot encode the prompt: {e}") from None

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


def load(folder: str | Path) -> FolderTokenizer | None:
    """The tokenizer saved in ``folder``, or None (no tokenizer file, or no ``tokenizers`` package)."""
    if not (Path(folder) / TOKENIZER_FILE).exists():
        return None
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return None
    return FolderTokenizer(folder)


class StreamDecoder:
    """Text of a growing id list, piece by piece: each :meth:`push` returns only the new text, holding back an
    incomplete UTF-8 sequence (a byte-level tokenizer decodes a lone lead byte as U+FFFD) until it completes."""

    def __init__(self, tokenizer: FolderTokenizer | None):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        first = not self.ids
        self.ids.append(int(token_id))
        if self.tokenizer is None:  # no tokenizer: the ids, space-separated
            return ("" if first else " ") + str(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new = text[len(self.emitted):] if text.startswith(self.emitted) else text
        self.emitted = text
        return new

    def flush(self) -> str:
        if self.tokenizer is None or not self.ids:
            return ""
        text = self.tokenizer.decode(self.ids)
        new = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return new
