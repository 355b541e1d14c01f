"""Embedded PostgreSQL for real: initdb, a streaming replica by base backup, root handling."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import require
from tests.integration.pgcluster import Cluster, wait_connect
from tiers.db import embedded
from tiers.db.embedded import RunAs


@pytest.fixture
def cluster(open_tmp: Path) -> Iterator[Cluster]:
    made = Cluster(open_tmp)
    yield made
    made.stop()


def test_primary_and_streaming_replica(cluster: Cluster) -> None:
    layout, run_as = cluster.layout, cluster.run_as
    primary_port, replica_port = cluster.ports
    assert embedded.init_primary(layout, run_as, "db-primary") is True
    assert embedded.init_primary(layout, run_as, "db-primary") is False  # reused, not redone
    cluster.start("db-primary", primary_port)
    with wait_connect(primary_port) as conn:
        conn.execute("CREATE TABLE t (v text)")
        conn.execute("INSERT INTO t VALUES ('before the backup')")

    assert embedded.init_replica(layout, run_as, "db-replica1", primary_port) is True
    embedded.point_replica_at(layout, run_as, "db-replica1", primary_port)
    assert not (layout.node_dir("db-replica1") / "postmaster.pid").exists()
    cluster.start("db-replica1", replica_port)

    with wait_connect(primary_port) as primary:
        primary.execute("INSERT INTO t VALUES ('after the backup')")
        lsn = primary.execute("SELECT pg_current_wal_lsn()").fetchone()
        with wait_connect(replica_port) as replica:
            assert replica.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
            deadline = time.monotonic() + 10
            while replica.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
                                  lsn).fetchone() != (True,):
                assert time.monotonic() < deadline, "replica did not replay the write"
                time.sleep(0.05)
            rows = replica.execute("SELECT v FROM t ORDER BY v").fetchall()
            assert rows == [("after the backup",), ("before the backup",)]
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                replica.execute("INSERT INTO t VALUES ('refused')")
        streams = primary.execute(
            "SELECT application_name, state FROM pg_stat_replication").fetchall()
    assert streams == [("db-replica1", "streaming")]


def test_runs_as_an_unprivileged_user_under_root(cluster: Cluster) -> None:
    require(os.geteuid() == 0, "only meaningful when the tests run as root")
    run_as = cluster.run_as
    assert run_as.uid not in (None, 0)
    embedded.init_primary(cluster.layout, run_as, "db-primary")
    cluster.start("db-primary", cluster.ports[0])
    with wait_connect(cluster.ports[0]) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        # Read while the session (and so its backend process) is still there.
        with open(f"/proc/{row[0]}/status") as status:
            uid_line = next(line for line in status if line.startswith("Uid:"))
    assert int(uid_line.split()[1]) == run_as.uid
    assert (cluster.layout.node_dir("db-primary") / "PG_VERSION").stat().st_uid == run_as.uid


def test_private_paths_are_made_reachable(open_tmp: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    require(os.geteuid() == 0, "only root runs PostgreSQL as another user")
    run_as = embedded.resolve_run_as("tiers")
    private = open_tmp / "private"
    private.mkdir(mode=0o700)
    assert not embedded.can_reach(private / "state", run_as)
    monkeypatch.setattr(embedded, "SYSTEM_DATA_ROOT", open_tmp / "system")
    layout = embedded.prepare_layout(private / "state" / "db", run_as)
    assert (private / "state" / "db").is_symlink()
    assert layout.root.parent == open_tmp / "system"
    assert embedded.can_reach(layout.root, run_as)
    # Called again, it finds the same place.
    assert embedded.prepare_layout(private / "state" / "db", run_as).root == layout.root

    assert (private.stat().st_mode & 0o777) == 0o700  # nothing of the user's was opened up
    reachable = embedded._mirror_install(embedded.pg_install_dir(), layout.root / "pginstall")
    version = subprocess.run([str(reachable / "bin" / "postgres"), "--version"],
                             capture_output=True, text=True, check=True,
                             **RunAs.popen_kwargs(run_as))  # type: ignore[call-overload]
    assert "PostgreSQL" in version.stdout
