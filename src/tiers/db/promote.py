"""Carry out the actions of :mod:`tiers.db.failover` against the servers of this stack.

:class:`Executor` runs each action's I/O through the nodes' engine
(:class:`tiers.db.engine.Engine`: connections, promotion, stopping a
server, following another primary, resynchronising an old primary; for
PostgreSQL its programs run through :func:`tiers.db.embedded.run_tool`, so
as the unprivileged system user when tiers runs as root) and keeps the
fencing markers itself. :meth:`Executor.execute` carries out a plan in order
and stops at the first failure: the remaining steps are not attempted,
because each depends on the ones before (above all, nothing is promoted
unless the old primary was fenced). Every step is idempotent, so planning
again from fresh facts and executing the new plan finishes an interrupted
one.

Fencing. A fenced node carries the marker file ``tiers.fenced`` in its data
directory and is stopped. Whatever starts servers must check
:func:`is_fenced` first and start a fenced node only through
:meth:`Executor.rejoin`, which resynchronises it and turns it into a
replica before removing the marker. A resync may delete files the primary
lacks (pg_rewind does), the marker among them, so while a rejoin runs a
second marker next to the data directory (``<name>.rejoining``) keeps the
node fenced; it goes only once the node is configured as a replica.

The believed primary is recorded in the file ``tiers-primary`` of the data
root (:func:`read_primary`, :func:`write_primary`), written by
:class:`~tiers.db.failover.Announce`.

Errors: every failed step raises :class:`FailoverStepError`, a
:class:`tiers.errors.DatabaseError` naming the step and the node, with the
foreign error (the driver's, OSError, a tool's output) as its cause::

    DatabaseError
     +-- FailoverStepError   .step ("fence", "promote", ...) and .node
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import assert_never

from tiers.db.embedded import Layout, RunAs
from tiers.db.engine import Connection, Engine, LocalServer, default_engine
from tiers.db.errors import Failure, classify
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
from tiers.errors import DatabaseError

FENCE_MARKER = "tiers.fenced"
PRIMARY_RECORD = "tiers-primary"
_REJOINING = ".rejoining"
_POLL = 0.05


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

    ``engine`` is the nodes' engine (default PostgreSQL's). ``start(name)``
    starts a node's server on its data directory as it is (the supervisor
    or a test harness owns the processes); without it a rejoined node is
    left ready to start. ``announce(name)`` tells routers about a new
    primary. ``timeout`` bounds each step's waits; a health check's connect
    is bounded by ``check_timeout``.
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
        engine: Engine | None = None,
    ) -> None:
        self.layout = layout
        self.run_as = run_as
        self.ports = dict(ports)
        self.engine = engine if engine is not None else default_engine()
        self._start = start
        self._announce = announce
        self.timeout = timeout
        self.check_timeout = check_timeout
        self._failures: tuple[type[BaseException], ...] = (
            DatabaseError, OSError, *self.engine.errors)
        self._unanswered: tuple[type[BaseException], ...] = (DatabaseError, *self.engine.errors)

    # ---- facts ----------------------------------------------------------------

    def observe(self, failures: Mapping[str, int] | None = None) -> list[NodeFacts]:
        """One health check of every node, in ``ports`` order.

        ``failures`` holds each node's ``failed_checks`` from the previous
        round; a node that fails again counts one more, one that answers 0.
        """
        previous = failures or {}
        return [self.probe(name, previous.get(name, 0)) for name in self.ports]

    def probe(self, name: str, failed_before: int = 0) -> NodeFacts:
        """Ask one node for its role, position and upstream; never raises for a dead node."""
        fenced = is_fenced(self.layout, name)
        try:
            with self._connect(name, self.check_timeout) as conn:
                facts = self.engine.server_facts(conn)
        except self._unanswered:
            return NodeFacts(name, reachable=False, failed_checks=failed_before + 1,
                             fenced=fenced)
        upstream = None
        if facts.in_recovery:
            # '' for none configured, or a server that is none of ours.
            upstream = next((n for n, p in self.ports.items() if p == facts.upstream_port), "")
        return NodeFacts(name, reachable=True, in_recovery=facts.in_recovery,
                         position=facts.position, fenced=fenced, upstream=upstream)

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
        server already finds it. ``clean`` stops it so that it first sends
        all of its history to the replicas, failing rather than killing (a
        switchover needs that; PostgreSQL: a fast shutdown); otherwise as
        fast as possible, killing whatever is left (a hung or half-dead
        server, orphaned backends).
        """
        with self._step("fence", node):
            server = self._server(node)
            marker = server.data_dir / FENCE_MARKER
            marker.write_text("fenced by tiers: start only as a replica after a rejoin\n",
                              encoding="utf-8")
            self._own(marker)
            self.engine.stop(server, clean=clean, timeout=self.timeout)

    def unfence(self, node: str) -> None:
        """Remove the fence marker, e.g. to start a cleanly stopped old primary again
        after a switchover that stopped before promoting; the caller vouches for it."""
        with self._step("unfence", node):
            (self._dir(node) / FENCE_MARKER).unlink(missing_ok=True)

    def wait_for_replay(self, node: str, source: str) -> None:
        """Wait until ``node`` has replayed everything the cleanly stopped ``source`` wrote.

        Fails if ``source`` was not shut down cleanly (its end is unknown).
        """
        with self._step("wait for replay", node):
            self._port(node)
            final = self.engine.end_of_history(self._server(source))

            def replayed() -> bool:
                with self._connect(node, self.check_timeout) as conn:
                    position = self.engine.replayed_position(conn)
                return position is not None and position >= final

            self._wait(replayed, f"a replay that reaches {self.engine.format_token(final)}, "
                                 f"the end of {source}", tolerate_gone=True)

    def promote(self, node: str) -> None:
        """End recovery on ``node``; returns once it accepts writes."""
        with self._step("promote", node):
            if is_fenced(self.layout, node):
                raise DatabaseError("it is fenced; a fenced node may only rejoin as a replica")
            with self._connect(node, self.timeout) as conn:
                self.engine.promote(conn, self.timeout)

    def announce(self, primary: str) -> None:
        """Record ``primary`` and pass it to the ``announce`` callback."""
        with self._step("announce", primary):
            write_primary(self.layout, primary)
            if self._announce is not None:
                self._announce(primary)

    def repoint(self, replica: str, new_primary: str) -> None:
        """Make ``replica`` stream from ``new_primary`` (following its new history).

        Returns once it streams from the new primary; a stopped replica only
        gets the new setting.
        """
        with self._step("repoint", replica):
            if replica == new_primary:
                raise DatabaseError("a node cannot stream from itself")
            if is_fenced(self.layout, replica):
                raise DatabaseError("it is fenced; rejoin it instead")
            primary_port = self._port(new_primary)
            server = self._server(replica)
            self.engine.follow(server, primary_port)
            if not self.engine.running(server):
                return

            def streaming() -> bool:
                with self._connect(replica, self.check_timeout) as conn:
                    return self.engine.streaming_from(conn) == primary_port

            self._wait(streaming, f"it to stream from {new_primary}", tolerate_gone=True)

    def rejoin(self, node: str, new_primary: str) -> None:
        """Turn the stopped ``node`` into a replica of ``new_primary`` and start it.

        The engine resynchronises its data with the new primary's history
        (PostgreSQL: pg_rewind, cheap since only what diverged is copied
        back; if it fails, a fresh base backup), then configures it as a
        replica. The marker goes once that is done; then ``start`` (if
        given) runs and this returns when the node answers as a replica.
        """
        with self._step("rejoin", node):
            if node == new_primary:
                raise DatabaseError("a node cannot rejoin under itself")
            server = self._server(node)
            if self.engine.running(server):
                raise DatabaseError("it is running; fence it first")
            primary_port = self._port(new_primary)
            guard = _rejoin_guard(self.layout, node)
            guard.touch()
            self.engine.resync(server, primary_port, self.timeout)
            self.engine.follow(server, primary_port)
            (server.data_dir / FENCE_MARKER).unlink(missing_ok=True)
            guard.unlink()
            if self._start is None:
                return
            self._start(node)

            def replica() -> bool:
                with self._connect(node, self.check_timeout) as conn:
                    return self.engine.server_facts(conn).in_recovery

            self._wait(replica, "it to answer as a replica", tolerate_gone=True)

    # ---- helpers --------------------------------------------------------------

    @contextmanager
    def _step(self, step: str, node: str) -> Iterator[None]:
        try:
            yield
        except FailoverStepError:
            raise
        except self._failures as exc:
            raise FailoverStepError(step, node, str(exc)) from exc

    def _port(self, node: str) -> int:
        try:
            return self.ports[node]
        except KeyError:
            raise DatabaseError(f"{node} is not a database node") from None

    def _dir(self, node: str) -> Path:
        self._port(node)  # an unknown name is an error, not a new directory
        return self.layout.node_dir(node)

    def _server(self, node: str) -> LocalServer:
        return LocalServer(self.layout, self.run_as, node, self._port(node))

    def _connect(self, node: str, timeout: float) -> closing[Connection]:
        engine = self.engine
        return closing(engine.connect(engine.local_dsn(self._port(node)), timeout,
                                      autocommit=True))

    def _own(self, path: Path) -> None:
        if self.run_as.uid is not None and self.run_as.gid is not None:
            os.chown(path, self.run_as.uid, self.run_as.gid)

    def _wait(self, done: Callable[[], bool], what: str, *, tolerate_gone: bool = False) -> None:
        """Poll ``done`` until true; with ``tolerate_gone`` an error that says the node is
        gone (not up yet, restarting) counts as "not yet"."""
        deadline = time.monotonic() + self.timeout
        last: Exception | None = None
        while True:
            try:
                if done():
                    return
            except Exception as exc:
                if not tolerate_gone or classify(exc, self.engine) is not Failure.NODE_GONE:
                    raise
                last = exc
            if time.monotonic() >= deadline:
                detail = f" (last error: {last})" if last is not None else ""
                raise DatabaseError(f"gave up waiting {self.timeout:g}s for {what}{detail}")
            time.sleep(_POLL)


def _rejoin_guard(layout: Layout, name: str) -> Path:
    return layout.root / (name + _REJOINING)

