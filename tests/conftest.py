"""Shared test helpers.

Locally, a test whose external dependency is missing skips with the reason;
with TIERS_REQUIRE_ALL=1 (as CI runs) it fails instead, so nothing is
silently left untested.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _default_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pytest_sessionstart(session: pytest.Session) -> None:
    # SIGTERM (a CI job cancelled, kill) would end the run where it stands:
    # the servers a test started stop by themselves, but no fixture teardown
    # runs, and their directories stay in /tmp. As an interrupt, like
    # Ctrl-C, it lets pytest run every teardown before it exits. Only in
    # this process: a process a test forks (a prefork server, say) must die
    # of SIGTERM as before, not run this session's teardown.
    signal.signal(signal.SIGTERM, _interrupt)
    os.register_at_fork(after_in_child=_default_sigterm)


def require(condition: bool, reason: str) -> None:
    """Skip (or, under TIERS_REQUIRE_ALL=1, fail) when ``condition`` is false."""
    if condition:
        return
    if os.environ.get("TIERS_REQUIRE_ALL") == "1":
        pytest.fail(f"required dependency missing: {reason}")
    pytest.skip(reason)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary directory other users may traverse (PostgreSQL runs as its own user
    when the tests run as root, and pytest's own tmp_path lives below a private one)."""
    path = Path(tempfile.mkdtemp(prefix="tiers-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_admin_dsn() -> Iterator[str]:
    """A real PostgreSQL server (embedded, one per test session) and a superuser DSN."""
    from tests.integration.pgcluster import Cluster, wait_connect

    root = Path(tempfile.mkdtemp(prefix="tiers-pg-"))
    root.chmod(0o755)
    cluster = Cluster(root, nodes=1)
    try:
        from tiers.db import embedded

        embedded.init_primary(cluster.layout, cluster.run_as, "db-primary")
        cluster.start("db-primary", cluster.ports[0])
        wait_connect(cluster.ports[0]).close()
        yield cluster.dsn(0)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fresh_database(postgres_admin_dsn: str) -> Iterator[str]:
    """A database of its own on the session's server, dropped afterwards."""
    import uuid

    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"tiers_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    params = conninfo_to_dict(postgres_admin_dsn)
    params["dbname"] = name
    try:
        yield make_conninfo(**params)  # type: ignore[arg-type]
    finally:
        with psycopg.connect(postgres_admin_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
