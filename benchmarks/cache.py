"""tiers' memcached cluster client against pymemcache's HashClient, on three real memcached nodes.

    .venv/bin/python benchmarks/cache.py [--rounds 5] [--ops 30000] [--value-size 100]
        [--keys 10000] [--threads 1,4] [--batches 10,100] [--peers ketama,rendezvous]
        [--parts throughput,movement,stampede] [--quick]

Three memcached processes of its own (free ephemeral ports of 127.0.0.1) serve
three parts:

1. Throughput: get (hits), set and get_many of K keys through
   ``tiers.cache.cluster.CacheCluster`` (over tiers' blocking client) and
   through ``pymemcache.client.hash.HashClient``, the same nodes, keys and
   values; the clients take turns, the order rotating every round; medians
   of the rounds and the ratio tiers/pymemcache per operation.
2. Key movement: the share of keys whose node changes when a fourth node
   joins the three, for tiers' ketama ring, for pymemcache's hashers and for
   modulo hashing; then checked live on a fourth memcached.
3. Stampede: threads read one hot key whose TTL ends during the run, with
   a fake database behind it (a sleep that counts its calls): naive
   get-miss-compute-set against ``tiers.cache.stampede.get_or_compute`` with
   its lease, without and with XFetch.

Exit status: 0 after a full run, 1 when a server fails or a check does not
hold, 2 when memcached or pymemcache (or uhashring) is missing or an
argument is bad, 128+N after signal N (Ctrl-C: 130). Every memcached started
is stopped and the temporary directory removed in every case.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import math
import os
import platform
import pwd
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import _harness as h

PACKAGES = {"memcached": "memcached"}
MEMCACHED_DEFAULT_PORT = 11211
NODES = 3
PARTS = ("throughput", "movement", "stampede")
PEERS = ("ketama", "rendezvous")
TIMEOUTS = {"connect_timeout": 0.25, "timeout": 0.5}  # tiers' FailureSettings defaults


def _require_peers() -> tuple[Any, Any]:
    """pymemcache and uhashring, or exit 2 with the line that installs them."""
    try:
        import pymemcache.client.hash
        import uhashring
    except ImportError as exc:
        print(f"error: the peers pymemcache and uhashring are needed ({exc})", file=sys.stderr)
        print("install them with: .venv/bin/pip install -e '.[bench]'", file=sys.stderr)
        sys.exit(h.EXIT_MISSING)
    return pymemcache.client.hash, uhashring


# ---- memcached nodes --------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    """Free ephemeral ports, never memcached's well-known one."""
    ports: list[int] = []
    while len(ports) < count:
        port = h.free_port()
        if port != MEMCACHED_DEFAULT_PORT and port not in ports:
            ports.append(port)
    return ports


def _memcached_user() -> list[str]:
    # memcached refuses to run as root without -u.
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return ["-u", "root"]
    return ["-u", "nobody"]


def memcached_argv(port: int, memory_mb: int) -> list[str]:
    return [
        "memcached",
        "-p",
        str(port),
        "-l",
        "127.0.0.1",
        "-U",
        "0",
        "-m",
        str(memory_mb),
        "-c",
        "4096",
        *_memcached_user(),
    ]


def start_nodes(children: h.Children, count: int, memory_mb: int, first: int = 0) -> list[int]:
    """``count`` memcached processes, listening when this returns; their ports."""
    ports = _free_ports(count)
    started = []
    for i, port in enumerate(ports):
        started.append(children.start(f"memcached-{first + i}", memcached_argv(port, memory_mb)))
    for child, port in zip(started, ports, strict=True):
        children.wait_listening(child, port)
    return ports


# ---- clients ------------------------------------------------------------------------


def tiers_cluster(ports: Sequence[int], **kwargs: Any) -> Any:
    from tiers.cache.cluster import CacheCluster
    from tiers.cache.ring import NodeSpec

    return CacheCluster([NodeSpec("127.0.0.1", p) for p in ports], **kwargs)


def pymemcache_client(ports: Sequence[int], hasher: str, pooled: bool) -> Any:
    """A HashClient on ``ports``: ketama through uhashring, or its default rendezvous hash."""
    hash_mod, uhashring = _require_peers()
    kwargs: dict[str, Any] = {}
    if hasher == "ketama":
        kwargs["hasher"] = lambda: uhashring.HashRing(hash_fn="ketama")
    return hash_mod.HashClient(
        [("127.0.0.1", p) for p in ports],
        use_pooling=pooled,
        # Wait for STORED like tiers does; pymemcache's default sends sets noreply.
        default_noreply=False,
        **kwargs,
        **TIMEOUTS,
    )


@dataclass
class Contender:
    name: str
    make: Callable[[bool], Any]  # pooled (thread-safe) or not -> client
    close: Callable[[Any], None]
    clients: dict[bool, Any] = field(default_factory=dict)

    def client(self, threaded: bool) -> Any:
        if threaded not in self.clients:
            self.clients[threaded] = self.make(threaded)
        return self.clients[threaded]

    def shutdown(self) -> None:
        for client in self.clients.values():
            with contextlib.suppress(Exception):
                self.close(client)
        self.clients.clear()


def contenders(ports: Sequence[int], peers: Sequence[str]) -> list[Contender]:
    out = [Contender("tiers", lambda _threaded: tiers_cluster(ports), lambda c: c.close())]
    for peer in peers:
        out.append(
            Contender(
                f"pymemcache {peer}",
                lambda threaded, p=peer: pymemcache_client(ports, p, pooled=threaded),  # type: ignore[misc]
                lambda c: c.close(),
            )
        )
    return out


# ---- part 1: throughput -------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    name: str
    batch: int  # keys per call; 0 for set

    @property
    def keys_per_call(self) -> int:
        return max(1, self.batch)


@dataclass
class Run:
    calls: int
    wall: float
    cpu: float
    misses: int

    @property
    def rate(self) -> float:
        return self.calls / self.wall if self.wall > 0 else float("nan")

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.calls * 1e6 if self.calls else float("nan")


def _loop(
    client: Any, op: Op, plan: Sequence[Any], value: bytes, stop_at: float
) -> tuple[int, int]:
    """Run ``op`` over ``plan`` (keys, or key lists) until done or ``stop_at``; (calls, misses)."""
    misses = 0
    calls = 0
    if op.batch == 0:
        set_ = client.set
        for calls, key in enumerate(plan, 1):
            if not set_(key, value):
                misses += 1
            if not calls & 255 and time.perf_counter() > stop_at:
                break
    elif op.batch == 1:
        get = client.get
        for calls, key in enumerate(plan, 1):
            if get(key) is None:
                misses += 1
            if not calls & 255 and time.perf_counter() > stop_at:
                break
    else:
        get_many = client.get_many
        for calls, keys in enumerate(plan, 1):
            misses += len(keys) - len(get_many(keys))
            if not calls & 15 and time.perf_counter() > stop_at:
                break
    return calls, misses


def _join_all(workers: Sequence[threading.Thread], seconds: float) -> bool:
    """Join ``workers`` within ``seconds`` in all; whether they all ended."""
    deadline = time.monotonic() + seconds
    for w in workers:
        w.join(max(0.0, deadline - time.monotonic()))
    return not any(w.is_alive() for w in workers)


def measure(
    client: Any, op: Op, plan: Sequence[Any], value: bytes, *, threads: int, max_seconds: float
) -> Run:
    """``plan`` split over ``threads`` threads (1: this thread), bounded by ``max_seconds``."""
    if threads == 1:
        cpu0, t0 = time.process_time(), time.perf_counter()
        calls, misses = _loop(client, op, plan, value, t0 + max_seconds)
        return Run(calls, time.perf_counter() - t0, time.process_time() - cpu0, misses)
    share = len(plan) // threads
    results: list[tuple[int, int]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def work(part: Sequence[Any]) -> None:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return  # the main thread was interrupted before the start
        try:
            outcome = _loop(client, op, part, value, stop_at[0])
        except Exception as exc:  # reported by the main thread
            with lock:
                failures.append(exc)
            return
        with lock:
            results.append(outcome)

    workers = [
        threading.Thread(target=work, args=(plan[i * share : (i + 1) * share],), daemon=True)
        for i in range(threads)
    ]
    for w in workers:
        w.start()
    cpu0, t0 = time.process_time(), time.perf_counter()
    stop_at[0] = t0 + max_seconds
    finished = False
    try:
        barrier.wait()
        finished = _join_all(workers, max_seconds + 30)
    finally:
        if not finished:
            # Interrupted: the workers stop at their next look at the clock, before
            # their clients are closed.
            stop_at[0] = 0.0
            barrier.abort()
            _join_all(workers, 5)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if failures:
        raise h.BenchmarkError(f"{op.name} in a worker thread: {failures[0]!r}")
    return Run(sum(c for c, _ in results), wall, cpu, sum(m for _, m in results))


def _calls(op: Op, ops: int) -> int:
    # get_many calls carry K keys each: fewer calls keep each run near the same length.
    return ops if op.batch <= 1 else max(100, ops * 2 // op.batch)


def _plan(op: Op, order: Sequence[str], calls: int) -> list[Any]:
    n = len(order)
    if op.batch <= 1:
        return [order[i % n] for i in range(calls)]
    k = op.batch
    out = []
    for i in range(calls):
        start = (i * k) % n
        chunk = order[start : start + k]
        if len(chunk) < k:
            chunk = [*chunk, *order[: k - len(chunk)]]
        out.append(chunk)
    return out


def populate(client: Any, keys: Sequence[str], value: bytes) -> None:
    """Store every key through ``client`` and check that it reads them all back."""
    for key in keys:
        client.set(key, value)
    found = 0
    for i in range(0, len(keys), 100):
        found += len(client.get_many(keys[i : i + 100]))
    if found != len(keys):
        raise h.BenchmarkError(f"stored {len(keys)} keys but read back {found}")


def run_throughput(args: argparse.Namespace, ports: Sequence[int]) -> None:
    value = bytes(random.Random(7).choices(range(97, 123), k=args.value_size))
    keys = [f"bench:{i:07d}" for i in range(args.keys)]
    order = list(keys)
    random.Random(11).shuffle(order)
    ops = [Op("get", 1), Op("set", 0), *(Op(f"get_many {k}", k) for k in args.batches)]
    plans = {op.name: _plan(op, order, _calls(op, args.ops)) for op in ops}
    people = contenders(ports, args.peers)
    try:
        for c in people:
            # Each client stores the keys itself: with another hash they live on other nodes.
            populate(c.client(False), keys, value)
        for threads in args.threads:
            threaded = threads > 1
            results: dict[tuple[str, str], list[Run]] = {}
            for c in people:
                client = c.client(threaded)
                if threaded:  # fill the connection pools before measuring
                    measure(
                        client,
                        ops[0],
                        plans["get"][: threads * 200],
                        value,
                        threads=threads,
                        max_seconds=10,
                    )
            for r in range(args.rounds):
                for i, op in enumerate(ops):
                    for name in h.rotated([c.name for c in people], r + i):
                        c = next(x for x in people if x.name == name)
                        run = measure(
                            c.client(threaded),
                            op,
                            plans[op.name],
                            value,
                            threads=threads,
                            max_seconds=args.max_seconds,
                        )
                        results.setdefault((op.name, name), []).append(run)
                        print(
                            f"  throughput {threads} thr round {r + 1}/{args.rounds}"
                            f"  {op.name:<13} {name:<22} {run.rate:>9.0f} calls/s"
                            f"  cpu {run.cpu_us:7.1f} us/call  misses {run.misses}",
                            file=sys.stderr,
                            flush=True,
                        )
            print_throughput(args, threads, ops, people, results)
    finally:
        for c in people:
            c.shutdown()


def _med(runs: Sequence[Run], attr: str) -> float:
    return h.median([getattr(r, attr) for r in runs])


def print_throughput(
    args: argparse.Namespace,
    threads: int,
    ops: Sequence[Op],
    people: Sequence[Contender],
    results: dict[tuple[str, str], list[Run]],
) -> None:
    print(
        f"Throughput, {threads} thread{'s' if threads > 1 else ''}: median of "
        f"{args.rounds} rounds, {args.value_size}-byte values, {args.keys} keys on {NODES} nodes"
    )
    print(
        f"  {'operation':<14}{'client':<24}{'calls/s':>10}{'keys/s':>10}{'CPU us/call':>13}"
        f"{'misses':>8}   calls/s per round"
    )
    for op in ops:
        for j, c in enumerate(people):
            runs = results[(op.name, c.name)]
            rate = _med(runs, "rate")
            print(
                f"  {op.name if j == 0 else '':<14}{c.name:<24}{rate:>10.0f}"
                f"{rate * op.keys_per_call:>10.0f}{_med(runs, 'cpu_us'):>13.1f}"
                f"{sum(r.misses for r in runs):>8}   " + " ".join(f"{r.rate:.0f}" for r in runs)
            )
    header = "".join(f"{op.name:>14}" for op in ops)
    print(f"  {'ratio calls/s (CPU/call)':<38}{header}")
    ours = people[0]
    for peer in people[1:]:
        cells = ""
        for op in ops:
            mine, theirs = results[(op.name, ours.name)], results[(op.name, peer.name)]
            rate = _med(mine, "rate") / _med(theirs, "rate")
            cpu = _med(mine, "cpu_us") / _med(theirs, "cpu_us")
            cells += f"{f'{rate:.2f} ({cpu:.2f})':>14}"
        print(f"  {f'{ours.name} / {peer.name}':<38}{cells}")
    print(flush=True)


# ---- part 2: key movement -----------------------------------------------------------


def _modulo(key: str, n: int) -> int:
    # python-memcached's server hash: crc32, 15 bits, modulo the server count.
    return ((zlib.crc32(key.encode()) >> 16) & 0x7FFF) % n


def run_movement(args: argparse.Namespace, children: h.Children, ports: Sequence[int]) -> None:
    from pymemcache.client.rendezvous import RendezvousHash

    from tiers.cache.ring import KetamaRing, NodeSpec

    _, uhashring = _require_peers()
    fourth = start_nodes(children, 1, args.memory_mb, first=NODES)[0]
    names3 = [f"127.0.0.1:{p}" for p in ports]
    names4 = [*names3, f"127.0.0.1:{fourth}"]
    keys = [f"bench:{i:07d}" for i in range(args.ring_keys)]

    def ketama(names: Sequence[str]) -> Callable[[str], str]:
        ring = KetamaRing([NodeSpec.parse(n) for n in names])
        return lambda key: names[ring.index_for(key)]

    def uhash(names: Sequence[str]) -> Callable[[str], str]:
        ring = uhashring.HashRing(hash_fn="ketama")
        for n in names:
            ring.add_node(n)
        return ring.get_node  # type: ignore[no-any-return]

    def rendezvous(names: Sequence[str]) -> Callable[[str], str]:
        ring = RendezvousHash()
        for n in names:
            ring.add_node(n)
        return ring.get_node  # type: ignore[no-any-return]

    def modulo(names: Sequence[str]) -> Callable[[str], str]:
        return lambda key: names[_modulo(key, len(names))]

    schemes = [
        ("tiers KetamaRing (libmemcached ketama)", ketama),
        ("pymemcache + uhashring ketama", uhash),
        ("pymemcache RendezvousHash (default)", rendezvous),
        ("modulo crc32 % N (python-memcached)", modulo),
    ]
    print(
        f"Key movement: {len(keys)} keys on {NODES} nodes, a fourth node added "
        "(expected for consistent hashing: 1/4 = 25%)"
    )
    print(
        f"  {'hashing':<42}{'moved':>9}{'moved %':>9}{'to new %':>10}"
        f"{'share of new node':>19}{'seconds':>9}"
    )
    placements: dict[str, list[str]] = {}
    for label, build in schemes:
        t0 = time.perf_counter()
        before, after = build(names3), build(names4)
        old = [before(k) for k in keys]
        new = [after(k) for k in keys]
        elapsed = time.perf_counter() - t0
        moved = sum(1 for a, b in zip(old, new, strict=True) if a != b)
        to_new = sum(1 for a, b in zip(old, new, strict=True) if a != b and b == names4[-1])
        share = sum(1 for b in new if b == names4[-1])
        placements[label] = new
        print(
            f"  {label:<42}{moved:>9}{moved / len(keys):>9.1%}"
            f"{(to_new / moved if moved else 0):>10.1%}{share / len(keys):>19.1%}{elapsed:>9.1f}"
        )
        print(
            f"  movement {label}: {moved}/{len(keys)} moved in {elapsed:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    ours, theirs = placements[schemes[0][0]], placements[schemes[1][0]]
    same = sum(1 for a, b in zip(ours, theirs, strict=True) if a == b)
    print(f"  tiers and uhashring put {same / len(keys):.3%} of the keys on the same node")

    # Live: keys stored through a 3-node cluster, read through a 4-node one.
    live = [f"move:{i:07d}" for i in range(args.live_keys)]
    value = b"m" * args.value_size
    predicted_ring = ketama(names4)
    before_ring = ketama(names3)
    predicted = sum(1 for k in live if predicted_ring(k) != before_ring(k))
    with tiers_cluster(ports) as three, tiers_cluster([*ports, fourth]) as four:
        for key in live:
            three.set(key, value)
        hits = 0
        for i in range(0, len(live), 100):
            hits += len(four.get_many(live[i : i + 100]))
    missed = len(live) - hits
    print(
        f"  live: {len(live)} keys stored through the 3-node tiers cluster, read through "
        f"the 4-node one: {missed} missed ({missed / len(live):.1%}); the ring predicted "
        f"{predicted}{'' if missed == predicted else '  MISMATCH'}"
    )
    print(flush=True)
    if missed != predicted:
        raise h.BenchmarkError(f"live movement {missed} differs from the ring's {predicted}")


# ---- part 3: stampede ---------------------------------------------------------------


_STAMP = struct.Struct("<d")


class FakeDatabase:
    """A query that takes ``seconds`` and counts its calls and their overlap.

    Each answer starts with the Unix time it was made, so a reader can tell
    how old the value it got is.
    """

    def __init__(self, seconds: float, size: int) -> None:
        self.seconds = seconds
        self.padding = b"s" * max(0, size - _STAMP.size)
        self._lock = threading.Lock()
        self.calls = 0
        self.running = 0
        self.max_running = 0
        self.starts: list[float] = []

    def query(self) -> bytes:
        with self._lock:
            self.calls += 1
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.starts.append(time.monotonic())
        try:
            time.sleep(self.seconds)
            return _STAMP.pack(time.time()) + self.padding
        finally:
            with self._lock:
                self.running -= 1

    def reset(self) -> None:
        with self._lock:
            self.calls = self.max_running = 0
            self.starts.clear()

    def bursts(self) -> list[int]:
        """Calls grouped into bursts (a call starting within a query's time of the last)."""
        out: list[int] = []
        last = -math.inf
        for start in sorted(self.starts):
            if start - last > self.seconds:
                out.append(0)
            out[-1] += 1
            last = start
        return out


@dataclass
class StampedeRun:
    calls: int
    bursts: int
    max_burst: int
    max_running: int
    reads: int
    stale: int
    errors: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = max(0, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[rank]


def stampede_once(args: argparse.Namespace, cluster: Any, mode: str, key: str) -> StampedeRun:
    from tiers.cache.stampede import get_or_compute

    db = FakeDatabase(args.db_ms / 1000, args.value_size)
    ttl = args.ttl

    def naive() -> object:
        found = cluster.get(key)
        if found is None:
            found = db.query()
            cluster.set(key, found, ttl)
        return found

    beta = 1.0 if mode == "lease + XFetch" else 0.0

    def protected() -> object:
        return get_or_compute(cluster, key, db.query, ttl, beta=beta)

    read = naive if mode == "naive" else protected
    if not args.cold_start:
        read()  # the key holds a value when the readers start; that call is not counted
        db.reset()
    latencies: list[list[float]] = [[] for _ in range(args.stampede_threads)]
    errors = [0] * args.stampede_threads
    stale = [0] * args.stampede_threads
    stop = threading.Event()
    barrier = threading.Barrier(args.stampede_threads + 1)
    think = args.think_ms / 1000
    max_reads = int(args.stampede_seconds / max(think, 0.001)) + 10

    def reader(slot: int) -> None:
        mine = latencies[slot]
        rng = random.Random(slot)
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return  # the main thread was interrupted before the start
        # Readers start spread over one think time, as requests would.
        time.sleep(rng.random() * think)
        for _ in range(max_reads):
            if stop.is_set():
                return
            t0 = time.perf_counter()
            try:
                got = read()
            except Exception:
                got = None
            mine.append(time.perf_counter() - t0)
            if not isinstance(got, bytes) or len(got) < _STAMP.size:
                errors[slot] += 1
            elif _STAMP.unpack_from(got)[0] + ttl < time.time():
                stale[slot] += 1  # made more than a TTL ago: served while being refreshed
            time.sleep(think)

    workers = [
        threading.Thread(target=reader, args=(i,), daemon=True)
        for i in range(args.stampede_threads)
    ]
    for w in workers:
        w.start()
    try:
        barrier.wait()
        stop.wait(args.stampede_seconds)
    finally:
        stop.set()
        barrier.abort()  # releases readers still waiting if this thread was interrupted
        # A reader in the middle of a read ends it: at most get_or_compute's wait.
        finished = _join_all(workers, 30)
    if not finished:
        raise h.BenchmarkError(f"stampede {mode}: a reader thread did not finish")
    everything = sorted(x for per in latencies for x in per)
    bursts = db.bursts()
    return StampedeRun(
        calls=db.calls,
        bursts=len(bursts),
        max_burst=max(bursts, default=0),
        max_running=db.max_running,
        reads=len(everything),
        stale=sum(stale),
        errors=sum(errors),
        p50_ms=_percentile(everything, 0.50) * 1000,
        p99_ms=_percentile(everything, 0.99) * 1000,
        p999_ms=_percentile(everything, 0.999) * 1000,
        max_ms=(everything[-1] if everything else float("nan")) * 1000,
    )


def run_stampede(args: argparse.Namespace, ports: Sequence[int]) -> None:
    modes = ["naive", "lease", "lease + XFetch"]
    results: dict[str, list[StampedeRun]] = {m: [] for m in modes}
    # One idle connection per reader: the pool would otherwise close and reopen the extras.
    with tiers_cluster(ports, max_idle=args.stampede_threads) as cluster:
        for r in range(args.stampede_rounds):
            for mode in h.rotated(modes, r):
                key = f"stampede:{mode.replace(' ', '')}:{r}:{os.getpid()}:{time.time_ns()}"
                run = stampede_once(args, cluster, mode, key)
                results[mode].append(run)
                print(
                    f"  stampede round {r + 1}/{args.stampede_rounds}  {mode:<15}"
                    f" db calls {run.calls:4d} in {run.bursts} bursts (max {run.max_burst})"
                    f"  max concurrent {run.max_running}  reads {run.reads} stale {run.stale}"
                    f"  p50 {run.p50_ms:.2f} ms  p99 {run.p99_ms:.2f} ms"
                    f"  p99.9 {run.p999_ms:.2f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    start = "empty" if args.cold_start else "holding a fresh value"
    print(
        f"Stampede: {args.stampede_threads} threads read one key for {args.stampede_seconds:g} s"
        f" (a read every {args.think_ms:g} ms each), TTL {args.ttl} s, the database query"
        f" takes {args.db_ms:g} ms, the key {start} at the start;"
        f" median of {args.stampede_rounds} rounds"
    )
    print(
        f"  {'recipe':<16}{'db calls':>9}{'bursts':>7}{'max/burst':>10}{'max concur':>11}"
        f"{'reads':>8}{'stale':>7}{'p50 ms':>8}{'p99 ms':>8}{'p99.9 ms':>9}{'max ms':>8}"
        f"{'errors':>7}   db calls per round"
    )
    for mode in modes:
        runs = results[mode]

        def med(attr: str, runs: Sequence[StampedeRun] = runs) -> float:
            return h.median([getattr(x, attr) for x in runs])

        print(
            f"  {mode:<16}{med('calls'):>9.0f}{med('bursts'):>7.0f}{med('max_burst'):>10.0f}"
            f"{med('max_running'):>11.0f}{med('reads'):>8.0f}{med('stale'):>7.0f}"
            f"{med('p50_ms'):>8.2f}{med('p99_ms'):>8.2f}{med('p999_ms'):>9.2f}"
            f"{med('max_ms'):>8.1f}{sum(x.errors for x in runs):>7}   "
            + " ".join(str(x.calls) for x in runs)
        )
    print(
        "  lease: get_or_compute(beta=0), lease + XFetch: get_or_compute(beta=1); "
        "both with lease_ttl 5 s, wait 2 s, poll 20 ms, stale_ttl = TTL"
    )
    print(flush=True)


# ---- the run --------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need positive numbers: {text!r}")
    return values



def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/cache.py",
        description="tiers' memcached cluster client against pymemcache's HashClient, "
        "key movement on a fourth node, and stampede protection.",
    )
    p.add_argument("--quick", action="store_true", help="fewer rounds, ops and keys (~1 min)")
    p.add_argument("--parts", type=h.choice_list(PARTS), default=list(PARTS), help="default: all")
    p.add_argument("--rounds", type=int, help="throughput rounds (default 5; 2 with --quick)")
    p.add_argument("--ops", type=int, help="get/set calls per run (default 30000; --quick 8000)")
    p.add_argument("--max-seconds", type=float, default=5.0, help="cap on one run (default 5)")
    p.add_argument("--value-size", type=int, default=100, help="bytes per value (default 100)")
    p.add_argument("--keys", type=int, default=10_000, help="distinct keys read (default 10000)")
    p.add_argument("--threads", type=_int_list, help="thread counts (default 1,4; --quick 1)")
    p.add_argument("--batches", type=_int_list, default=[10, 100], help="get_many sizes")
    p.add_argument("--peers", type=h.choice_list(PEERS), default=list(PEERS),
                   help="pymemcache hashers")
    p.add_argument("--ring-keys", type=int, help="keys for movement (default 100000)")
    p.add_argument("--live-keys", type=int, help="keys for the live check (default 20000)")
    p.add_argument("--stampede-threads", type=int, default=50, help="readers (default 50)")
    p.add_argument("--stampede-seconds", type=float, help="per run (default 7; --quick 5)")
    p.add_argument("--stampede-rounds", type=int, help="default 3; 1 with --quick")
    p.add_argument("--ttl", type=int, default=2, help="hot key TTL in seconds (default 2)")
    p.add_argument("--db-ms", type=float, default=50.0, help="database query time (default 50)")
    p.add_argument("--think-ms", type=float, default=10.0, help="reader pause (default 10)")
    p.add_argument(
        "--cold-start", action="store_true", help="stampede readers start on an empty key"
    )
    p.add_argument("--memory-mb", type=int, default=64, help="memcached -m (default 64)")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "rounds": 2 if quick else 5,
        "ops": 8000 if quick else 30_000,
        "threads": [1] if quick else [1, 4],
        "ring_keys": 20_000 if quick else 100_000,
        "live_keys": 5000 if quick else 20_000,
        "stampede_seconds": 5.0 if quick else 7.0,
        "stampede_rounds": 1 if quick else 3,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.rounds < 1 or args.stampede_rounds < 1:
        p.error("rounds must be at least 1")
    if not 100 <= args.ops <= 10_000_000:
        p.error("--ops must be in [100, 10000000]")
    if not 0 < args.max_seconds <= 120:
        p.error("--max-seconds must be in (0, 120]")
    if not 1 <= args.value_size <= 512 * 1024:
        p.error("--value-size must be in [1, 524288]")
    if not max(args.batches) <= args.keys <= 1_000_000:
        p.error("--keys must be in [largest batch, 1000000]")
    if max(args.threads) > 64 or not 1 <= args.stampede_threads <= 500:
        p.error("at most 64 throughput threads and 500 stampede threads")
    if not 1000 <= args.ring_keys <= 2_000_000 or not 100 <= args.live_keys <= 200_000:
        p.error("--ring-keys in [1000, 2000000], --live-keys in [100, 200000]")
    if not 0 < args.stampede_seconds <= 120 or not 1 <= args.ttl <= 60:
        p.error("--stampede-seconds in (0, 120], --ttl in [1, 60]")
    if not 0 < args.db_ms <= 5000 or not 0 <= args.think_ms <= 1000:
        p.error("--db-ms in (0, 5000], --think-ms in [0, 1000]")
    return args


def _version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "?"


def print_header(args: argparse.Namespace, ports: Sequence[int]) -> None:
    cpu_model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu_model = next(
            (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?"
        )
    print(
        f"machine: {os.cpu_count()} CPUs ({cpu_model}), load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at start"
    )
    print(
        f"tiers {importlib.metadata.version('tiers')} on Python {platform.python_version()}; "
        f"pymemcache {importlib.metadata.version('pymemcache')}, "
        f"uhashring {importlib.metadata.version('uhashring')}; {_version(['memcached', '-V'])}"
    )
    print(f"nodes: {NODES} x {' '.join(memcached_argv(ports[0], args.memory_mb))}")
    print(
        "clients: tiers CacheCluster (blocking tiers Client per node, idle pool of 8, ketama "
        "as libmemcached, get_many writes every node's request before reading the replies as "
        "poll() reports them); pymemcache HashClient "
        "(use_pooling=False with 1 thread, True with more; default_noreply=False; "
        "'ketama': hasher uhashring.HashRing(hash_fn='ketama'), same placement as tiers; "
        "'rendezvous': its default RendezvousHash, pure-Python murmur3); both with connect "
        "timeout 0.25 s and timeout 0.5 s"
    )
    print(flush=True)


def run(args: argparse.Namespace, children: h.Children) -> None:
    ports = start_nodes(children, NODES, args.memory_mb)
    print_header(args, ports)
    if "throughput" in args.parts:
        run_throughput(args, ports)
    if "movement" in args.parts:
        run_movement(args, children, ports)
    if "stampede" in args.parts:
        run_stampede(args, ports)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    h.require_commands(PACKAGES)
    _require_peers()
    try:
        importlib.metadata.version("tiers")
    except importlib.metadata.PackageNotFoundError:
        print(
            "error: tiers is not installed; run python3 -m venv .venv && "
            ".venv/bin/pip install -e '.[bench]'",
            file=sys.stderr,
        )
        return h.EXIT_MISSING
    h.exit_on_signals()
    tmp = tempfile.mkdtemp(prefix="tiers-bench-cache-")
    try:
        with h.Children(tmp) as children:
            run(args, children)
        return 0
    except h.BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
