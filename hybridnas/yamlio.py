"""YAML in with line numbers, YAML/JSON out atomically.

Every config error names the file, the line and the dotted field path, so the loader keeps a map from
field path to line while it reads (``yaml.safe_load`` semantics: no Python objects are ever constructed).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PathT = tuple[str | int, ...]


def dotted(path: PathT) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


class ConfigError(ValueError):
    """A config problem, printed as ``file:line: field.path: message``."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None, path: PathT | None = None):
        self.message = message
        self.file = file
        self.line = line
        self.path = tuple(path) if path is not None else None
        super().__init__(self.format())

    def format(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where += f":{self.line}"
        field_part = f" {dotted(self.path)}:" if self.path else ""
        return f"{where}:{field_part} {self.message}"


class ConfigErrors(ConfigError):
    """Several config problems found at once (``errors``), printed one per line in the order they were found (the
    order of the file's sections); the first one's fields (file, line, path, message) are this error's own, so a
    caller expecting one error still reads one."""

    def __init__(self, errors: list[ConfigError]):
        flat: list[ConfigError] = []
        for e in errors:
            flat.extend(e.errors if isinstance(e, ConfigErrors) else [e])
        self.errors = flat
        first = self.errors[0]
        super().__init__(first.message, first.file, first.line, first.path)

    def format(self) -> str:
        return "\n".join(e.format() for e in self.errors)


class Collector:
    """Gathers the errors of independent checks so that one run reports them all::

        errors = Collector()
        with errors.guard():
            check_a()
        with errors.guard():
            check_b()
        errors.raise_if_any()
    """

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        try:
            yield
        except ConfigError as e:
            self.errors.append(e)

    def raise_if_any(self) -> None:
        if len(self.errors) == 1:
            raise self.errors[0]
        if self.errors:
            raise ConfigErrors(self.errors)


@dataclass
class Source:
    """Where a config came from: the file name and the line of every field path."""

    file: str = "<config>"
    lines: dict[PathT, int] = field(default_factory=dict)

    def line(self, path: PathT) -> int | None:
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get((), None)

    def error(self, path: PathT, message: str) -> ConfigError:
        return ConfigError(message, self.file, self.line(path), path)


def _map_lines(node: yaml.Node, path: PathT, lines: dict[PathT, int], file: str) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError("mapping keys must be plain scalars", file, key_node.start_mark.line + 1, path)
            key = key_node.value
            if key in seen:
                raise ConfigError(f"duplicate key {key!r} (first given on line {seen[key]})", file,
                                  key_node.start_mark.line + 1, path + (key,))
            seen[key] = key_node.start_mark.line + 1
            lines[path + (key,)] = key_node.start_mark.line + 1
            _map_lines(value_node, path + (key,), lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _map_lines(item, path + (i,), lines, file)


def load_text(text: str, file: str = "<config>") -> tuple[Any, Source]:
    """Parse YAML text safely; return the data and a :class:`Source` with each field's line."""
    loader = None
    try:  # one pass: the node tree gives the lines, and the data are constructed from the same tree
        loader = yaml.SafeLoader(text)  # checks every character first
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        if mark is not None:
            line = mark.line + 1
        elif isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow: its offset, no mark
            line = text.count("\n", 0, e.position) + 1
        else:
            line = None
        problem = getattr(e, "problem", None) or str(e)
        if isinstance(e, yaml.reader.ReaderError):
            ch = chr(e.character) if isinstance(e.character, int) else e.character
            problem = f"character {ch!r} is not allowed in YAML (offset {e.position})"
        raise ConfigError(f"invalid YAML: {problem}", file, line) from None
    finally:
        if loader is not None:
            loader.dispose()
    lines: dict[PathT, int] = {}
    if node is not None:
        _map_lines(node, (), lines, file)
    return data, Source(file, lines)


def load_file(path: str | os.PathLike) -> tuple[Any, Source]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", str(p)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read file: {e}", str(p)) from None
    return load_text(text, str(p))


def _create_temp(folder: Path, name: str) -> tuple[int, Path]:
    """A new, empty temp file beside the destination, created with mode 0666 so the process umask applies as it
    does to any file the user writes (0644 under umask 022). ``tempfile.mkstemp`` would make it 0600, and the
    rename would carry that mode over to the destination."""
    while True:
        tmp = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename: never half-written. The
    file gets the mode the umask gives a new file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(p.parent, p.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def write_yaml(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, dump_yaml(data))


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
