"""Several worker processes on one study: global cap, kill -9 of a worker, retry, resume; journal and PostgreSQL.

The PostgreSQL run needs a server: set HYBRIDNAS_TEST_POSTGRES=postgresql://user:pw@127.0.0.1:5432/db
(`.ci/run` installs and starts one). Without it that case is skipped with the reason, except under CI (the env
var CI set), where it fails; a server that answers but cannot be used fails everywhere (tests/_postgres.py).
"""

import os
import signal
import subprocess
import time
import uuid

import optuna
import pytest
from _postgres import Decision, NoServer, connect, decide, postgres_param, url_or_fail

from hybridnas import search
from hybridnas.config import load_space
from hybridnas.storage import load_study
from hybridnas.workers import worker_command

SPACE = """\
name: {name}
task: {{name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 256, num_test: 32}}
model:
  d_model: [16, 32]
  pattern: ["AA", "A-", "AE", "-A"]
  layers: {{A: {{n_heads: [1, 2]}}, E: {{n_experts: 2, top_k: 1}}}}
train: {{steps: 300, batch_size: 16, eval_every: 100, warmup_steps: 5, target_accuracy: null,
        lr: {{low: 1.0e-3, high: 1.0e-2, log: true}}, threads: 1}}
search: {{n_trials: 6, sampler: random, pruner: none, seed: 0, heartbeat_interval: 1, grace_period: 3,
         save_weights: false}}
"""


def _storages():
    yield pytest.param("journal", id="journal-file")
    yield postgres_param()


def _wait(procs, timeout):
    deadline = time.time() + timeout
    for p in procs:
        p.wait(timeout=max(1, deadline - time.time()))


def _completed_snapshot(study):
    return {t.number: (t.values, t.params, t.user_attrs) for t in study.get_trials(
        deepcopy=True, states=(optuna.trial.TrialState.COMPLETE,))}


@pytest.mark.slow
@pytest.mark.parametrize("storage", list(_storages()))
def test_three_workers_cap_kill_retry_resume(storage, tmp_path, monkeypatch):
    storage = url_or_fail(storage)
    monkeypatch.chdir(tmp_path)
    name = f"workers_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "space.yaml"
    path.write_text(SPACE.format(name=name))
    url = str(tmp_path / "runs" / f"{name}.journal") if storage == "journal" else storage
    space = load_space(str(path))
    search.open_study(space, url, name)  # created once, before the workers race for it

    logs = [open(tmp_path / f"w{i}.log", "wb") for i in range(3)]
    procs = [subprocess.Popen(worker_command(str(path), url, name, 6, i), stdout=logs[i], stderr=subprocess.STDOUT)
             for i in range(3)]
    pids = {p.pid: p for p in procs}
    killed_trial = None
    try:
        deadline = time.time() + 120
        while killed_trial is None and time.time() < deadline:
            time.sleep(0.3)
            for t in load_study(name, url).get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                pid = int(str(t.user_attrs.get("worker", ":0")).rsplit(":", 1)[1])
                started = t.datetime_start.timestamp() if t.datetime_start else time.time()
                if pid in pids and "params" in t.user_attrs and time.time() - started > 0.5:
                    os.kill(pid, signal.SIGKILL)
                    killed_trial = t.number
                    victim = pids.pop(pid)
                    victim.wait()
                    break
        assert killed_trial is not None, "no running trial to kill"
        _wait(list(pids.values()), 240)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    assert all(p.returncode == 0 for p in pids.values()), [(tmp_path / f"w{i}.log").read_text()[-2000:]
                                                            for i in range(3)]

    study = load_study(name, url)
    states = {t.number: t.state for t in study.trials}
    assert states[killed_trial] == optuna.trial.TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed_trial]
    assert retries and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].params == study.trials[killed_trial].params
    assert search.finished_count(study) == 6  # the cap holds across workers
    # trained and complete: a duplicate proposal is COMPLETE too (it reuses a value) but trained nothing
    assert sum(t.state == optuna.trial.TrialState.COMPLETE and search.bookkeeping(t) is None
               for t in study.trials) == 6, [(t.number, t.state.name, t.user_attrs.get("duplicate_of"))
                                             for t in study.trials]
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    before = _completed_snapshot(study)

    # re-running resumes: two more trials, every completed trial and its attributes intact
    rc = subprocess.run(worker_command(str(path), url, name, 8, 0), capture_output=True, timeout=240).returncode
    assert rc == 0
    after_study = load_study(name, url)
    assert search.finished_count(after_study) == 8
    after = _completed_snapshot(after_study)
    for number, snap in before.items():
        assert after[number] == snap


@pytest.mark.slow
def test_cli_workers_use_a_journal_file_by_default(tmp_path, monkeypatch, capsys):
    from hybridnas.cli import main

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "space.yaml"
    path.write_text(SPACE.format(name="cliw").replace("steps: 300", "steps: 20").replace("n_trials: 6", "n_trials: 4"))
    assert main(["search", str(path), "--workers", "2", "--quiet"]) == 0
    assert (tmp_path / "runs" / "cliw.journal").exists()
    assert not (tmp_path / "runs" / "cliw.db").exists()
    study = load_study("cliw")  # found without --storage
    assert search.finished_count(study) == 4
    workers = {t.user_attrs["worker"] for t in study.trials if "worker" in t.user_attrs}
    assert len(workers) == 2  # both processes took trials
    assert main(["show", "cliw"]) == 0


# ---------------------------------------------------------------------------------- run, skip or fail (no server)

PG = "postgresql://u:secret@127.0.0.1:5999/db"


def _no_server(url):
    raise NoServer("127.0.0.1:5999: [Errno 111] Connection refused")


def _answers_wrongly(url):
    raise RuntimeError('password authentication failed for user "u"')


@pytest.mark.parametrize("env, probe, action", [
    ({}, None, "skip"),
    ({"CI": "1"}, None, "fail"),
    ({"CI": "true"}, None, "fail"),
    ({"CI": "false"}, None, "skip"),
    ({"HYBRIDNAS_TEST_POSTGRES": PG}, _no_server, "skip"),
    ({"HYBRIDNAS_TEST_POSTGRES": PG, "CI": "1"}, _no_server, "fail"),
    ({"HYBRIDNAS_TEST_POSTGRES": PG}, _answers_wrongly, "fail"),
    ({"HYBRIDNAS_TEST_POSTGRES": PG, "CI": "1"}, _answers_wrongly, "fail"),
    ({"HYBRIDNAS_TEST_POSTGRES": PG}, lambda url: None, "run"),
    ({"HYBRIDNAS_TEST_POSTGRES": PG, "CI": "1"}, lambda url: None, "run"),
])
def test_postgres_tests_skip_only_off_ci_and_only_without_a_server(env, probe, action):
    d = decide(env, probe or (lambda url: pytest.fail("no URL: nothing to probe")))
    assert d.action == action, d
    assert "secret" not in d.reason  # the password is never printed
    if action == "run":
        assert d.url == PG and url_or_fail(d) == PG
    else:
        assert ("HYBRIDNAS_TEST_POSTGRES is not set" in d.reason if "HYBRIDNAS_TEST_POSTGRES" not in env
                else "127.0.0.1:5999" in d.reason)
        assert ("CI is set" in d.reason) == (action == "fail" and probe is not _answers_wrongly)
    if action == "fail":
        with pytest.raises(pytest.fail.Exception, match="PostgreSQL|HYBRIDNAS_TEST_POSTGRES"):
            url_or_fail(d)
    assert url_or_fail("journal") == "journal"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_probe_tells_no_server_from_a_broken_one():
    """Nothing listening is "no server"; something listening that is not a usable PostgreSQL is a failure."""
    import socket
    import threading

    with pytest.raises(NoServer):
        connect(f"postgresql://u:pw@127.0.0.1:{_free_port()}/db", timeout=2)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]

        def hang_up():
            for _ in range(2):  # the probe's own connection, then the driver's
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                conn.close()

        threading.Thread(target=hang_up, daemon=True).start()
        d = decide({"HYBRIDNAS_TEST_POSTGRES": f"postgresql://u:pw@127.0.0.1:{port}/db"},
                   lambda url: connect(url, timeout=2))
    assert d.action == "fail" and "is not usable" in d.reason, d
    assert isinstance(d, Decision)


# ------------------------------------------------------------------------------------------- a GPU per worker


@pytest.fixture
def gpus(monkeypatch):
    """A machine with ``n`` GPUs as far as torch can tell; the parent's CUDA_VISIBLE_DEVICES unset."""
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def have(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return have


def _started_envs(monkeypatch, tmp_path, n: int) -> list[dict]:
    """The environments ``run_workers`` starts its ``n`` processes with (the processes themselves faked)."""
    from hybridnas import workers

    started = []

    class Done:
        returncode = 0

        def __init__(self, cmd, env=None, **kw):
            started.append(env)

        def poll(self):
            return 0

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(workers.subprocess, "Popen", Done)
    monkeypatch.setattr(workers.time, "sleep", lambda s: None)
    path = tmp_path / "space.yaml"
    path.write_text(SPACE.format(name="gpus"))
    space = load_space(str(path))
    url = str(tmp_path / "runs" / "gpus.journal")
    search.open_study(space, url, "gpus")
    assert workers.run_workers(space, n, storage=url, study_name="gpus", n_trials=6, quiet=True) == 0
    assert len(started) == n
    return started


@pytest.mark.parametrize("n_gpus, n_workers, devices", [
    (4, 2, ["0", "1"]),
    (4, 6, ["0", "1", "2", "3", "0", "1"]),  # more workers than GPUs: round robin
    (1, 3, ["0", "0", "0"]),
])
def test_each_local_worker_gets_its_own_gpu(gpus, monkeypatch, tmp_path, n_gpus, n_workers, devices):
    gpus(n_gpus)
    envs = _started_envs(monkeypatch, tmp_path, n_workers)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == devices
    assert all(e["HYBRIDNAS_LOCAL_WORKERS"] == str(n_workers) for e in envs)


def test_workers_without_gpus_get_no_device_setting(gpus, monkeypatch, tmp_path):
    gpus(0)
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in _started_envs(monkeypatch, tmp_path, 2))


def test_workers_share_out_the_gpus_they_were_given(gpus, monkeypatch, tmp_path):
    """Under SLURM or on a shared node the parent sees only some GPUs (CUDA_VISIBLE_DEVICES=2,3: torch counts 2):
    the workers get those, not physical devices 0 and 1."""
    gpus(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    envs = _started_envs(monkeypatch, tmp_path, 3)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "3", "2"]
    from hybridnas.workers import worker_env

    uuids = {"CUDA_VISIBLE_DEVICES": "GPU-aaaa,GPU-bbbb,GPU-cccc"}
    assert [worker_env(i, 2, 2, base=uuids)["CUDA_VISIBLE_DEVICES"] for i in range(2)] == ["GPU-aaaa", "GPU-bbbb"]
