"""Whether a PostgreSQL test runs, skips or fails (shared by tests/test_workers.py and tests/test_budget.py).

The server is named by ``HYBRIDNAS_TEST_POSTGRES`` (``.ci/run`` starts one and exports it). Off CI a missing
server skips the test with the reason. With ``CI`` set (``.ci/run`` sets ``CI=1``; most CI services set it) a
missing server fails it: CI must not pass without the PostgreSQL path. Anything else that goes wrong (a server
answers but refuses the login, the database is missing, the driver is not installed, the URL does not parse)
fails everywhere: that is a broken setup, not an absent one.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pytest

URL_ENV = "HYBRIDNAS_TEST_POSTGRES"


class NoServer(Exception):
    """Nothing answers at the URL's host and port."""


@dataclass(frozen=True)
class Decision:
    action: str  # "run", "skip" or "fail"
    url: str | None
    reason: str = ""


def ci_enabled(env: Mapping[str, str]) -> bool:
    return env.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _shown(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"


def connect(url: str, timeout: float = 5.0) -> None:
    """Return when a PostgreSQL server at ``url`` accepts a session; raise :class:`NoServer` when nothing listens at
    its host and port, any other exception for anything else."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    u = make_url(url)
    host = u.host or "localhost"
    if not host.startswith("/"):
        try:
            socket.create_connection((host, u.port or 5432), timeout=timeout).close()
        except OSError as e:  # refused, timed out, unknown host
            raise NoServer(f"{host}:{u.port or 5432}: {e}") from None
    engine = create_engine(url, connect_args={"connect_timeout": max(1, int(timeout))})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()


def decide(env: Mapping[str, str], probe: Callable[[str], None] = connect) -> Decision:
    url = env.get(URL_ENV, "").strip()
    ci = ci_enabled(env)
    absent = "fail" if ci else "skip"
    why_ci = (f"; CI is set, so this fails: CI must start PostgreSQL and export {URL_ENV} (.ci/run does)" if ci
              else " (CI starts one)")
    if not url:
        return Decision(absent, None, f"{URL_ENV} is not set" + why_ci)
    try:
        probe(url)
    except NoServer as e:
        return Decision(absent, url, f"no PostgreSQL server answers at {_shown(url)} ({e})" + why_ci)
    except Exception as e:  # a server that answers wrongly, a bad URL, no driver: never a skip
        return Decision("fail", url, f"PostgreSQL at {_shown(url)} is not usable: {type(e).__name__}: {e}")
    return Decision("run", url)


_cached: Decision | None = None


def decision() -> Decision:
    global _cached
    if _cached is None:
        _cached = decide(os.environ)
    return _cached


def postgres_param(id: str = "postgresql"):
    """A ``pytest.param`` for a parametrized storage: skipped per :func:`decide`, else the Decision itself, which
    the test turns into its URL with :func:`url_or_fail`."""
    d = decision()
    return pytest.param(d, id=id, marks=pytest.mark.skipif(d.action == "skip", reason=d.reason))


def url_or_fail(storage):
    """The storage a test uses: itself, or for a PostgreSQL Decision its URL (or the test fails with the reason)."""
    if not isinstance(storage, Decision):
        return storage
    if storage.action != "run":
        pytest.fail(storage.reason, pytrace=False)
    return storage.url
