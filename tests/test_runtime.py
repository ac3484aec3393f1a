"""``hybridnas.runtime.tune_malloc``: takes effect on Linux/glibc, opt-out honoured, idempotent; the CLI calls it."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from hybridnas import runtime

glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


# Run in a fresh process: is a block of N MiB served by mmap (glibc marks such a chunk IS_MMAPPED, bit 0x2 of the
# size word just before the pointer)? Freeing an mmapped block raises glibc's dynamic threshold to its size, so each
# probe asks for a larger block than the one before it.
MALLOC_PROBE = """
import ctypes, json
from hybridnas import runtime
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mmapped(mib):
    p = libc.malloc(mib << 20)
    size_word = ctypes.c_size_t.from_address(p - ctypes.sizeof(ctypes.c_size_t)).value
    libc.free(p)
    return bool(size_word & 2)

out = {"untuned": mmapped(8), "first": runtime.tune_malloc(), "after_first": mmapped(16),
       "second": runtime.tune_malloc(), "after_second": mmapped(24)}
print(json.dumps(out))
"""


@pytest.mark.skipif(not glibc, reason="mallopt is glibc's")
def test_tune_malloc_takes_effect_and_is_idempotent():
    """Blocks below 32 MiB come from the heap after the first call and still after a second one (without the
    tuning, glibc serves an 8 MiB block by mmap, then raises its threshold only to the largest block freed)."""
    env = {k: v for k, v in os.environ.items() if k != "HYBRIDNAS_MALLOC"}
    out = subprocess.run([sys.executable, "-c", MALLOC_PROBE], capture_output=True, text=True, check=True, env=env)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"untuned": True, "first": True, "after_first": False, "second": True, "after_second": False}


def test_opt_out(monkeypatch):
    monkeypatch.setenv("HYBRIDNAS_MALLOC", "system")
    assert runtime.tune_malloc() is False


@pytest.mark.skipif(not glibc, reason="mallopt is glibc's")
def test_cli_tunes_malloc_before_any_command():
    code = ("import contextlib, io\n"
            "import hybridnas.cli as c, hybridnas.runtime as r\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    c.main(['--help'])\n"
            "print(r._done)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "True"
