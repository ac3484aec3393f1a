"""Torch threads per search worker: the usable cores shared by the local workers, unless set explicitly."""

import os

import pytest
import torch

from hybridnas import search
from hybridnas.config import load_space
from hybridnas.runtime import LOCAL_WORKERS_ENV, torch_threads, usable_cores
from hybridnas.workers import worker_env

SPACE = """\
name: {name}
task: {{name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 64, num_test: 16}}
model: {{d_model: 16, pattern: "A-"}}
train: {{steps: 2, batch_size: 16, eval_every: 2, warmup_steps: 1{threads}}}
search: {{n_trials: 1, pruner: none}}
"""


@pytest.mark.parametrize("cores, n", [(2, 1), (2, 2), (2, 3), (16, 3), (64, 8)])
def test_a_worker_of_n_gets_its_share_of_the_cores(cores, n):
    env = worker_env(0, n, base={})
    assert torch_threads(cores=cores, environ=env) == max(1, cores // n)


def test_explicit_settings_win():
    env = worker_env(1, 4, base={})
    assert torch_threads(3, cores=16, environ=env) == 3  # train.threads
    assert torch_threads(cores=16, environ={**env, "OMP_NUM_THREADS": "2"}) == 2
    assert torch_threads(cores=16, environ={}) == 16  # one worker: every core


def test_usable_cores_follow_the_affinity_mask():
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert usable_cores() == expected


def test_search_applies_the_share_and_records_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv(LOCAL_WORKERS_ENV, "2")
    before = torch.get_num_threads()
    try:
        study = search.run_search(load_space(text=SPACE.format(name="share", threads=""), file="s.yaml"), quiet=True)
        assert study.trials[0].user_attrs["threads"] == max(1, usable_cores() // 2)
        monkeypatch.setenv(LOCAL_WORKERS_ENV, "1")
        study = search.run_search(load_space(text=SPACE.format(name="fixed", threads=", threads: 1"), file="f.yaml"),
                                  quiet=True)
        assert study.trials[0].user_attrs["threads"] == 1
    finally:
        torch.set_num_threads(before)
