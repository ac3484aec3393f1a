"""Cluster-ready storage: RDB connections are pinged before use, Optuna's gRPC storage proxy can stand in front of
an RDB for many workers (``hybridnas storage-proxy``, ``--storage grpc://host:port``), and the private Optuna API the
heartbeats rest on is pinned and checked."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from pathlib import Path

import optuna
import pytest
from _postgres import postgres_param, url_or_fail

from hybridnas import search, storage
from hybridnas.cli import main
from hybridnas.config import load_space
from hybridnas.workers import worker_command

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- pool_pre_ping


def test_sqlite_storage_pings_its_connections(tmp_path):
    st = storage.make_storage(f"sqlite:///{tmp_path}/pre.db")
    assert isinstance(st, optuna.storages.RDBStorage)
    assert st.engine.pool._pre_ping is True
    assert st.get_heartbeat_interval() == 30  # heartbeats as before


@pytest.mark.parametrize("server", [postgres_param()])
def test_postgres_storage_pings_its_connections(server):
    st = storage.make_storage(url_or_fail(server))
    assert st.engine.pool._pre_ping is True and st.engine.dialect.name == "postgresql"


class _Recorder:
    def __init__(self, url, **kwargs):
        self.url, self.kwargs = url, kwargs


@pytest.mark.parametrize("url", ["postgresql://u:pw@db.example:5432/hybridnas",
                                 "postgresql+psycopg://u:pw@db.example/hybridnas", "mysql+pymysql://u:pw@db/h",
                                 "sqlite:///runs/x.db"])
def test_every_rdb_url_gets_pool_pre_ping(url, monkeypatch, tmp_path):
    """PostgreSQL servers and the proxies in front of them drop idle connections; Optuna pre-pings only MySQL."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(optuna.storages, "RDBStorage", _Recorder)
    st = storage.make_storage(url, heartbeat_interval=7, grace_period=21)
    assert isinstance(st, _Recorder) and st.url == url
    assert st.kwargs["engine_kwargs"]["pool_pre_ping"] is True
    assert st.kwargs["heartbeat_interval"] == 7 and st.kwargs["grace_period"] == 21


# ------------------------------------------------------------------------------ Optuna's private heartbeat API


def _requirement(name: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    found = [d for d in deps if re.match(rf"{name}\b", d)]
    assert len(found) == 1, deps
    return found[0]


def test_optuna_is_pinned_to_the_tested_major_version():
    """hybridnas.storage subclasses optuna.storages._heartbeat.BaseHeartbeat (private): the pin keeps a new major
    version, free to move it, from being installed untested."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    req = Requirement(_requirement("optuna"))
    installed = Version(optuna.__version__)
    assert installed in req.specifier, f"optuna {installed} is outside pyproject's pin {req.specifier}"
    upper = [s for s in req.specifier if s.operator == "<"]
    assert upper, f"pyproject pins optuna without an upper bound ({req.specifier}); hybridnas uses its private API"
    assert Version(upper[0].version) <= Version(f"{installed.major + 1}"), req.specifier


def test_optuna_private_heartbeat_api_is_still_there():
    import optuna.storages._heartbeat as hb

    where = (f"optuna {optuna.__version__}: hybridnas.storage subclasses optuna.storages._heartbeat.BaseHeartbeat and "
             "relies on optuna calling its heartbeat methods; port hybridnas.storage.SystemAttrHeartbeat to this "
             "version or keep pyproject's pin below it")
    assert hasattr(hb, "BaseHeartbeat"), "BaseHeartbeat is gone in " + where
    abstract = set(hb.BaseHeartbeat.__abstractmethods__)
    expected = {"record_heartbeat", "_get_stale_trial_ids", "get_heartbeat_interval",
                "get_heartbeat_stale_trial_callback"}
    assert abstract == expected, f"BaseHeartbeat's methods changed ({abstract}) in {where}"
    assert not (storage.SystemAttrHeartbeat.__abstractmethods__ & abstract)
    assert hasattr(hb, "is_heartbeat_enabled"), "is_heartbeat_enabled is gone in " + where


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_optuna_sees_the_heartbeats(tmp_path):
    """Optuna's optimize loop beats and fails stale trials only for a storage it recognises as a heartbeat one."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    journal = storage.make_storage(str(tmp_path / "hb.journal"), heartbeat_interval=5, grace_period=15)
    assert is_heartbeat_enabled(journal) and journal.get_heartbeat_interval() == 5
    study = optuna.create_study(storage=journal)
    t = study.ask()
    journal.record_heartbeat(t._trial_id)
    assert journal._get_stale_trial_ids(study._study_id) == []
    journal._grace = -1  # every beat is now too old
    assert journal._get_stale_trial_ids(study._study_id) == [t._trial_id]


# ----------------------------------------------------------------------------------------- the gRPC proxy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_grpc_url_without_a_proxy_is_a_clear_error(capsys):
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(storage.StorageUnavailableError, match=f"grpc://127.0.0.1:{port}.*hybridnas storage-proxy"):
        storage.make_storage(f"grpc://127.0.0.1:{port}", connect_timeout=1)
    assert time.monotonic() - t0 < 30
    assert main(["show", "nosuch", "--storage", "grpc://127.0.0.1:bad"]) == 2
    assert "grpc://HOST:PORT" in capsys.readouterr().err


def test_storage_proxy_refuses_what_it_cannot_serve(tmp_path, capsys):
    assert main(["storage-proxy", "--storage", str(tmp_path / "x.journal")]) == 2
    assert "an RDB URL" in capsys.readouterr().err
    assert main(["storage-proxy", "--storage", "grpc://127.0.0.1:13000"]) == 2
    assert "an RDB URL" in capsys.readouterr().err


SPACE = """\
name: {name}
task: {{name: mqar, vocab_size: 32, seq_len: 16, num_kv_pairs: 2, num_train: 64, num_test: 16}}
model:
  d_model: [16, 32]
  pattern: ["AA", "A-", "-A"]
  layers: {{A: {{n_heads: [1, 2]}}}}
train: {{steps: 3, batch_size: 8, eval_every: 3, warmup_steps: 1, target_accuracy: null, threads: 1,
        lr: {{low: 1.0e-3, high: 1.0e-2, log: true}}}}
search: {{n_trials: 6, sampler: random, pruner: none, lr_mode: sample, seed: 0, heartbeat_interval: 1,
         grace_period: 30, save_weights: false, confirm_top: 0}}
"""


@pytest.fixture
def proxy(tmp_path):
    """``hybridnas storage-proxy`` in front of a SQLite file, in its own process, on a free port."""
    db = f"sqlite:///{tmp_path}/behind.db"
    port = _free_port()
    log = open(tmp_path / "proxy.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "hybridnas.cli", "storage-proxy", "--storage", db,
                             "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        yield db, f"grpc://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.slow
def test_three_workers_through_the_grpc_proxy(proxy, tmp_path):
    db, url = proxy
    name = f"proxy_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "space.yaml"
    path.write_text(SPACE.format(name=name))
    st = storage.make_storage(url, connect_timeout=60)  # waits for the proxy to come up
    assert isinstance(st, optuna.storages.GrpcStorageProxy)
    search.open_study(load_space(str(path)), url, name)
    procs = [subprocess.Popen(worker_command(str(path), url, name, 6, i), cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for i in range(3)]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs

    for where in (url, db):  # through the proxy, and the RDB behind it directly
        study = storage.load_study(name, where)
        trials = study.get_trials(deepcopy=False)
        numbers = [t.number for t in trials]
        assert numbers == list(range(len(trials))), numbers  # no number handed out twice
        assert len({t._trial_id for t in trials}) == len(trials)
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        assert len(done) == search.finished_count(study) == 6, outs  # the cap held across the workers
        # the rest: proposals a worker made as the cap was reached, pruned untrained (search.over_cap)
        rest = [t for t in trials if t.state != optuna.trial.TrialState.COMPLETE]
        assert all(t.state == optuna.trial.TrialState.PRUNED and t.user_attrs.get("over_cap") and "metrics" not in
                   t.user_attrs for t in rest), [(t.state, t.user_attrs) for t in rest]
        assert all("metrics" in t.user_attrs and storage.BEAT_ATTR in t.system_attrs for t in done)
    assert main(["show", name, "--storage", url]) == 0
