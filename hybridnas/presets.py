"""Size presets for ``hybridnas train --preset``: a searched architecture trained at a chosen size.

A preset sets the width, repeats the pattern until the stack has at least ``n_layers`` blocks (``A-`` with 8
layers becomes ``(A-)x4``: the searched mix is kept), and sets the batch size and, for the text task ``lm``, the
sequence length. Everything else (layer parameters, learning rate, steps) stays as the architecture file says.

| preset | d_model | n_layers | batch_size | lm seq_len |
|---|---|---|---|---|
| tiny  | 64  | 4  | 16 | 128 |
| small | 256 | 8  | 32 | 256 |
| base  | 512 | 16 | 32 | 512 |
"""

from __future__ import annotations

import math
from dataclasses import replace

from hybridnas import patterns
from hybridnas.schema import ArchConfig, TaskSpec

PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "n_layers": 4, "batch_size": 16, "seq_len": 128},
    "small": {"d_model": 256, "n_layers": 8, "batch_size": 32, "seq_len": 256},
    "base": {"d_model": 512, "n_layers": 16, "batch_size": 32, "seq_len": 512},
}


def apply_preset(arch: ArchConfig, name: str) -> ArchConfig:
    """``arch`` at the size of preset ``name`` (ValueError for an unknown name)."""
    if name not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    p = PRESETS[name]
    n = len(patterns.layer_symbols(arch.model.pattern))
    times = max(1, math.ceil(p["n_layers"] / n))
    pattern = arch.model.pattern if times == 1 else f"({arch.model.pattern})x{times}"
    model = replace(arch.model, d_model=p["d_model"], pattern=pattern)
    train = replace(arch.train, batch_size=p["batch_size"])
    task = arch.task
    if task.name == "lm":
        task = TaskSpec(task.name, {**task.params, "seq_len": p["seq_len"]})
    return ArchConfig(model, task, train, dict(arch.symbols), arch.name)
