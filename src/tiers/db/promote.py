"""Carry out the actions of :mod:`tiers.db.failover` against the embedded servers.

:class:`Executor` runs each action's I/O: it connects to nodes over TCP,
runs the PostgreSQL programs through :func:`tiers.db.embedded.run_tool` (so
as the unprivileged system user when tiers runs as root) and edits data
directories. :meth:`Executor.execute` carries out a plan in order and stops
at the first failure: the remaining steps are not attempted, because each
depends on the ones before (above all, nothing is promoted unless the old
primary was fenced). Every step is idempotent, so planning again from fresh
facts and executing the new plan finishes an interrupted one.

Fencing. A fenced node carries the marker file ``tiers.fenced`` in its data
directory and is stopped. Whatever starts servers must check
:func:`is_fenced` first and start a fenced node only through
:meth:`Executor.rejoin`, which rewinds it and turns it into a replica before
removing the marker. pg_rewind deletes files the source lacks, the marker
among them, so while a rejoin runs a second marker next to the data
directory (``<name>.rejoining``) keeps the node fenced; it goes only once
``standby.signal`` is in place.

The believed primary is recorded in the file ``tiers-primary`` of the data
root (:func:`read_primary`, :func:`write_primary`), written by
:class:`~tiers.db.failover.Announce`.

Errors: every failed step raises :class:`FailoverStepError`, a
:class:`tiers.errors.DatabaseError` naming the step and the node, with the
foreign error (psycopg, OSError, a tool's output) as its cause::

    DatabaseError
     +-- FailoverStepError   .step ("fence", "promote", ...) and .node
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import assert_never

import psutil
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow

from tiers.db import embedded
from tiers.db.embedded import Layout, RunAs
from tiers.db.failover import (
    Action,
    Announce,
    Fence,
    NodeFacts,
    Promote,
    Rejoin,
    Repoint,
    WaitForReplay,
)
from tiers.db.tokens import format_lsn, parse_lsn
from tiers.errors import DatabaseError

FENCE_MARKER = "tiers.fenced"
PRIMARY_RECORD = "tiers-primary"
_REJOINING = ".rejoining"
_POLL = 0.05

_FACTS_SQL = (
    "SELECT pg_is_in_recovery(),"
    " (CASE WHEN pg_is_in_recovery()"
    "  THEN greatest(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())"
    "  ELSE pg_current_wal_lsn() END)::text,"
    " current_setting('primary_conninfo')"
)
_CONTROL_LINE = re.compile(r"^([^:]+):\s*(.*)$", re.MULTILINE)


class FailoverStepError(DatabaseError):
    """One step of a failover or switchover failed on one node."""

    def __init__(self, step: str, node: str, reason: str) -> None:
        self.step = step
        self.node = node
        super().__init__(f"{step} {node}: {reason}")


def is_fenced(layout: Layout, name: str) -> bool:
    """True if ``name`` must not be started except through a rejoin."""
    return ((layout.node_dir(name) / FENCE_MARKER).exists()
            or _rejoin_guard(layout, name).exists())


def read_primary(layout: Layout, default: str) -> str:
    """The recorded primary, or ``default`` before any failover recorded one."""
    try:
        name = (layout.root / PRIMARY_RECORD).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return default
    except OSError as exc:
        raise DatabaseError(f"cannot read {layout.root / PRIMARY_RECORD}: {exc}") from exc
    return name or default


def write_primary(layout: Layout, name: str) -> None:
    """Record ``name`` as the primary; atomic, so a reader sees the old or the new name."""
    record = layout.root / PRIMARY_RECORD
    partial = record.with_name(PRIMARY_RECORD + ".partial")
    try:
        partial.write_text(name + "\n", encoding="utf-8")
        os.replace(partial, record)
    except OSError as exc:
        raise DatabaseError(f"cannot record the primary in {record}: {exc}") from exc


class Executor:
    """Carries out failover actions on the nodes named in ``ports`` (name -> TCP port).

    ``start(name)`` starts a node's server on its data directory as it is
    (the supervisor or a test harness owns the processes); without it a
    rejoined node is left ready to start. ``announce(name)`` tells routers
    about a new primary. ``timeout`` bounds each step's waits; a health
    check's connect is bounded by ``check_timeout``.
    """

    def __init__(
        self,
        layout: Layout,
        run_as: RunAs,
        ports: Mapping[str, int],
        *,
        start: Callable[[str], None] | None = None,
        announce: Callable[[str], None] | None = None,
        timeout: float = 30.0,
        check_timeout: float = 1.0,
    ) -> None:
        self.layout = layout
        self.run_as = run_as
        self.ports = dict(ports)
        self._start = start
        self._announce = announce
        self.timeout = timeout
        self.check_timeout = check_timeout

    # ---- facts ----------------------------------------------------------------

    def observe(self, failures: Mapping[str, int] | None = None) -> list[NodeFacts]:
        """One health check of every node, in ``ports`` order.

        ``failures`` holds each node's ``failed_checks`` from the previous
        round; a node that fails again counts one more, one that answers 0.
        """
        previous = failures or {}
        return [self.probe(name, previous.get(name, 0)) for name in self.ports]

    def probe(self, name: str, failed_before: int = 0) -> NodeFacts:
        """Ask one node for its role, WAL position and upstream; never raises for a dead node."""
        fenced = is_fenced(self.layout, name)
        try:
            with self._connect(name, self.check_timeout) as conn:
                row = conn.execute(_FACTS_SQL).fetchone()
        except (psycopg.Error, DatabaseError):
            return NodeFacts(name, reachable=False, failed_checks=failed_before + 1,
                             fenced=fenced)
        assert row is not None
        in_recovery, position, primary_conninfo = bool(row[0]), row[1], str(row[2] or "")
        return NodeFacts(
            name, reachable=True, in_recovery=in_recovery,
            position=None if position is None else parse_lsn(str(position)),
            fenced=fenced, upstream=self._upstream(primary_conninfo) if in_recovery else None,
        )

    def _upstream(self, primary_conninfo: str) -> str:
        """The node a replica's primary_conninfo names; '' for none or a stranger."""
        try:
            port = conninfo_to_dict(primary_conninfo).get("port") if primary_conninfo else None
        except psycopg.Error:
            return ""
        return next((n for n, p in self.ports.items() if str(p) == str(port)), "")

    # ---- the plan -------------------------------------------------------------

    def execute(self, actions: Iterable[Action]) -> None:
        """Carry out ``actions`` in order; the first failure raises and ends the run."""
        for action in actions:
            match action:
                case Fence(node, clean):
                    self.fence(node, clean=clean)
                case WaitForReplay(node, source):
                    self.wait_for_replay(node, source)
                case Promote(node):
                    self.promote(node)
                case Announce(primary):
                    self.announce(primary)
                case Repoint(replica, new_primary):
                    self.repoint(replica, new_primary)
                case Rejoin(old_primary, new_primary):
                    self.rejoin(old_primary, new_primary)
                case _:
                    assert_never(action)

    # ---- steps ----------------------------------------------------------------

    def fence(self, node: str, *, clean: bool = False) -> None:
        """Mark ``node`` fenced, then stop it; returns once none of its processes is left.

        The marker comes first so that a supervisor restarting the exited
        server already finds it. ``clean`` uses a fast shutdown and fails
        rather than kill (a switchover needs the WAL sent); otherwise an
        immediate shutdown, then SIGKILL of whatever still runs in the data
        directory (a hung or half-dead postmaster, orphaned backends).
        """
        with self._step("fence", node):
            data = self._dir(node)
            marker = data / FENCE_MARKER
            marker.write_text("fenced by tiers: start only as a replica after a rejoin\n",
                              encoding="utf-8")
            self._own(marker)
            if not _server_processes(data):
                return
            if clean:
                self._pg_ctl(node, "stop", "-m", "fast")
                return
            # A dead postmaster cannot be signalled; its orphans are killed below.
            with suppress(DatabaseError):
                self._pg_ctl(node, "stop", "-m", "immediate")
            self._wait(lambda: _kill_all(_server_processes(data)), "its processes to exit")

    def unfence(self, node: str) -> None:
        """Remove the fence marker, e.g. to start a cleanly stopped old primary again
        after a switchover that stopped before promoting; the caller vouches for it."""
        with self._step("unfence", node):
            (self._dir(node) / FENCE_MARKER).unlink(missing_ok=True)

    def wait_for_replay(self, node: str, source: str) -> None:
        """Wait until ``node`` has replayed everything the cleanly stopped ``source`` wrote.

        The final record of a clean shutdown is its checkpoint; the replica
        has it once its replay position lies past the checkpoint's start.
        Fails if ``source`` was not shut down cleanly (its end is unknown).
        """
        with self._step("wait for replay", node):
            control = self._control_data(source)
            state = control.get("Database cluster state", "")
            if state != "shut down":
                raise DatabaseError(f"{source} is not cleanly shut down ({state or 'unknown'})")
            final = parse_lsn(control["Latest checkpoint location"])

            def replayed() -> bool:
                with self._connect(node, self.check_timeout) as conn:
                    row = conn.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()
                return row is not None and row[0] is not None and parse_lsn(row[0]) > final

            self._wait(replayed, f"a replay past {format_lsn(final)}, the end of {source}",
                       tolerate=psycopg.OperationalError)

    def promote(self, node: str) -> None:
        """End recovery on ``node``; returns once it accepts writes."""
        with self._step("promote", node):
            if is_fenced(self.layout, node):
                raise DatabaseError("it is fenced; a fenced node may only rejoin as a replica")
            with self._connect(node, self.timeout) as conn:
                if _in_recovery(conn):
                    row = conn.execute("SELECT pg_promote(true, %s)",
                                       (max(1, int(self.timeout)),)).fetchone()
                    if row is None or not row[0]:
                        raise DatabaseError(f"not promoted within {self.timeout:g}s")
                if _in_recovery(conn):
                    raise DatabaseError("still in recovery after promotion")

    def announce(self, primary: str) -> None:
        """Record ``primary`` and pass it to the ``announce`` callback."""
        with self._step("announce", primary):
            write_primary(self.layout, primary)
            if self._announce is not None:
                self._announce(primary)

    def repoint(self, replica: str, new_primary: str) -> None:
        """Make ``replica`` stream from ``new_primary``.

        primary_conninfo is rewritten and the server reloaded (PostgreSQL
        restarts its WAL receiver when that setting changes, and follows the
        new timeline since recovery_target_timeline defaults to latest).
        Returns once it streams from the new primary; a stopped replica only
        gets the new setting.
        """
        with self._step("repoint", replica):
            if replica == new_primary:
                raise DatabaseError("a node cannot stream from itself")
            if is_fenced(self.layout, replica):
                raise DatabaseError("it is fenced; rejoin it instead")
            primary_port = self._port(new_primary)
            embedded.point_replica_at(self.layout, self.run_as, replica, primary_port)
            if not _server_processes(self._dir(replica)):
                return
            self._pg_ctl(replica, "reload")

            def streaming() -> bool:
                with self._connect(replica, self.check_timeout) as conn:
                    if not _in_recovery(conn):
                        raise DatabaseError("it is not a replica")
                    row = conn.execute(
                        "SELECT status, sender_port FROM pg_stat_wal_receiver").fetchone()
                return row is not None and row[0] == "streaming" and row[1] == primary_port

            self._wait(streaming, f"it to stream from {new_primary}",
                       tolerate=psycopg.OperationalError)

    def rejoin(self, node: str, new_primary: str) -> None:
        """Turn the stopped ``node`` into a replica of ``new_primary`` and start it.

        pg_rewind first (cheap: only what diverged is copied back); if it
        fails, a fresh base backup replaces the data directory. The marker
        goes once standby.signal is written; then ``start`` (if given) runs
        and this returns when the node answers as a replica.
        """
        with self._step("rejoin", node):
            if node == new_primary:
                raise DatabaseError("a node cannot rejoin under itself")
            data = self._dir(node)
            if _server_processes(data):
                raise DatabaseError("it is running; fence it first")
            primary_port = self._port(new_primary)
            guard = _rejoin_guard(self.layout, node)
            guard.touch()
            with self._connect(new_primary, self.timeout) as conn:
                # A freshly promoted server's control file shows its new timeline
                # only after a checkpoint, and pg_rewind reads the timeline there.
                conn.execute("CHECKPOINT")
            try:
                embedded.run_tool(self.layout, self.run_as, "pg_rewind", [
                    "--target-pgdata", str(data),
                    "--source-server", embedded.conninfo(primary_port, "postgres"),
                ], timeout=self.timeout)
            except DatabaseError as rewind_failed:
                self._rebuild(node, primary_port, rewind_failed)
            embedded.point_replica_at(self.layout, self.run_as, node, primary_port)
            (data / FENCE_MARKER).unlink(missing_ok=True)
            guard.unlink()
            if self._start is None:
                return
            self._start(node)

            def replica() -> bool:
                with self._connect(node, self.check_timeout) as conn:
                    return _in_recovery(conn)

            self._wait(replica, "it to answer as a replica", tolerate=psycopg.OperationalError)

    def _rebuild(self, node: str, primary_port: int, rewind_failed: DatabaseError) -> None:
        """Replace the data directory by a base backup of the primary at ``primary_port``."""
        data = self._dir(node)
        discarded = data.with_name(data.name + ".discarded")
        shutil.rmtree(discarded, ignore_errors=True)
        data.rename(discarded)
        try:
            embedded.init_replica(self.layout, self.run_as, node, primary_port)
        except DatabaseError as exc:
            if not data.exists():
                discarded.rename(data)
            raise DatabaseError(f"pg_rewind failed ({rewind_failed}) and so did a fresh "
                                f"base backup ({exc})") from exc
        shutil.rmtree(discarded, ignore_errors=True)

    # ---- helpers --------------------------------------------------------------

    @contextmanager
    def _step(self, step: str, node: str) -> Iterator[None]:
        try:
            yield
        except FailoverStepError:
            raise
        except (DatabaseError, OSError, psycopg.Error) as exc:
            raise FailoverStepError(step, node, str(exc)) from exc

    def _port(self, node: str) -> int:
        try:
            return self.ports[node]
        except KeyError:
            raise DatabaseError(f"{node} is not a database node") from None

    def _dir(self, node: str) -> Path:
        self._port(node)  # an unknown name is an error, not a new directory
        return self.layout.node_dir(node)

    def _connect(self, node: str, timeout: float) -> psycopg.Connection[TupleRow]:
        return psycopg.connect(embedded.conninfo(self._port(node), "postgres"),
                               autocommit=True, connect_timeout=max(1, round(timeout)))

    def _pg_ctl(self, node: str, command: str, *args: str) -> None:
        wait = ["-w", "-t", str(max(1, int(self.timeout)))] if command == "stop" else []
        embedded.run_tool(self.layout, self.run_as, "pg_ctl",
                          [command, "-D", str(self._dir(node)), *wait, *args],
                          timeout=self.timeout + 5)

    def _control_data(self, node: str) -> dict[str, str]:
        output = embedded.run_tool(self.layout, self.run_as, "pg_controldata",
                                   ["-D", str(self._dir(node))])
        return {key.strip(): value.strip() for key, value in _CONTROL_LINE.findall(output)}

    def _own(self, path: Path) -> None:
        if self.run_as.uid is not None and self.run_as.gid is not None:
            os.chown(path, self.run_as.uid, self.run_as.gid)

    def _wait(self, done: Callable[[], bool], what: str,
              tolerate: type[Exception] | None = None) -> None:
        """Poll ``done`` until true; ``tolerate`` errors count as "not yet"."""
        deadline = time.monotonic() + self.timeout
        last: Exception | None = None
        while True:
            try:
                if done():
                    return
            except Exception as exc:
                if tolerate is None or not isinstance(exc, tolerate):
                    raise
                last = exc
            if time.monotonic() >= deadline:
                detail = f" (last error: {last})" if last is not None else ""
                raise DatabaseError(f"gave up waiting {self.timeout:g}s for {what}{detail}")
            time.sleep(_POLL)


def _rejoin_guard(layout: Layout, name: str) -> Path:
    return layout.root / (name + _REJOINING)


def _in_recovery(conn: psycopg.Connection[TupleRow]) -> bool:
    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    return row is not None and bool(row[0])


def _server_processes(data: Path) -> list[psutil.Process]:
    """The live processes working in ``data``: a PostgreSQL server and all its children
    make their data directory their working directory, and nothing else of tiers does."""
    target = os.path.realpath(data)
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.cwd() == target and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue  # gone meanwhile, a zombie, or another user's
    return found


def _kill_all(processes: list[psutil.Process]) -> bool:
    """SIGKILL ``processes``; True if there were none left to kill."""
    for proc in processes:
        try:
            proc.kill()
        except psutil.Error:
            continue
    return not processes
