"""Session setup shared by every test module.

Triton's own ``@triton.jit`` helpers (``tl.cumsum`` and the rest of ``triton.language.standard``) are decorated
when triton is first imported, as interpreted functions only if ``TRITON_INTERPRET=1`` is set then. The kernel
tests (``tests/ops/test_triton_kernels.py``) set it just before decorating their kernels, which is too late once
anything else has imported triton, and ``torch.compile`` does (the compile tests run first). On a machine without
CUDA, where no kernel is ever compiled for a GPU, triton is therefore imported here, under the interpreter; the
variable itself is restored, so the backend rules (``layers.ops.dispatch.triton_usable``) see the real
environment.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch


def _import_triton_interpretable() -> None:
    if "triton" in sys.modules or importlib.util.find_spec("triton") is None or torch.cuda.is_available():
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


_import_triton_interpretable()
