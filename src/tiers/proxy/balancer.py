"""Decisions about backends, as plain values and functions: health, choice, slots, idle pool.

Nothing here does I/O or reads a clock; callers pass ``now`` in and carry
out what is returned (``tiers.proxy.upstream`` does the sockets and timers).

Health. Active checks follow the fall/rise rule: an up server goes down after
``fall`` consecutive failed checks, a down one comes back after ``rise``
consecutive good ones. Passive health watches real traffic: ``passive_fall``
consecutive failed exchanges (connection errors, 5xx answers, timeouts,
broken responses) take a server out at once, and only active checks bring
it back.

Choice. A pool spreads requests over its servers by one policy: smooth
weighted round robin (nginx), least active requests relative to weight
(ties broken by the same smooth round robin), or a ketama ring on the
request URI, where a server that is down, full or ramping passes its keys to
the next server on the ring. Backup servers take requests only while every
non-backup server is down. A server that comes back up has an effective
weight that grows linearly from ``_RAMP_FLOOR`` of its weight to all of it
over ``slow_start`` seconds (HAProxy's ``slowstart``), so a cold app is not
flooded.

Slots. With ``max_conns``, each server carries at most that many requests at
once. When every eligible server is full, a request waits in a FIFO queue of
at most ``queue`` entries for at most ``queue_timeout`` seconds; a freed slot
goes to the first waiter that can use it. ``PoolState`` decides who gets a
slot; waiting is the caller's business (a future per waiter, a timer).
"""

from __future__ import annotations

import enum
import hashlib
import math
from bisect import bisect_left
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Final, Generic, Protocol, TypeVar

from tiers.config.proxy import Balance, Pool

# Share of its weight a server gets the moment it comes back, under slow start.
_RAMP_FLOOR = 0.05
# Ring points per unit of weight (ketama uses 160 per server of weight 1).
POINTS_PER_WEIGHT = 160
_TWO_32 = float(1 << 32)


# ---- health -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Health:
    """The active-check health of one server: ``up`` plus the current streak of results."""

    up: bool = True
    successes: int = 0
    failures: int = 0


def observe_check(health: Health, ok: bool, *, fall: int, rise: int) -> Health:
    """The health after one active check that succeeded (``ok``) or failed."""
    if ok:
        successes = health.successes + 1
        up = health.up or successes >= rise
        return Health(up=up, successes=0 if up and not health.up else successes, failures=0)
    failures = health.failures + 1
    up = health.up and failures < fall
    return Health(up=up, successes=0, failures=0 if health.up and not up else failures)


def mark_unreachable(health: Health) -> Health:
    """The health of a server taken out by real traffic: down, ``rise`` good checks to return."""
    return Health(up=False, successes=0, failures=0)


class Outcome(enum.Enum):
    """What one exchange with a server says about that server's health."""

    OK = "ok"  # any answer below 500: the failure streak ends
    SERVER_ERROR = "server_error"  # a 5xx answer
    TIMEOUT = "timeout"  # silent past the read timeout
    BROKEN = "broken"  # closed, reset or garbled mid-exchange
    # Nothing learnt: the client left, a pooled connection had gone stale, or
    # the connection failed (the connect step already counted that).
    NEUTRAL = "neutral"


_OK = Outcome.OK
_NEUTRAL = Outcome.NEUTRAL


def outcome_for_status(status: int) -> Outcome:
    """The outcome of an exchange that got a response with ``status``."""
    return Outcome.SERVER_ERROR if status >= 500 else Outcome.OK


class Change(enum.Enum):
    """A server's health transition, for the caller to act on (log, drop idle connections)."""

    DOWN = "down"
    UP = "up"


class Busy(enum.Enum):
    """Every eligible server is at ``max_conns``: the request may queue."""

    BUSY = "busy"


BUSY: Final = Busy.BUSY


# ---- servers and policies ------------------------------------------------------------


class ServerState:
    """One server of a pool: health, ramp, requests in flight and counters.

    Mutated only through ``PoolState``; the policies read it.
    """

    __slots__ = (
        "active",
        "backup",
        "broken",
        "connect_errors",
        "current",
        "downs",
        "health",
        "index",
        "label",
        "last_check_at",
        "last_check_error",
        "last_check_ok",
        "passive_failures",
        "ramp_end",
        "ramp_start",
        "requests",
        "server_errors",
        "timeouts",
        "up",
        "weight",
    )

    def __init__(self, index: int, label: str, weight: int = 1, backup: bool = False) -> None:
        if weight < 1:
            raise ValueError(f"server {label}: weight must be at least 1, not {weight}")
        self.index = index
        self.label = label
        self.weight = weight
        self.backup = backup
        self.health = Health()
        self.up = True
        self.passive_failures = 0
        self.ramp_start = 0.0
        self.ramp_end = -math.inf
        self.active = 0
        self.current = 0.0  # smooth weighted round robin's running score
        self.requests = 0
        self.connect_errors = 0
        self.server_errors = 0
        self.timeouts = 0
        self.broken = 0
        self.downs = 0
        self.last_check_ok: bool | None = None
        self.last_check_at: float | None = None
        self.last_check_error = ""

    def weight_at(self, now: float) -> float:
        """The effective weight at ``now``: the full weight, or less while ramping up."""
        if now >= self.ramp_end:
            return self.weight
        return self.weight * self.ramp_fraction(now)

    def ramp_fraction(self, now: float) -> float:
        """The share of its weight the server has at ``now`` (1.0 once the ramp is over)."""
        if now >= self.ramp_end:
            return 1.0
        span = self.ramp_end - self.ramp_start
        progress = max(0.0, (now - self.ramp_start) / span)
        return _RAMP_FLOOR + (1.0 - _RAMP_FLOOR) * progress


class Policy(Protocol):
    """Chooses one server for a request, or None when no server qualifies.

    A server qualifies when it is up, in the tier in use (``backup``), not in
    ``exclude`` (already tried for this request) and, when ``limit`` is not
    0, carries fewer than ``limit`` requests.
    """

    def choose(
        self, key: bytes, exclude: Collection[int], backup: bool, limit: int, now: float
    ) -> int | None: ...


def _candidates(
    servers: Sequence[ServerState], exclude: Collection[int], backup: bool, limit: int, now: float
) -> list[tuple[ServerState, float]]:
    """The servers a request may go to now, each with its effective weight.

    A candidate is up, in the tier asked for (backups or not), not already
    tried for this request and, with a ``limit``, below it.
    """
    return [
        (s, s.weight if now >= s.ramp_end else s.weight_at(now))
        for s in servers
        if s.up
        and s.backup is backup
        and s.index not in exclude
        and not (limit and s.active >= limit)
    ]


def _smooth_pick(candidates: Sequence[tuple[ServerState, float]]) -> int | None:
    """One step of smooth weighted round robin over ``candidates``."""
    best: ServerState | None = None
    total = 0.0
    for s, weight in candidates:
        s.current += weight
        total += weight
        if best is None or s.current > best.current:
            best = s
    if best is None:
        return None
    best.current -= total
    return best.index


class SmoothWeighted:
    """nginx's smooth weighted round robin: weights 5, 1, 1 give a a b a c a a.

    Each pick adds every candidate's effective weight to its score, takes the
    highest score and lowers it by the total, which interleaves heavy and
    light servers instead of sending bursts to the heavy one.
    """

    def __init__(self, servers: Sequence[ServerState]) -> None:
        self._servers = tuple(servers)

    def choose(
        self, key: bytes, exclude: Collection[int], backup: bool, limit: int, now: float
    ) -> int | None:
        # _smooth_pick over _candidates, in one pass: this runs for every request.
        best: ServerState | None = None
        total = 0.0
        for s in self._servers:
            if (
                s.up
                and s.backup is backup
                and s.index not in exclude
                and not (limit and s.active >= limit)
            ):
                weight = s.weight if now >= s.ramp_end else s.weight_at(now)
                s.current += weight
                total += weight
                if best is None or s.current > best.current:
                    best = s
        if best is None:
            return None
        best.current -= total
        return best.index


class LeastConnections:
    """Fewest requests in flight relative to effective weight (nginx's least_conn).

    Servers tied on that ratio share by smooth weighted round robin, so an
    idle pool still spreads requests by weight and a ramping server still
    gets its small share.
    """

    def __init__(self, servers: Sequence[ServerState]) -> None:
        self._servers = tuple(servers)

    def choose(
        self, key: bytes, exclude: Collection[int], backup: bool, limit: int, now: float
    ) -> int | None:
        candidates = _candidates(self._servers, exclude, backup, limit, now)
        if not candidates:
            return None
        least, least_weight = candidates[0]
        for s, weight in candidates:
            # active / weight < least.active / least_weight, without dividing.
            if s.active * least_weight < least.active * weight:
                least, least_weight = s, weight
        least_active = least.active
        tied = [(s, w) for s, w in candidates if s.active * least_weight == least_active * w]
        return _smooth_pick(tied)


class ConsistentHash:
    """A ketama ring on the request key: adding or removing one of N servers moves ~1/N keys.

    Each server owns ``points_per_weight * weight`` points, placed by md5 of
    its address, so the ring depends on the servers and not on their order.
    A key goes to the server owning the first point at or after the key's
    hash; a server that does not qualify passes the key to the next server on
    the ring, and gets it back once it qualifies again. While a server ramps
    up after slow start, it keeps the keys whose second hash falls below its
    ramp fraction: the same keys for the same fraction, more as it grows
    (and any key that no other server can take).
    """

    def __init__(
        self, servers: Sequence[ServerState], points_per_weight: int = POINTS_PER_WEIGHT
    ) -> None:
        ring: list[tuple[int, str, int]] = []
        for s in servers:
            count = points_per_weight * s.weight
            for block in range((count + 3) // 4):
                digest = hashlib.md5(f"{s.label}-{block}".encode(), usedforsecurity=False).digest()
                for k in range(min(4, count - 4 * block)):
                    point = int.from_bytes(digest[4 * k : 4 * k + 4], "little")
                    ring.append((point, s.label, s.index))
        ring.sort()
        by_index = {s.index: s for s in servers}
        self._points = [point for point, _, _ in ring]
        self._owners = [by_index[index] for _, _, index in ring]
        self._count = len(servers)

    def choose(
        self, key: bytes, exclude: Collection[int], backup: bool, limit: int, now: float
    ) -> int | None:
        points = self._points
        size = len(points)
        if not size:
            return None
        owners = self._owners
        digest = hashlib.md5(key, usedforsecurity=False).digest()
        position = bisect_left(points, int.from_bytes(digest[:4], "little"))
        rejected = 0  # bit set of servers already ruled out for this key
        left = self._count
        # A ramping server that declined the key, should nobody else take it.
        fallback: int | None = None
        for _ in range(size):
            if position == size:
                position = 0
            s = owners[position]
            position += 1
            bit = 1 << s.index
            if rejected & bit:
                continue
            if (
                s.up
                and s.backup is backup
                and s.index not in exclude
                and not (limit and s.active >= limit)
            ):
                if now >= s.ramp_end:
                    return s.index
                if int.from_bytes(digest[4:8], "little") < s.ramp_fraction(now) * _TWO_32:
                    return s.index
                if fallback is None:
                    fallback = s.index
            rejected |= bit
            left -= 1
            if not left:
                break
        return fallback


def make_policy(balance: Balance, servers: Sequence[ServerState]) -> Policy:
    """The policy object for ``balance`` over ``servers``."""
    if balance is Balance.LEAST_CONN:
        return LeastConnections(servers)
    if balance is Balance.URI_HASH:
        return ConsistentHash(servers)
    return SmoothWeighted(servers)


# ---- the pool --------------------------------------------------------------------------


T = TypeVar("T")


class _Waiter(Generic[T]):
    __slots__ = ("deadline", "exclude", "key", "ticket")

    def __init__(self, ticket: T, key: bytes, exclude: Collection[int], deadline: float) -> None:
        self.ticket = ticket
        self.key = key
        self.exclude = exclude
        self.deadline = deadline


@dataclass(frozen=True, slots=True)
class ServerStats:
    """One server as the admin page and metrics show it."""

    address: str
    # "up", "down", "slow_start" (up, weight still ramping) or "backup"
    # (a backup server that is up and standing by while primaries serve).
    state: str
    backup: bool
    weight: int
    effective_weight: float
    active: int  # requests in flight
    requests: int  # requests sent to it, ever
    connect_errors: int
    server_errors: int  # 5xx answers
    timeouts: int
    broken: int  # exchanges cut or garbled
    downs: int  # times it was taken out
    last_check_ok: bool | None  # None: not checked yet
    last_check_at: float | None
    last_check_error: str


@dataclass(frozen=True, slots=True)
class PoolStats:
    """One pool as the admin page and metrics show it."""

    name: str
    balance: str
    queued: int  # requests waiting for a slot now
    queue_limit: int
    queue_full: int  # requests refused at once: the queue was full
    queue_timeouts: int  # requests that waited ``queue_timeout`` in vain
    servers: tuple[ServerStats, ...]


class PoolState(Generic[T]):
    """A pool's servers, health, slots and queue; decides without doing I/O.

    ``T`` is whatever the caller uses to wake a waiting request (a future).
    Contract: after ``finish``, ``release``, ``check`` or ``connect_failed``,
    a caller with ``queued`` waiters calls ``dispatch`` and acts on what it
    returns, so that a free slot never sits idle while someone waits for it.
    """

    def __init__(self, pool: Pool, *, fall: int, rise: int) -> None:
        if not pool.servers:
            raise ValueError(f"pool {pool.name}: at least one server is needed")
        self.name = pool.name
        self.balance = pool.balance
        self.servers = [
            ServerState(i, str(s.address), s.weight, s.backup) for i, s in enumerate(pool.servers)
        ]
        self.slow_start = pool.slow_start
        self.max_conns = pool.max_conns
        self.queue_limit = pool.queue
        self.queue_timeout = pool.queue_timeout
        # 0 turns passive health off.
        self.passive_fall = pool.passive_fall
        self.fall = fall
        self.rise = rise
        self.queue_full = 0
        self.queue_timeouts = 0
        self._policy = make_policy(pool.balance, self.servers)
        self._primaries_up = sum(1 for s in self.servers if not s.backup)
        self._queue: deque[_Waiter[T]] = deque()

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ---- choosing ------------------------------------------------------------

    def choose(self, key: bytes, exclude: Collection[int], now: float) -> int | None:
        """A server for a request, without taking a slot (for callers that do not count).

        Ignores ``max_conns``; None when no server is up in the tier in use
        or every one is in ``exclude``.
        """
        index = self._policy.choose(key, exclude, self._primaries_up == 0, 0, now)
        if index is not None:
            self.servers[index].requests += 1
        return index

    def acquire(self, key: bytes, exclude: Collection[int], now: float) -> int | Busy | None:
        """Take a slot on a server for a request: its index, ``BUSY`` or None.

        ``BUSY``: some server would qualify but all of them are at
        ``max_conns`` (the request may ``enqueue``). None: no server is up in
        the tier in use, or every one is in ``exclude``. A returned index
        holds a slot until ``finish`` or ``release``.
        """
        backup = self._primaries_up == 0
        limit = self.max_conns
        index = self._policy.choose(key, exclude, backup, limit, now)
        if index is not None:
            server = self.servers[index]
            server.active += 1
            server.requests += 1
            return index
        if limit and self._any_candidate(exclude, backup):
            return BUSY
        return None

    def _any_candidate(self, exclude: Collection[int], backup: bool) -> bool:
        return any(s.up and s.backup is backup and s.index not in exclude for s in self.servers)

    # ---- the queue -----------------------------------------------------------

    def enqueue(self, ticket: T, key: bytes, exclude: Collection[int], now: float) -> bool:
        """Queue a request that got ``BUSY``; False (counted) when the queue is full.

        The request waits until ``now + queue_timeout``; ``exclude`` is kept
        by reference and must not change while it waits.
        """
        if len(self._queue) >= self.queue_limit:
            self.queue_full += 1
            return False
        self._queue.append(_Waiter(ticket, key, exclude, now + self.queue_timeout))
        return True

    def withdraw(self, ticket: T, *, timed_out: bool = False) -> bool:
        """Remove a waiting request (it gave up, or its timer ran out); False if not queued."""
        queue = self._queue
        for position, waiter in enumerate(queue):
            if waiter.ticket is ticket:
                del queue[position]
                if timed_out:
                    self.queue_timeouts += 1
                return True
        return False

    def dispatch(self, now: float) -> list[tuple[T, int | None]]:
        """Hand free slots to waiting requests, first come first served.

        Returns ``(ticket, index)`` for each request that got a slot on
        server ``index`` (held until ``finish``), and ``(ticket, None)`` for
        each whose deadline passed (it must fail). A waiter that can use no
        free slot (its servers are excluded, down or full) keeps its place.
        """
        queue = self._queue
        out: list[tuple[T, int | None]] = []
        # Deadlines grow along the queue, so the expired ones are its head.
        while queue and queue[0].deadline <= now:
            out.append((queue.popleft().ticket, None))
            self.queue_timeouts += 1
        backup = self._primaries_up == 0
        limit = self.max_conns
        choose = self._policy.choose
        skipped: list[_Waiter[T]] = []
        for _ in range(len(queue)):
            waiter = queue.popleft()
            index = choose(waiter.key, waiter.exclude, backup, limit, now)
            if index is None:
                skipped.append(waiter)
                if not waiter.exclude:
                    # Nothing is free for anyone: those behind cannot do better.
                    break
                continue
            server = self.servers[index]
            server.active += 1
            server.requests += 1
            out.append((waiter.ticket, index))
        if skipped:
            queue.extendleft(reversed(skipped))
        return out

    def clear_queue(self) -> list[T]:
        """Remove and return every waiting request (the pool is closing)."""
        tickets = [waiter.ticket for waiter in self._queue]
        self._queue.clear()
        return tickets

    # ---- results ---------------------------------------------------------------

    def release(self, index: int) -> None:
        """Free the slot a request held on server ``index``, learning nothing from it."""
        server = self.servers[index]
        if server.active > 0:
            server.active -= 1

    def finish(self, index: int, outcome: Outcome, now: float) -> Change | None:
        """Free the request's slot on server ``index`` and ``report`` its outcome."""
        self.release(index)
        return self.report(index, outcome, now)

    def report(self, index: int, outcome: Outcome, now: float) -> Change | None:
        """Count an exchange's outcome; ``Change.DOWN`` when it ends a passive-fall streak."""
        server = self.servers[index]
        if outcome is _OK:
            server.passive_failures = 0
            return None
        if outcome is _NEUTRAL:
            return None
        if outcome is Outcome.SERVER_ERROR:
            server.server_errors += 1
        elif outcome is Outcome.TIMEOUT:
            server.timeouts += 1
        else:
            server.broken += 1
        return self._passive_failure(server)

    def connect_failed(self, index: int, now: float) -> Change | None:
        """Count a failed connection to server ``index``; it counts toward passive fall."""
        server = self.servers[index]
        server.connect_errors += 1
        return self._passive_failure(server)

    def check(self, index: int, ok: bool, now: float, error: str = "") -> Change | None:
        """Apply one active check's result to server ``index``; the transition, if any."""
        server = self.servers[index]
        server.last_check_ok = ok
        server.last_check_at = now
        server.last_check_error = error
        health = observe_check(server.health, ok, fall=self.fall, rise=self.rise)
        if server.up and not health.up:
            return self._take_out(server, health)
        server.health = health
        if health.up and not server.up:
            return self._bring_back(server, now)
        return None

    def _passive_failure(self, server: ServerState) -> Change | None:
        server.passive_failures += 1
        fall = self.passive_fall
        if server.up and fall and server.passive_failures >= fall:
            return self._take_out(server, mark_unreachable(server.health))
        return None

    def _take_out(self, server: ServerState, health: Health) -> Change:
        server.health = health
        server.up = False
        server.downs += 1
        server.ramp_end = -math.inf
        if not server.backup:
            self._primaries_up -= 1
        return Change.DOWN

    def _bring_back(self, server: ServerState, now: float) -> Change:
        server.up = True
        server.passive_failures = 0
        # Scores earned before it went down would give it a burst now.
        server.current = 0.0
        if self.slow_start > 0:
            server.ramp_start = now
            server.ramp_end = now + self.slow_start
        if not server.backup:
            self._primaries_up += 1
        return Change.UP

    # ---- reporting -------------------------------------------------------------

    def weight_at(self, index: int, now: float) -> float:
        """Server ``index``'s effective weight at ``now`` (less than its weight while ramping)."""
        return self.servers[index].weight_at(now)

    def snapshot(self, now: float, wall: float | None = None) -> PoolStats:
        """The pool as plain data; check times move to the ``wall`` clock when it is given.

        ``wall`` is the wall-clock reading at ``now``; without it, times stay
        on the caller's clock.
        """
        shift = 0.0 if wall is None else wall - now
        using_backups = self._primaries_up == 0
        servers = []
        for s in self.servers:
            if not s.up:
                state = "down"
            elif s.backup and not using_backups:
                state = "backup"
            elif now < s.ramp_end:
                state = "slow_start"
            else:
                state = "up"
            servers.append(
                ServerStats(
                    address=s.label,
                    state=state,
                    backup=s.backup,
                    weight=s.weight,
                    effective_weight=s.weight_at(now) if s.up else 0.0,
                    active=s.active,
                    requests=s.requests,
                    connect_errors=s.connect_errors,
                    server_errors=s.server_errors,
                    timeouts=s.timeouts,
                    broken=s.broken,
                    downs=s.downs,
                    last_check_ok=s.last_check_ok,
                    last_check_at=None if s.last_check_at is None else s.last_check_at + shift,
                    last_check_error=s.last_check_error,
                )
            )
        return PoolStats(
            name=self.name,
            balance=self.balance.value,
            queued=len(self._queue),
            queue_limit=self.queue_limit,
            queue_full=self.queue_full,
            queue_timeouts=self.queue_timeouts,
            servers=tuple(servers),
        )


# ---- idle connections ------------------------------------------------------------------


class Idle(Protocol):
    """What the pool needs to know of an idle connection."""

    @property
    def usable(self) -> bool: ...

    @property
    def idle_since(self) -> float: ...


C = TypeVar("C", bound=Idle)


class IdlePool(Generic[C]):
    """Idle keep-alive connections to one backend, most recently used first.

    Reusing the newest connection keeps the others idle long enough to
    expire, so the pool shrinks back after a burst. A connection idle longer
    than ``max_idle_time`` may be about to be closed by the backend, and one
    the backend already closed is not ``usable``: both are handed back to the
    caller to close rather than reused.
    """

    def __init__(self, max_idle: int, max_idle_time: float) -> None:
        self.max_idle = max_idle
        self.max_idle_time = max_idle_time
        self._idle: list[C] = []

    def __len__(self) -> int:
        return len(self._idle)

    def take(self, now: float) -> tuple[C | None, list[C]]:
        """A reusable connection or None, and the connections to close."""
        discard: list[C] = []
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.usable and now - conn.idle_since <= self.max_idle_time:
                return conn, discard
            discard.append(conn)
        return None, discard

    def put(self, conn: C) -> list[C]:
        """Keep ``conn`` for reuse; return the connections to close to respect ``max_idle``."""
        self._idle.append(conn)
        excess = len(self._idle) - self.max_idle
        if excess <= 0:
            return []
        oldest = self._idle[:excess]
        del self._idle[:excess]
        return oldest

    def sweep(self, now: float) -> list[C]:
        """Remove and return the connections that expired or were closed while idle."""
        keep: list[C] = []
        discard: list[C] = []
        for conn in self._idle:
            if conn.usable and now - conn.idle_since <= self.max_idle_time:
                keep.append(conn)
            else:
                discard.append(conn)
        self._idle = keep
        return discard

    def drain(self) -> list[C]:
        """Remove and return every idle connection."""
        idle, self._idle = self._idle, []
        return idle
