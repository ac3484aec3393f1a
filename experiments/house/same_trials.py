"""A fixed-seed search whose trials (parameters, states, values) are printed one JSON line each.

Run at two commits and compare the outputs: the import-graph refactor must not change what a search does.

    python experiments/house/same_trials.py > experiments/house/trials_<commit>.jsonl
"""

import json
import os
import sys
import tempfile
from pathlib import Path

SPACE = """\
name: same_trials
task: {name: mqar, vocab_size: 64, seq_len: 32, num_kv_pairs: 4, num_train: 512, num_test: 64, seed: 0}
model:
  d_model: [32, 64]
  pattern: ["AA", "MA", "A-A-", "(AE)x1", "MM"]
  layers:
    M: {d_state: [8, 16], headdim: 16, mimo_rank: [1, 2]}
    A: {n_heads: [1, 2]}
    E: {n_experts: 2, top_k: 1}
train:
  steps: 40
  batch_size: 32
  eval_every: 10
  warmup_steps: 5
  lr: {low: 1.0e-3, high: 1.0e-2, log: true}
  threads: 1
search:
  n_trials: 8
  seed: 0
  n_startup_trials: 3
  pruner: hyperband
"""


def main() -> None:
    from hybridnas import search
    from hybridnas.config import load_space

    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        path = Path(tmp) / "same_trials.yaml"
        path.write_text(SPACE)
        study = search.run_search(load_space(str(path)), quiet=True)
        for t in study.trials:
            row = {"number": t.number, "state": t.state.name, "params": t.params,
                   "value": None if t.value is None else round(t.value, 6),
                   "pruned_at": t.user_attrs.get("pruned_at_step"), "arch_key": t.user_attrs.get("arch_key"),
                   "n_params": t.user_attrs.get("params")}
            sys.stdout.write(json.dumps(row, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
