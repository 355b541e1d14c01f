"""Stampede protection: one caller recomputes an expired value while the others wait or go on.

``get_or_compute(cache, key, compute, ttl)`` returns the cached value of
``key`` or computes, stores and returns it, so that many callers (threads,
processes, hosts) missing the same key at once call ``compute`` once:

1. A fresh value is returned as it is, except that XFetch may pick this
   caller to recompute it early (below).
2. Otherwise the caller tries to take the lease: memcached ``add`` of
   ``f"{key}:lease"`` with ``lease_ttl`` seconds, which exactly one caller
   wins. The winner reads the key once more (a caller that read before the
   previous winner stored its value must not compute it again), then
   computes, stores the value and deletes the lease.
3. A loser that holds a stale value (expired, or fresh and picked early)
   returns it at once: someone is already refreshing it.
4. A loser with nothing to return polls every ``poll`` seconds for up to
   ``wait`` seconds and returns the winner's value when it appears. If the
   lease disappears without a value (the winner's ``compute`` raised), it
   tries to take the lease itself. When the wait runs out it computes the
   value itself and stores it: a slow or dead winner delays callers by
   ``wait`` at most and never fails them.

If taking the lease fails because the node cannot be reached, the caller
computes without one (nothing can be shared through a dead node anyway).
Exceptions from ``compute`` reach the caller that called it; the lease is
released first.

Stored values are envelopes: ``MAGIC``, the time ``compute`` took
(``delta``), the logical expiry (Unix time, ``clock``) and the encoded
value. memcached keeps the item ``stale_ttl`` seconds past that expiry
(default: ``ttl`` again), which is what lets losers serve a stale value. A
value that is not an envelope (written by other code) is treated as absent.

XFetch (Vattani, Chierichetti, Lowenstein: "Optimal Probabilistic Cache
Stampede Prevention", VLDB 2015): a caller reading a fresh value recomputes
early when ``now - delta * beta * ln(rand()) >= expiry``, rand in (0, 1].
``beta`` = 1 is the paper's optimum; above 1 favours earlier recomputation,
0 turns it off. Slow computations are refreshed earlier, so the value rarely
expires under load at all.

The lease key must fit memcached's 250-byte limit with its ``:lease``
suffix, and ``lease_ttl`` should exceed the time ``compute`` takes (a lease
that expires mid-computation lets a second caller start). Everything here
is safe to call from many threads at once; state lives in the cache.
"""

from __future__ import annotations

import enum
import json
import math
import random
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, overload

from tiers.cache.errors import CacheError

T = TypeVar("T")

MAGIC = b"TXF\x01"
_HEADER = struct.Struct("<4sdd")
LEASE_SUFFIX = ":lease"


class LeaseStore(Protocol):
    """The part of a cache that stampede protection uses (``CacheCluster`` fits)."""

    def get_many(self, keys: Iterable[str]) -> Mapping[str, object]: ...

    def set(self, key: str, value: object, ttl: int = 0) -> bool: ...

    def add(self, key: str, value: object, ttl: int = 0, *, confirm: bool = False) -> bool: ...

    def delete(self, key: str) -> bool: ...


class ValueCodec(Protocol[T]):
    """Turns computed values into the bytes an envelope carries, and back."""

    def dumps(self, value: T) -> bytes: ...

    def loads(self, data: bytes) -> T: ...


class BytesCodec:
    """Values that are bytes already."""

    def dumps(self, value: bytes) -> bytes:
        return bytes(value)

    def loads(self, data: bytes) -> bytes:
        return data


class JsonCodec:
    """Values JSON can carry (dicts, lists, strings, numbers, booleans, None)."""

    def dumps(self, value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


BYTES: BytesCodec = BytesCodec()
JSON: JsonCodec = JsonCodec()


@dataclass(frozen=True, slots=True)
class Envelope(Generic[T]):
    """A stored value with what XFetch needs: compute time and logical expiry."""

    value: T
    delta: float  # seconds compute took
    expiry: float  # Unix time the value stops being fresh (inf: never)


def pack(value: bytes, delta: float, expiry: float) -> bytes:
    """The stored form of an envelope."""
    return _HEADER.pack(MAGIC, delta, expiry) + value


def unpack(data: object) -> Envelope[bytes] | None:
    """The envelope stored as ``data``, or None when ``data`` is not one."""
    if not isinstance(data, bytes) or len(data) < _HEADER.size or not data.startswith(MAGIC):
        return None
    _, delta, expiry = _HEADER.unpack_from(data)
    return Envelope(data[_HEADER.size :], delta, expiry)


def should_recompute(
    now: float, delta: float, expiry: float, beta: float, rng: random.Random
) -> bool:
    """XFetch's test: expired, or picked to recompute early (see the module notes)."""
    if now >= expiry:
        return True
    if beta <= 0 or delta <= 0:
        return False
    draw = 1.0 - rng.random()  # (0, 1]: log(0) is undefined
    return now - delta * beta * math.log(draw) >= expiry


_rng_local = threading.local()


def _thread_rng() -> random.Random:
    # One generator per thread: random.Random is not meant to be shared under contention.
    rng: random.Random | None = getattr(_rng_local, "rng", None)
    if rng is None:
        rng = _rng_local.rng = random.Random()
    return rng


@overload
def get_or_compute(
    cache: LeaseStore,
    key: str,
    compute: Callable[[], bytes],
    ttl: int,
    *,
    codec: None = None,
    lease_ttl: int = 5,
    wait: float = 2.0,
    poll: float = 0.02,
    beta: float = 1.0,
    stale_ttl: int | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> bytes: ...


@overload
def get_or_compute(
    cache: LeaseStore,
    key: str,
    compute: Callable[[], T],
    ttl: int,
    *,
    codec: ValueCodec[T],
    lease_ttl: int = 5,
    wait: float = 2.0,
    poll: float = 0.02,
    beta: float = 1.0,
    stale_ttl: int | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T: ...


def get_or_compute(
    cache: LeaseStore,
    key: str,
    compute: Callable[[], Any],
    ttl: int,
    *,
    codec: ValueCodec[Any] | None = None,
    lease_ttl: int = 5,
    wait: float = 2.0,
    poll: float = 0.02,
    beta: float = 1.0,
    stale_ttl: int | None = None,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> Any:
    """The value of ``key``, computed by one caller at a time when missing or expired.

    ``ttl`` is how long a value stays fresh (seconds, 0: forever);
    ``codec`` turns values into bytes (default: ``compute`` returns bytes).
    See the module notes for the lease, the waiting and XFetch.
    """
    if ttl < 0 or lease_ttl < 1 or wait < 0 or poll <= 0:
        raise ValueError("ttl must be >= 0, lease_ttl >= 1, wait >= 0 and poll > 0")
    job = _Job(
        cache=cache,
        key=key,
        compute=compute,
        ttl=ttl,
        codec=codec or BYTES,
        lease_ttl=lease_ttl,
        stale_ttl=ttl if stale_ttl is None else stale_ttl,
        clock=clock,
    )
    now = clock()
    current = unpack(cache.get_many([key]).get(key))
    if current is not None and not should_recompute(
        now, current.delta, current.expiry, beta, rng or _thread_rng()
    ):
        return job.codec.loads(current.value)
    lease = job.take_lease()
    if lease is not _Lease.LOST:
        return job.run(lease, current)
    if current is not None:
        return job.codec.loads(current.value)  # stale, or fresh and picked early
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        sleep(poll)
        found = cache.get_many([key, job.lease_key])
        fresh = unpack(found.get(key))
        if fresh is not None and clock() < fresh.expiry:
            return job.codec.loads(fresh.value)
        if job.lease_key not in found:
            # The two keys may live on two nodes, read at slightly different moments:
            # the value may have been stored just after its node was read.
            lease = job.take_lease()
            if lease is not _Lease.LOST:
                return job.run(lease, None)
    return job.compute_and_store(_Lease.NONE)


class _Lease(enum.Enum):
    WON = "won"
    LOST = "lost"
    NONE = "none"  # computing without a lease (its node is down, or the wait ran out)


@dataclass(slots=True, kw_only=True)
class _Job:
    """One call's parameters and lease token."""

    cache: LeaseStore
    key: str
    compute: Callable[[], Any]
    ttl: int
    codec: ValueCodec[Any]
    lease_ttl: int
    stale_ttl: int
    clock: Callable[[], float]
    lease_key: str = ""
    token: bytes = b""

    def __post_init__(self) -> None:
        self.lease_key = self.key + LEASE_SUFFIX
        self.token = uuid.uuid4().hex.encode()

    def take_lease(self) -> _Lease:
        try:
            won = self.cache.add(self.lease_key, self.token, self.lease_ttl, confirm=True)
        except CacheError:
            return _Lease.NONE
        return _Lease.WON if won else _Lease.LOST

    def run(self, lease: _Lease, seen: Envelope[bytes] | None) -> Any:
        """Compute and store, unless a fresh value newer than ``seen`` came in meanwhile."""
        if lease is _Lease.WON:
            newer = self.refreshed_since(seen)
            if newer is not None:
                return self.codec.loads(newer.value)
        return self.compute_and_store(lease)

    def refreshed_since(self, seen: Envelope[bytes] | None) -> Envelope[bytes] | None:
        """A fresh value stored after ``seen`` was read (the lease is released), else None."""
        latest = unpack(self.cache.get_many([self.key]).get(self.key))
        if latest is None or self.clock() >= latest.expiry:
            return None
        if seen is not None and latest.expiry <= seen.expiry:
            return None  # the very value that was read, picked for early recomputation
        self.cache.delete(self.lease_key)
        return latest

    def compute_and_store(self, lease: _Lease) -> Any:
        try:
            started = self.clock()
            value = self.compute()
            finished = self.clock()
            data = self.codec.dumps(value)
            delta = max(0.0, finished - started)
            expiry = finished + self.ttl if self.ttl else math.inf
            stored_ttl = self.ttl + self.stale_ttl if self.ttl else 0
            self.cache.set(self.key, pack(data, delta, expiry), stored_ttl)
        finally:
            if lease is _Lease.WON:
                self.cache.delete(self.lease_key)
        return value
