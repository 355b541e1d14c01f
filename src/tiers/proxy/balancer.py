"""Decisions about a pool's servers, as plain values and functions: health and choice.

Nothing here does I/O or reads a clock; callers pass ``now`` in and carry
out what is returned. ``tiers.proxy.poolstate`` applies these rules to a
pool (slots, wait queue, counters) and ``tiers.proxy.upstream`` does the
sockets and timers.

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
"""

from __future__ import annotations

import enum
import hashlib
import math
from abc import ABC, abstractmethod
from bisect import bisect_left
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Final

from tiers.config.proxy import Balance

# Share of its weight a server gets the moment it comes back, under slow start.
_RAMP_FLOOR: Final = 0.05
# Ring points per unit of weight (ketama uses 160 per server of weight 1).
POINTS_PER_WEIGHT: Final = 160
_TWO_32: Final = float(1 << 32)


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


class Policy(ABC):
    """Chooses one server for a request, or None when no server qualifies.

    A server qualifies when it is up, in the tier in use (``backup``), not in
    ``exclude`` (already tried for this request) and, when ``limit`` is not
    0, carries fewer than ``limit`` requests.

    An abstract base class rather than a protocol: the compiled build then
    calls ``choose`` through a native method table, without boxing its
    arguments.
    """

    @abstractmethod
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


class SmoothWeighted(Policy):
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


class LeastConnections(Policy):
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


class ConsistentHash(Policy):
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
