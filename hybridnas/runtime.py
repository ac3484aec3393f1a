"""Process settings for CPU training: glibc malloc keeps large freed blocks for reuse.

PyTorch's CPU allocator takes every tensor from ``malloc``. glibc serves blocks above its mmap threshold (128 KiB,
raised on the fly up to 32 MiB) with fresh ``mmap`` pages and returns them on ``free``, so each large temporary of a
forward and backward pays page faults and the kernel zeroing its pages, and the top of the heap is trimmed back to
the system after each step. Fixing the threshold at 32 MiB and trimming only above 1 GiB lets those blocks be reused
from the heap: a chunked ``M`` layer's forward+backward (batch 8, length 1024, 2 cores) went from 194 to 165 ms
(Mamba-3 SISO), 349 to 310 ms (MIMO R=2) and 194 to 185 ms (Mamba-2), best of 3 alternating rounds
(``experiments/mamba_cpu/ab_output.txt``). The cost: freed memory stays with the process (its resident size holds
near the peak), which is what a training process wants.

``hybridnas`` commands call :func:`tune_malloc` first; a program using the library directly can call it too.
``HYBRIDNAS_MALLOC=system`` leaves malloc as it is.

Torch threads: by default torch runs one intra-op thread per core, so training processes that share cores (search
workers, or any other busy process) oversubscribe them and a step slows down many times over. A search worker takes
its share instead (:func:`torch_threads`): the cores it may run on divided by the local workers sharing them
(``--workers N`` tells each child through ``HYBRIDNAS_LOCAL_WORKERS``), at least one, and one inter-op thread.
``train.threads`` or ``OMP_NUM_THREADS``, when set, win.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value (64-bit)
TRIM_THRESHOLD = 1 << 30

_done = False


def tune_malloc() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring). Returns whether both took effect: ``False``
    off Linux/glibc or with ``HYBRIDNAS_MALLOC=system``. Safe to call more than once."""
    global _done
    if os.environ.get("HYBRIDNAS_MALLOC", "").strip().lower() == "system" or not sys.platform.startswith("linux"):
        return False
    if _done:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _done


LOCAL_WORKERS_ENV = "HYBRIDNAS_LOCAL_WORKERS"  # how many search workers share this machine's cores


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask where the OS has one, else the CPU count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def torch_threads(explicit: int | None = None, *, cores: int | None = None,
                  environ: Mapping[str, str] | None = None) -> int:
    """Intra-op threads for a search worker: ``explicit`` (``train.threads``) if set, else ``OMP_NUM_THREADS`` if
    set, else ``max(1, cores // local workers)`` with the worker count from ``HYBRIDNAS_LOCAL_WORKERS`` (default 1)."""
    env = os.environ if environ is None else environ
    if explicit:
        return int(explicit)
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    workers = env.get(LOCAL_WORKERS_ENV, "").strip()
    n = int(workers) if workers.isdigit() and int(workers) > 0 else 1
    return max(1, (cores or usable_cores()) // n)


def apply_torch_threads(explicit: int | None = None) -> int:
    """Set torch's intra-op threads to :func:`torch_threads` and its inter-op threads to 1 (where torch still
    allows it: only before its first parallel work). Returns the intra-op count."""
    import torch

    n = torch_threads(explicit)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already started (or set) in this process
    return n
