"""Write the distill-search experiment's corpus: the Python standard library's own sources, read locally.

    python experiments/distill_search/make_corpus.py [--out runs/distill_search/stdlib.txt] [--mb 4]

Files are the top-level ``*.py`` modules of this interpreter's standard library (``sysconfig``'s ``stdlib``
path; no packages, no tests), sorted by name and concatenated, each preceded by a ``# file: NAME`` line, until the
size cap. Nothing is downloaded. The corpus depends on the Python version, which is printed with its SHA-256 so a
result can name the exact text it was measured on.
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sysconfig
from pathlib import Path


def build(cap_bytes: int) -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[bytes] = []
    size = 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        chunk = f"# file: {path.name}\n{text}\n".encode()
        if size + len(chunk) > cap_bytes:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/distill_search/stdlib.txt")
    ap.add_argument("--mb", type=float, default=4.0)
    args = ap.parse_args()
    data = build(int(args.mb * 1e6))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    print(f"{out}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}, "
          f"Python {platform.python_version()} stdlib")


if __name__ == "__main__":
    main()
