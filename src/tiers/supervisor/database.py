"""The embedded PostgreSQL nodes as supervised services, with roles that move.

Node names are fixed when a node is created (``db-primary``, ``db-replica1``,
...) and so are their ports and data directories; which node is the primary
is a fact recorded in the data root (:func:`tiers.db.promote.read_primary`)
and changed only by a failover or a switchover. Every start of a node goes
through :meth:`DatabaseNodes.prepare`, which makes the node what the record
says it is:

* the recorded primary starts as it is (initdb on the very first start);
* any other node starts as a replica of the recorded primary: a base backup
  when it has no data yet, a rewind (or a new base backup) when it was fenced
  or was once a primary, and its primary_conninfo pointed at the primary.

Failover. When the primary's process exits while the stack runs, the next
start of that node first asks :func:`tiers.db.failover.plan_failover` what
to do, with the dead node counted as failed: the most advanced replica is
promoted, the old primary is fenced and comes back as a replica of it. A
primary that is alive but does not answer is found by :class:`PrimaryWatch`,
which asks the supervisor to kill it after ``failover_checks`` failed checks
in a row; the restart then fails over the same way. With no usable replica,
or with ``failover = false``, the primary is restarted in place.

A switchover (:meth:`DatabaseNodes.switchover`, asked for by ``tiers db
switchover``) runs in the supervisor process for the same reason: one lock
orders it with the restarts it causes, so a node stopped by the switchover is
started again only once the new roles are recorded.

The nodes speak to the engine the topology names (``[db] engine``,
:class:`tiers.db.engine.Engine`) for probes, DSNs and the failover steps;
the servers themselves are the embedded PostgreSQL ones
(:mod:`tiers.db.embedded`), PostgreSQL being the only engine with an adapter.

Every failure of these steps raises :class:`tiers.errors.DatabaseError`; in
``prepare`` that is a failed start, which the supervisor retries with backoff.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

from tiers.config.model import DbConfig
from tiers.db import embedded, postgres
from tiers.db.embedded import Layout, RunAs
from tiers.db.engine import NodeObservation, engine_named
from tiers.db.failover import FailoverPolicy, most_advanced, plan_failover, plan_switchover
from tiers.db.promote import Executor, is_fenced, read_primary
from tiers.errors import DatabaseError
from tiers.supervisor.runner import Command, ServiceSpec

# How long a replica's start waits for the recorded primary to answer.
PRIMARY_WAIT = 60.0


def node_names(cluster: DbConfig) -> list[str]:
    """The service names of a cluster's nodes, the first primary first.

    The main cluster's are ``db-primary`` and ``db-replicaN``; another
    cluster's carry its name: ``db-NAME-primary``, ``db-NAME-replicaN``.
    """
    prefix = "db-" if cluster.name == "main" else f"db-{cluster.name}-"
    return [f"{prefix}primary", *(f"{prefix}replica{i}" for i in range(1, cluster.replicas + 1))]


class DatabaseNodes:
    """The nodes of one database cluster, data under ``data_dir``; ``say`` reports failovers."""

    def __init__(self, db: DbConfig, data_dir: Path, *, migrations: Path | None = None,
                 say: Callable[[str], None] = print, jobs_schema: bool = False) -> None:
        self.db = db
        self.data_dir = data_dir
        self.migrations = migrations
        # The main cluster holds the job queue (tiers.jobs); others need not.
        self.jobs_schema = jobs_schema
        self.say = say
        self.engine = engine_named(db.engine)
        self.ports = dict(zip(node_names(db), db.ports, strict=True))
        # The node made primary when the cluster was created; the record names the current one.
        self.first_primary = next(iter(self.ports))
        self.policy = FailoverPolicy(failed_checks=db.failover_checks,
                                     check_interval=db.check_interval)
        # Orders prepares, failovers and switchovers: each reads and changes roles.
        self._lock = threading.RLock()
        self._layout_lock = threading.Lock()
        self._started: set[str] = set()
        self._run_as: RunAs | None = None
        self._layout: Layout | None = None

    @property
    def names(self) -> list[str]:
        return list(self.ports)

    # The system user and the on-disk layout are settled lazily, in the first
    # prepare step, so that building the specs (e.g. for `status`) has no side effects.
    def layout(self) -> tuple[Layout, RunAs]:
        with self._layout_lock:
            if self._layout is None or self._run_as is None:
                self._run_as = embedded.resolve_run_as(self.db.system_user)
                self._layout = embedded.prepare_layout(self.data_dir, self._run_as)
            return self._layout, self._run_as

    def primary(self) -> str:
        """The recorded primary; reads one file, creates nothing."""
        # The record sits in the data root; the data dir is that root or a link to it.
        return read_primary(Layout(root=self.data_dir, bin_dir=Path()), self.first_primary)

    def dsn(self, name: str) -> str:
        return self.engine.local_dsn(self.ports[name], self.db.database)

    def primary_dsn(self) -> str:
        return self.dsn(self.primary())

    def replica_dsns(self) -> list[str]:
        primary = self.primary()
        return [self.dsn(name) for name in self.ports if name != primary]

    def executor(self) -> Executor:
        layout, run_as = self.layout()
        return Executor(layout, run_as, self.ports, check_timeout=self.db.check_interval * 2,
                        engine=self.engine)

    # ---- services --------------------------------------------------------------

    def specs(self) -> list[ServiceSpec]:
        """One spec per node, the original primary first (it is created first)."""
        specs = []
        for name, port in self.ports.items():
            specs.append(ServiceSpec(
                name=name, role="primary" if name == self.first_primary else "replica",
                address=f"{self.db.host}:{port}", stop_signal=signal.SIGINT,
                prepare=partial(self.prepare, name),
                probe=partial(self._probe, name),
                after_ready=partial(self._after_ready, name),
            ))
        return specs

    def prepare(self, name: str) -> Command:
        """Make ``name`` the role the record gives it and return its server command."""
        layout, run_as = self.layout()
        while True:
            expected = read_primary(layout, self.first_primary)
            if expected != name:
                # Outside the lock: a replica may wait long for its primary, and
                # that primary's own restart (a failover) needs the lock meanwhile.
                self._wait_for(expected)
            with self._lock:
                primary = read_primary(layout, self.first_primary)
                if primary != expected:
                    continue  # roles moved while we waited
                if name == primary and name in self._started and self.db.failover:
                    primary = self._fail_over_from(name) or name
                if name == primary:
                    self._prepare_primary(layout, run_as, name)
                else:
                    self._prepare_replica(layout, run_as, name, primary)
                self._started.add(name)
            return Command(embedded.server_argv(layout, name, self.ports[name]),
                           # cwd: the user's working directory may be private to root.
                           popen_kwargs={**run_as.popen_kwargs(), "cwd": str(layout.root)})

    def _prepare_primary(self, layout: Layout, run_as: RunAs, name: str) -> None:
        if is_fenced(layout, name):
            raise DatabaseError(f"{name} is recorded as the primary but is fenced; "
                                f"see 'tiers db status'")
        if not (layout.node_dir(name) / "PG_VERSION").exists():
            if name != self.first_primary:
                raise DatabaseError(f"{name} is recorded as the primary but has no data "
                                    f"directory in {layout.root}")
            embedded.init_primary(layout, run_as, name)

    def _prepare_replica(self, layout: Layout, run_as: RunAs, name: str, primary: str) -> None:
        primary_port = self.ports[primary]
        self._wait_for(primary)  # at once unless a failover just chose it
        node = layout.node_dir(name)
        if not (node / "PG_VERSION").exists():
            embedded.init_replica(layout, run_as, name, primary_port)
        elif is_fenced(layout, name) or not (node / "standby.signal").exists():
            # Once a primary (fenced by a failover, or stopped by a switchover):
            # whatever it wrote that the new primary lacks must go first.
            self.say(f"{name}: rejoining as a replica of {primary}")
            self.executor().rejoin(name, primary)
        embedded.point_replica_at(layout, run_as, name, primary_port)

    def _wait_for(self, name: str) -> None:
        deadline = time.monotonic() + PRIMARY_WAIT
        while True:
            seen = self.look(name, 1.0)
            if seen.reachable and seen.in_recovery is False:
                return
            if time.monotonic() > deadline:
                raise DatabaseError(f"the primary {name} is not answering as a primary "
                                    f"({seen.error or 'in recovery'})")
            time.sleep(0.2)

    def _fail_over_from(self, dead: str) -> str | None:
        """Promote a replica in place of ``dead``, whose process has exited; the new primary."""
        executor = self.executor()
        facts = [replace(f, failed_checks=self.policy.failed_checks) if f.name == dead else f
                 for f in executor.observe()]
        if any(f.name == dead and f.reachable for f in facts):
            return None  # it is up after all (started outside the supervisor?)
        decision = plan_failover(facts, dead, self.policy, engine=self.engine)
        if not decision.actions:
            self.say(f"{dead}: restarting in place; no failover: {decision.reason}")
            return None
        self.say(f"{dead}: failing over: {decision.reason}")
        started = time.monotonic()
        executor.execute(decision.actions)
        new_primary = read_primary(executor.layout, dead)
        self.say(f"{new_primary}: is the primary now ({time.monotonic() - started:.2f}s); "
                 f"{dead} is fenced and comes back as its replica")
        return new_primary

    def switchover(self, target: str | None = None) -> str:
        """Make ``target`` (default: the most advanced replica) the primary; loses no commit.

        Returns a sentence saying what happened; raises DatabaseError when it
        cannot be done, before anything was changed where the plan allows.
        """
        with self._lock:
            executor = self.executor()
            primary = read_primary(executor.layout, self.first_primary)
            facts = executor.observe()
            if target is None:
                candidates = [f for f in facts if f.name != primary and f.reachable
                              and f.in_recovery and not f.fenced]
                if not candidates:
                    raise DatabaseError("no replica is reachable to take over")
                best = most_advanced(candidates)  # in node order: ties go to the first
                if best is None:
                    raise DatabaseError("no replica holds everything the others hold; "
                                        "name the target")
                target = best.name
            if target not in self.ports:
                raise DatabaseError(f"no database node named {target!r} "
                                    f"(nodes: {', '.join(self.ports)})")
            decision = plan_switchover(facts, primary, target)
            if not decision.actions:
                raise DatabaseError(f"cannot switch over: {decision.reason}")
            started = time.monotonic()
            self.say(f"switchover from {primary} to {target}: {decision.reason}")
            executor.execute(decision.actions)
            return (f"{target} is the primary; {primary} follows it as a replica "
                    f"({time.monotonic() - started:.2f}s)")

    # ---- readiness ----------------------------------------------------------------

    def look(self, name: str, timeout: float) -> NodeObservation:
        """One probe of ``name`` through the engine, on its administrative database."""
        return self.engine.probe(self.engine.local_dsn(self.ports[name]), timeout, name=name)

    def _probe(self, name: str) -> None:
        """Ready when it answers a query in the role the record gives it."""
        want_recovery = name != self.primary()
        seen = self.look(name, 1.0)
        if not seen.reachable:
            raise DatabaseError(f"{name} is not answering yet: {seen.error}")
        if seen.in_recovery is not want_recovery:
            role = "replica" if want_recovery else "primary"
            raise DatabaseError(f"{name} is not answering as a {role} yet")

    def _after_ready(self, name: str) -> None:
        if name != self.primary():
            return
        # The servers are the embedded PostgreSQL ones (see the module docstring).
        postgres.ensure_database(self.engine.local_dsn(self.ports[name]), self.db.database)
        if self.jobs_schema:
            # Before the app's migrations, so they may refer to the jobs tables.
            from tiers.jobs.store import install_schema
            install_schema(self.dsn(name))
        if self.migrations is not None:
            from tiers.db.migrate import apply_migrations
            apply_migrations(self.dsn(name), self.migrations)


class PrimaryWatch:
    """Checks the recorded primary; ``kill(name, reason)`` once it fails too many checks.

    Only a primary whose process still runs needs this: one that exits is
    replaced on its restart. ``is_ready(name)`` tells whether the supervisor
    has the node up, so a node that is starting or stopping is not judged.
    """

    def __init__(self, nodes: DatabaseNodes, is_ready: Callable[[str], bool],
                 kill: Callable[[str, str], None]) -> None:
        self._nodes = nodes
        self._is_ready = is_ready
        self._kill = kill
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._nodes.db.failover and self._nodes.db.replicas > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="primary-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def _run(self) -> None:
        interval = self._nodes.db.check_interval
        failed = 0
        while not self._stop.wait(interval):
            name = self._nodes.primary()
            if not self._is_ready(name):
                failed = 0
                continue
            seen = self._nodes.look(name, interval * 2)
            if seen.reachable and seen.in_recovery is False:
                failed = 0
                continue
            failed += 1
            if failed >= self._nodes.db.failover_checks:
                failed = 0
                self._kill(name, f"failed {self._nodes.db.failover_checks} health checks "
                                 f"in a row ({seen.error or 'not answering as a primary'})")
