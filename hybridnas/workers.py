"""``hybridnas search --workers N``: N local processes on one study.

Each worker is ``hybridnas search SPACE --storage URL --study NAME --worker-index i`` (so any other machine
can join the same study by running the same command against a shared PostgreSQL URL; ``deploy/`` has SLURM and
Kubernetes templates that do). Workers get distinct sampler seeds (Optuna's advice for parallel TPE), one GPU each
where there are GPUs (of those this process may use), their share of the cores (:func:`worker_env`; torch
threads per :func:`hybridnas.runtime.torch_threads`) and a log file under ``runs/<study>/workers/``. The trial cap
is global: every worker stops once ``n_trials`` trials have trained.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from hybridnas.runtime import LOCAL_WORKERS_ENV
from hybridnas.schema import SearchSpace
from hybridnas.storage import RUNS_DIR


def worker_command(space_file: str, storage: str, study: str, n_trials: int, index: int,
                   timeout: float | None = None, seed: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "hybridnas.cli", "search", space_file, "--storage", storage, "--study", study,
           "--n-trials", str(n_trials), "--worker-index", str(index), "--quiet"]
    if timeout is not None:
        cmd += ["--timeout", str(timeout)]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    return cmd


def visible_gpus(gpus: int, env: dict[str, str] | os._Environ) -> list[str]:
    """The ``gpus`` devices this process can use, as CUDA_VISIBLE_DEVICES entries a child can be given: the
    parent's own CUDA_VISIBLE_DEVICES entries where it has them (SLURM, a shared node: ``2,3``, or GPU UUIDs),
    else ``0 .. gpus-1``."""
    own = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if own and len(own) >= gpus:
        return own[:gpus]  # CUDA stops at the first entry it cannot use: torch counted the ones before it
    return [str(i) for i in range(gpus)]


def worker_env(index: int, n: int, gpus: int = 0, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of worker ``index`` of ``n`` local ones: how many share the cores (each takes its share of
    torch threads, :func:`hybridnas.runtime.torch_threads`) and, where there are ``gpus`` GPUs, which one it uses
    (round robin over :func:`visible_gpus` when there are more workers than GPUs)."""
    env = dict(os.environ if base is None else base)
    env[LOCAL_WORKERS_ENV] = str(n)
    if gpus:
        devices = visible_gpus(gpus, env)
        env["CUDA_VISIBLE_DEVICES"] = devices[index % len(devices)]
    return env


def run_workers(space: SearchSpace, n: int, *, storage: str, study_name: str, n_trials: int,
                timeout: float | None = None, seed: int | None = None, quiet: bool = False) -> int:
    """Start ``n`` worker processes and wait for them; returns the number that exited non-zero."""
    from tqdm.auto import tqdm

    from hybridnas.search import finished_count
    from hybridnas.storage import load_study

    log_dir = Path(RUNS_DIR) / study_name / "workers"
    log_dir.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    procs: list[subprocess.Popen] = []
    logs = []
    for i in range(n):
        env = worker_env(i, n, gpus)
        log = open(log_dir / f"worker-{i}.log", "ab")
        logs.append(log)
        procs.append(subprocess.Popen(worker_command(space.source.file, storage, study_name, n_trials, i, timeout,
                                                     seed), stdout=log, stderr=subprocess.STDOUT, env=env))
    bar = tqdm(total=n_trials, desc=f"trials ({n} workers)", unit="trial", disable=quiet, dynamic_ncols=True)
    study = load_study(study_name, storage)  # the caller created it before starting the workers
    t0, before = time.perf_counter(), finished_count(study)
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(2)
            bar.n = min(finished_count(study), n_trials)
            bar.refresh()
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise
    finally:
        bar.close()
        for log in logs:
            log.close()
    failed = sum(p.returncode != 0 for p in procs)
    if failed and not quiet:
        print(f"{failed} worker(s) exited with an error; see {log_dir}/")
    trained, hours = finished_count(study), (time.perf_counter() - t0) / 3600
    if trained < n_trials:
        print(f"ended short of the target: trained {trained} of {n_trials} trials (why: {log_dir}/); "
              "run the same command again to go on")
    if not quiet:
        print(f"{trained - before} trial(s) trained in {hours * 60:.1f} min by {n} workers: "
              f"{(trained - before) / max(hours, 1e-9):.1f} trials/hour")
    return failed
