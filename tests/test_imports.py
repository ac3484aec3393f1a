"""Imports run one way: checked in a fresh interpreter, where ``sys.modules`` shows what an import pulled in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def loaded_after(code: str) -> set[str]:
    """Modules of hybridnas and layers loaded by running ``code`` in a fresh interpreter."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules " \
                   "if m.split('.')[0] in ('hybridnas', 'layers'))))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=env,
                         check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_tasks_load_neither_the_model_nor_the_trainer():
    # building a task's data, the suite's included, needs no model, trainer, layer or config schema
    loaded = loaded_after("import hybridnas.tasks as t\n"
                          "t.build_task('mqar', {'vocab_size': 64, 'seq_len': 16, 'num_kv_pairs': 2, "
                          "'num_train': 4, 'num_test': 4})\n"
                          "t.build_task('mad', {'tasks': ['compression'], 'common': {'num_train': 4, 'num_test': 4}})")
    assert "hybridnas.tasks.mad_suite" in loaded
    forbidden = {"hybridnas.model", "hybridnas.train", "hybridnas.suite", "hybridnas.trainers", "hybridnas.config",
                 "hybridnas.checkpoint", "layers"}
    assert not loaded & forbidden, sorted(loaded & forbidden)


def test_checkpoint_sits_below_export_search_and_confirm():
    loaded = loaded_after("import hybridnas.checkpoint")
    assert not loaded & {"hybridnas.export", "hybridnas.search", "hybridnas.confirm"}, sorted(loaded)
