"""``hybridnas.runtime.tune_malloc``: takes effect on Linux/glibc, opt-out honoured, idempotent; the CLI calls it."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from hybridnas import runtime

glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not glibc, reason="mallopt is glibc's")
def test_tune_malloc_takes_effect_and_is_idempotent():
    assert runtime.tune_malloc() is True
    assert runtime.tune_malloc() is True


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
