"""Where studies live: SQLite by default, a journal file for several local workers, any SQLAlchemy URL, or Optuna's
gRPC storage proxy (``grpc://host:port``) in front of an RDB for many workers.

Every storage but the in-memory one gets heartbeats: a worker that dies (``kill -9``, a lost machine) stops
beating, and the next worker to ask for a trial marks its trial FAIL and enqueues a retry with the same parameters
(Optuna's ``RetryHeartbeatStaleTrialCallback``). RDB storages beat in their own table. Optuna's journal storage and
its gRPC proxy client have no heartbeat of their own: :class:`SystemAttrHeartbeat` adds one, stored as a trial
system attribute (:data:`BEAT_ATTR`).

RDB engines are made with ``pool_pre_ping``: a PostgreSQL server (or a proxy or firewall in between) drops idle
connections, and a worker that trained for an hour would otherwise find its pooled connection dead when it reports.

A heartbeat only tells after ``grace_period``. A trial also records its host and process (:func:`record_process`),
so a search starting on the same host fails and retries at once the running trials whose process is gone
(:func:`fail_dead_local_trials`). A storage that cannot be opened is a :class:`StorageError`: one line naming the
URL, password masked, and the cause.

The heartbeat rests on Optuna's private ``optuna.storages._heartbeat.BaseHeartbeat`` (Optuna has no public way to
give a storage a heartbeat): pyproject.toml pins Optuna's major version, and tests/test_storage_proxy.py fails with
a clear message if the symbol or its methods change.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import GrpcStorageProxy, JournalStorage
from optuna.trial import FrozenTrial, TrialState

try:
    from optuna.storages._heartbeat import BaseHeartbeat
except ImportError as e:  # pragma: no cover - only with an Optuna outside pyproject's pin
    raise ImportError(f"hybridnas needs optuna.storages._heartbeat.BaseHeartbeat, which optuna {optuna.__version__} "
                      "does not have: install the Optuna version pyproject.toml pins (pip install 'optuna>=5.0,<6')"
                      ) from e

RUNS_DIR = "runs"
BEAT_ATTR = "hybridnas:heartbeat"
GRPC_DEFAULT_PORT = 13000
StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


class StorageUnavailableError(ConnectionError):
    """Nothing answers at a storage's address (a gRPC proxy that is not running)."""


class StorageError(ValueError):
    """A storage that cannot be opened (a folder that cannot be written, a database server that does not answer, a
    missing driver); the message names the URL, password masked, and the cause, on one line."""


class SystemAttrHeartbeat(BaseHeartbeat):
    """Heartbeats for a storage that has none of its own: each running trial's last beat is a system attribute;
    a RUNNING trial whose last beat (or start) is older than ``grace_period`` seconds is stale."""

    def _init_heartbeat(self, heartbeat_interval: int, grace_period: int, stale_callback: StaleCallback | None):
        self._hb_interval = heartbeat_interval
        self._grace = grace_period
        self._stale_callback = stale_callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, BEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            last = t.system_attrs.get(BEAT_ATTR)
            if last is None and t.datetime_start is not None:
                last = t.datetime_start.timestamp()
            if last is not None and now - last > self._grace:
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._hb_interval

    def get_heartbeat_stale_trial_callback(self) -> StaleCallback | None:
        return self._stale_callback


class HeartbeatJournalStorage(JournalStorage, SystemAttrHeartbeat):
    """A journal-file storage whose running trials beat every ``heartbeat_interval`` seconds."""

    def __init__(self, path: str, heartbeat_interval: int, grace_period: int, stale_callback: StaleCallback | None):
        super().__init__(optuna.storages.journal.JournalFileBackend(path))
        self._init_heartbeat(heartbeat_interval, grace_period, stale_callback)


class HeartbeatGrpcStorageProxy(GrpcStorageProxy, SystemAttrHeartbeat):
    """A client of ``hybridnas storage-proxy`` (Optuna's gRPC proxy) whose running trials beat like a journal's."""

    def __init__(self, host: str, port: int, heartbeat_interval: int, grace_period: int,
                 stale_callback: StaleCallback | None):
        super().__init__(host=host, port=port)
        self._init_heartbeat(heartbeat_interval, grace_period, stale_callback)


def _retry_callback() -> Callable[[optuna.Study, FrozenTrial], None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)


def is_url(storage: str) -> bool:
    return "://" in storage


def is_grpc(storage: str) -> bool:
    return storage.startswith("grpc://")


def grpc_address(url: str) -> tuple[str, int]:
    """``grpc://HOST[:PORT]`` -> (host, port); the port defaults to Optuna's 13000."""
    parts = urlsplit(url)
    try:
        port = parts.port or GRPC_DEFAULT_PORT
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path not in ("", "/") or parts.query:
        raise ValueError(f"storage {url!r}: a gRPC storage proxy is named grpc://HOST:PORT (e.g. grpc://127.0.0.1:13000)")
    return parts.hostname, port


def _grpc_storage(url: str, heartbeat_interval: int, grace_period: int, connect_timeout: float) -> GrpcStorageProxy:
    host, port = grpc_address(url)
    try:
        import grpc  # noqa: F401 (Optuna imports it lazily: fail here, with the fix)
    except ImportError:
        raise ImportError("--storage grpc://... needs grpcio: pip install -e '.[grpc]'") from None
    st = HeartbeatGrpcStorageProxy(host, port, heartbeat_interval, grace_period, _retry_callback())
    try:
        st.wait_server_ready(timeout=connect_timeout)
    except ConnectionError:
        st.close()
        raise StorageUnavailableError(
            f"no Optuna storage proxy answers at grpc://{host}:{port} within {connect_timeout:g} s; start one in front "
            f"of the study's database with `hybridnas storage-proxy --storage URL --host HOST --port {port}`") from None
    return st


def _cause(e: BaseException, url: str) -> str:
    """The first line of what went wrong, without SQLAlchemy's wrapping (``(sqlite3.OperationalError) ...``) and
    without the URL's password."""
    if isinstance(e, (FileExistsError, NotADirectoryError)) and e.filename:
        return f"{e.filename} is not a folder"
    inner = getattr(e, "orig", None) or e
    text = " ".join(str(inner).split("\n")[0].split()) or type(inner).__name__
    if isinstance(inner, ModuleNotFoundError):
        text += " (the PostgreSQL driver: pip install -e \".[postgres]\")"
    secret = urlsplit(url).password if is_url(url) else None
    return text.replace(secret, "***") if secret else text


@contextlib.contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """Turn a failure to reach or create the storage at ``url`` into a :class:`StorageError`: one line instead of a
    driver's traceback. (A gRPC proxy that does not answer stays a :class:`StorageUnavailableError`.)"""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except StorageUnavailableError:
        raise
    except (OSError, ImportError, SQLAlchemyError) as e:
        raise StorageError(f"cannot open storage {shown_url(url)}: {_cause(e, url)}") from None


def rdb_storage(url: str, heartbeat_interval: int = 30, grace_period: int = 120) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats and pre-pinged connections (PostgreSQL drops idle ones)."""
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True},
                                          heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                          heartbeat_stale_trial_callback=_retry_callback())


def make_storage(url: str, heartbeat_interval: int = 30, grace_period: int = 120, *,
                 connect_timeout: float = 30.0) -> optuna.storages.BaseStorage:
    """SQLAlchemy URL -> RDB storage; ``grpc://host:port`` -> a client of a ``hybridnas storage-proxy`` (waiting up
    to ``connect_timeout`` seconds for it to answer); ``:memory:`` -> in-memory (a replay); anything else is a
    journal file path. All but the in-memory one get heartbeats."""
    if url == ":memory:":
        return optuna.storages.InMemoryStorage()
    with warnings.catch_warnings(), storage_errors(url):
        warnings.simplefilter("ignore", ExperimentalWarning)
        if is_grpc(url):
            return _grpc_storage(url, heartbeat_interval, grace_period, connect_timeout)
        if is_url(url):
            return rdb_storage(url, heartbeat_interval, grace_period)
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return HeartbeatJournalStorage(url, heartbeat_interval, grace_period, _retry_callback())


def shown_url(url: str) -> str:
    """``url`` with any password masked, for printing."""
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


def run_proxy(url: str, host: str = "127.0.0.1", port: int = GRPC_DEFAULT_PORT, *, log=print) -> None:
    """Serve the RDB storage at ``url`` to ``grpc://host:port`` clients until interrupted (Optuna's
    ``run_grpc_proxy_server``). Many workers then hold one connection each to the proxy instead of to the
    database, and share the proxy's cache of finished trials."""
    if not is_url(url) or is_grpc(url):
        raise ValueError(f"storage-proxy --storage {url!r}: the proxy serves an RDB URL (sqlite:///FILE, "
                         "postgresql://USER:PW@HOST/DB, mysql://...); Optuna's proxy cannot serve a journal file")
    backend = optuna.storages.get_storage(rdb_storage(url))  # cached, as Optuna advises for the proxy
    log(f"Optuna storage proxy for {shown_url(url)} on grpc://{host}:{port} (Ctrl-C stops it)", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        try:
            optuna.storages.run_grpc_proxy_server(backend, host=host, port=port)
        except RuntimeError as e:  # grpc: "Failed to bind to address ..."
            raise ValueError(f"storage-proxy cannot listen on {host}:{port}: {e}") from None


def default_storage(study_name: str, workers: int = 1) -> str:
    """SQLite for one process; a journal file when several local workers share the study."""
    if workers > 1:
        return f"{RUNS_DIR}/{study_name}.journal"
    return f"sqlite:///{RUNS_DIR}/{study_name}.db"


def find_storage(study_name: str) -> str:
    """The default storage that exists for ``study_name`` (SQLite first, then the workers' journal file)."""
    for url in (default_storage(study_name), default_storage(study_name, workers=2)):
        path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url
        if Path(path).exists():
            return url
    raise FileNotFoundError(f"no study storage for {study_name!r} under {RUNS_DIR}/ ({study_name}.db or "
                            f"{study_name}.journal); run `hybridnas search` first, or pass --storage")


def load_study(name: str, storage: str | None = None) -> optuna.Study:
    url = storage or find_storage(name)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        raise FileNotFoundError(f"no study storage at {url[len('sqlite:///'):]} (run `hybridnas search` first, "
                                f"or pass --storage)")
    if not is_url(url) and not Path(url).exists():
        raise FileNotFoundError(f"no journal file at {url}")
    st = make_storage(url)
    with storage_errors(url):
        try:
            return optuna.load_study(study_name=name, storage=st)
        except KeyError:
            names = [s.study_name for s in optuna.get_all_study_summaries(st)]
    raise FileNotFoundError(f"no study named {name!r} in {shown_url(url)}; studies there: {names}")


# ---------------------------------------------------------------------------------------------- dead processes

HOST_ATTR = "hybridnas:host"  # trial system attributes: where the trial runs
PID_ATTR = "hybridnas:pid"
PROCESS_ATTR = "hybridnas:process"  # {"trial", "machine", "start"}: tells a reused pid or an inherited attr apart


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of process ``pid`` from /proc, or None where unreadable."""
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields_[0], fields_[19]
    except (OSError, IndexError):
        return None


@functools.cache
def _machine() -> str | None:
    """This kernel boot and pid namespace: a pid names the same process only within both."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() + "/" + os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def record_process(trial: optuna.Trial) -> None:
    """Set on a starting trial where it runs: host, pid (and the pid's start time), so a later run on this host can
    tell that the process died (:func:`fail_dead_local_trials`)."""
    st, tid = trial.storage, trial._trial_id
    if isinstance(st, optuna.storages.InMemoryStorage):
        return  # dies with its process: nothing to tell a later run (a replay's studies)
    stat = _proc_stat(os.getpid())
    st.set_trial_system_attr(tid, HOST_ATTR, socket.gethostname())
    st.set_trial_system_attr(tid, PID_ATTR, os.getpid())
    st.set_trial_system_attr(tid, PROCESS_ATTR, {"trial": trial.number, "machine": _machine(),
                                                 "start": stat[1] if stat else None})


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process: alive
        return True
    stat = _proc_stat(pid)
    if stat is None:
        return True
    return stat[0] != "Z" and (start is None or stat[1] == start)  # a zombie, or the pid reused since


def dead_local_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """RUNNING trials whose process ran on this host and is gone. A trial of another host, of another pid
    namespace or boot, or without the attributes (started before they were recorded) is left to the heartbeat."""
    host, machine = socket.gethostname(), _machine()
    dead = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        a = t.system_attrs
        pid = a.get(PID_ATTR)
        if a.get(HOST_ATTR) != host or not isinstance(pid, int) or isinstance(pid, bool):
            continue
        proc = a.get(PROCESS_ATTR) or {}
        if proc.get("trial", t.number) != t.number:
            continue  # inherited by a retry that has not recorded its own process yet
        if proc.get("machine") not in (None, machine):
            continue
        if not _alive(pid, proc.get("start")):
            dead.append(t)
    return dead


def fail_dead_local_trials(study: optuna.Study, log: Callable[[str], None] | None = None, *,
                           retry: bool = True) -> list[int]:
    """Mark FAIL at once the RUNNING trials of this host's dead processes (a ``kill -9``, a crash), instead of
    holding their slot of the trial cap until the heartbeat's grace period runs out, and (``retry``) retry each as
    a stale heartbeat is retried (same parameters; ``distill-search`` keys its runs itself and reruns them without
    this). The failed trial says why (``stale``). Returns their numbers."""
    retry_cb = _retry_callback() if retry else None
    storage = study._storage
    failed = []
    for t in dead_local_trials(study):
        why = (f"its process {t.system_attrs[HOST_ATTR]}:{t.system_attrs[PID_ATTR]} died; failed when "
               f"{socket.gethostname()}:{os.getpid()} resumed the study, and retried")
        try:
            storage.set_trial_user_attr(t._trial_id, "stale", why)
            if not storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:
            continue  # another process got there first
        failed.append(t.number)
        if retry_cb is None:
            continue
        frozen = copy.deepcopy(storage.get_trial(t._trial_id))
        frozen.user_attrs.pop("stale", None)  # the retry inherits the trial's attributes, not its reason to fail
        before = {x.number for x in study.get_trials(deepcopy=False)}
        retry_cb(study, frozen)
        new = sorted({x.number for x in study.get_trials(deepcopy=False)} - before)
        if log is not None:
            log(f"trial {t.number} was left RUNNING by {t.system_attrs[HOST_ATTR]}:{t.system_attrs[PID_ATTR]}, which "
                "is gone: marked FAIL" + (f", retried as trial {new[0]}" if new else " (retried too often already)"))
    return failed
