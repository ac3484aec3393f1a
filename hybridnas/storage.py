"""Where studies live: SQLite by default, a journal file for several local workers, any SQLAlchemy URL.

Both RDB and journal storages get heartbeats: a worker that dies (``kill -9``, a lost machine) stops beating,
and the next worker to ask for a trial marks its trial FAIL and enqueues a retry with the same parameters
(Optuna's ``RetryHeartbeatStaleTrialCallback``). Optuna's journal storage has no heartbeat of its own;
:class:`HeartbeatJournalStorage` adds one, stored as a trial system attribute.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import JournalStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import FrozenTrial, TrialState

RUNS_DIR = "runs"
_BEAT = "hybridnas:heartbeat"


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal-file storage whose running trials beat every ``heartbeat_interval`` seconds."""

    def __init__(self, path: str, heartbeat_interval: int, grace_period: int,
                 stale_callback: Callable[[optuna.Study, FrozenTrial], None] | None):
        super().__init__(optuna.storages.journal.JournalFileBackend(path))
        self._hb_interval = heartbeat_interval
        self._grace = grace_period
        self._stale_callback = stale_callback

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, _BEAT, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            last = t.system_attrs.get(_BEAT)
            if last is None and t.datetime_start is not None:
                last = t.datetime_start.timestamp()
            if last is not None and now - last > self._grace:
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._hb_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._stale_callback


def _retry_callback() -> Callable[[optuna.Study, FrozenTrial], None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)


def is_url(storage: str) -> bool:
    return "://" in storage


def make_storage(url: str, heartbeat_interval: int = 30, grace_period: int = 120) -> optuna.storages.BaseStorage:
    """SQLAlchemy URL -> RDB storage; ``:memory:`` -> in-memory (a replay); anything else is a journal file path.
    RDB and journal storages get heartbeats."""
    if url == ":memory:":
        return optuna.storages.InMemoryStorage()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        if is_url(url):
            if url.startswith("sqlite:///"):
                Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            engine_kwargs = {"pool_pre_ping": True} if url.startswith("postgresql") else None
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                              grace_period=grace_period,
                                              heartbeat_stale_trial_callback=_retry_callback())
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return HeartbeatJournalStorage(url, heartbeat_interval, grace_period, _retry_callback())


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
    try:
        return optuna.load_study(study_name=name, storage=st)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(st)]
        raise FileNotFoundError(f"no study named {name!r} in {url}; studies there: {names}") from None
