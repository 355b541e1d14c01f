"""A pool's servers, slots and wait queue, as decisions without I/O.

``PoolState`` counts the requests each server carries, applies the health
rules of ``tiers.proxy.balancer`` to the results it is told, asks the pool's
policy for a server, and reports the pool as plain data (``PoolStats``).
Nothing here does I/O or reads a clock; ``tiers.proxy.upstream`` does the
sockets, futures and timers, and acts on what is returned.

Slots. With ``max_conns``, each server carries at most that many requests at
once. When every eligible server is full, a request waits in a FIFO queue of
at most ``queue`` entries for at most ``queue_timeout`` seconds; a freed slot
goes to the first waiter that can use it. ``PoolState`` decides who gets a
slot; waiting is the caller's business (a future per waiter, a timer).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from tiers.config.proxy import Pool
from tiers.proxy.balancer import (
    BUSY,
    Busy,
    Change,
    Health,
    Outcome,
    ServerState,
    make_policy,
    mark_unreachable,
    observe_check,
)

__all__ = ["PoolState", "PoolStats", "ServerStats"]

_OK: Final = Outcome.OK
_NEUTRAL: Final = Outcome.NEUTRAL

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

