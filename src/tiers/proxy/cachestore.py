"""The page cache's store: entries under a memory budget, variants per URL, purge.

``Store`` keeps the answers that ``tiers.proxy.cachepolicy`` admits, each
with its head pre-rendered, and evicts the least recently used when the
memory budget is spent. A URL holds several variants when its answers
``Vary``; ``lookup`` picks the one a request selects and judges it at the
time passed in: ``Hit`` (fresh), ``Stale`` (usable only in a stale window,
or to be reloaded) or ``MISS``. Sans-I/O like the rules: no clock, no
socket; one event loop owns a store (``tiers.proxy.cache``). The store
refuses what does not fit instead of raising.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from tiers.proxy.cachepolicy import Freshness, Headers, RequestRules, vary_matches
from tiers.proxy.forward import HOP_BY_HOP
from tiers.proxy.httpdate import parse_http_date

__all__ = [
    "MISS",
    "NOT_MODIFIED_FIELDS",
    "CacheStats",
    "Entry",
    "Hit",
    "Miss",
    "Stale",
    "Store",
]

# Fields not stored: framing is redone on every answer, Age and X-Cache are the cache's own.
_STORE_DROP: Final = HOP_BY_HOP | {b"content-length", b"transfer-encoding", b"age", b"x-cache"}
# What a 304 made from an entry repeats (RFC 9110 15.4.5).
NOT_MODIFIED_FIELDS: Final = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary"}
)
_MAX_VARIANTS: Final = 16


@dataclass(slots=True, eq=False)
class Entry:
    """One stored answer: its head pre-rendered, its body, its freshness.

    ``fields`` are the stored end-to-end header lines, ``fields_304`` the
    subset a 304 repeats. ``live`` turns false when the entry leaves the
    store (evicted, expired, replaced, purged). ``serial`` grows with every
    entry stored.
    """

    key: bytes
    status: int
    status_line: bytes
    fields: bytes
    fields_304: bytes
    body: bytes
    freshness: Freshness
    etag: bytes | None
    last_modified: float | None
    size: int
    serial: int
    live: bool = True


class Hit:
    """A fresh entry: serve it.

    Plain classes here (not dataclasses): one is made per cached request, and
    in the compiled build a dataclass's generated ``__init__`` stays interpreted.
    """

    __slots__ = ("age", "entry")

    def __init__(self, entry: Entry, age: float) -> None:
        self.entry = entry
        self.age = age


class Stale:
    """An entry that may not be served as it is (stale, or the client asked for newer).

    ``background``: inside stale-while-revalidate and the client set no
    limits, so serve it now and refresh it behind the scenes.
    ``on_error``: it may stand in for the app's answer if the fetch fails.
    """

    __slots__ = ("age", "background", "entry", "on_error")

    def __init__(self, entry: Entry, age: float, background: bool, on_error: bool) -> None:
        self.entry = entry
        self.age = age
        self.background = background
        self.on_error = on_error


class Miss:
    """Nothing stored is usable for this request."""

    __slots__ = ()


MISS: Final = Miss()


@dataclass(slots=True)
class CacheStats:
    """Counters for metrics; served outcomes are counted by ``PageCache``, per request."""

    hits: int = 0  # served fresh from the store (coalesced waiters included)
    misses: int = 0  # went to the app
    stale: int = 0  # served stale (while revalidating, or on error)
    coalesced: int = 0  # hits that waited for another request's fetch
    stores: int = 0
    evictions: int = 0  # entries dropped for the memory budget
    refreshes: int = 0  # background refreshes started


class Store:
    """Entries under a memory budget of ``memory`` bytes, least recently used out first.

    The size of an entry is its key, rendered head and body. Entries larger
    than ``max_object`` are refused. A URL holds at most 16 variants (the
    oldest goes first). Not thread-safe; one event loop owns it.
    """

    def __init__(self, memory: int, max_object: int) -> None:
        self.memory = max(0, memory)
        self.max_object = min(max_object, self.memory)
        self.bytes = 0
        self.stats = CacheStats()
        self.serial = 0
        self._variants: dict[bytes, list[Entry]] = {}
        self._lru: OrderedDict[Entry, None] = OrderedDict()

    @property
    def entries(self) -> int:
        return len(self._lru)

    def holds(self, key: bytes) -> bool:
        """Some variant of ``key`` is stored (fresh or not)."""
        return key in self._variants

    def lookup(
        self, rules: RequestRules, now: float, *, reload: bool | None = None
    ) -> Hit | Stale | Miss:
        """The stored variant that ``rules`` selects, judged at ``now``.

        ``reload`` overrides ``rules.reload``. An entry past every window
        is removed and MISS returned; a Stale that can be neither served
        nor kept for errors is also a MISS (the entry stays for others).
        """
        variants = self._variants.get(rules.key)
        if variants is None:
            return MISS
        entry: Entry | None = None
        # The newest variant first (RFC 9111 4.1: the most recent one wins).
        for candidate in reversed(variants):
            vary = candidate.freshness.vary
            if not vary or vary_matches(vary, rules.headers):
                entry = candidate
                break
        if entry is None:
            return MISS
        freshness = entry.freshness
        age = freshness.age(now)
        lifetime = freshness.lifetime
        if age >= freshness.usable_for:
            self._remove(entry)
            return MISS
        self._lru.move_to_end(entry)
        on_error = age < lifetime + freshness.stale_if_error
        if reload if reload is not None else rules.reload:
            return Stale(entry, age, False, on_error)
        left = lifetime - age
        unlimited = rules.max_age is None and rules.min_fresh == 0.0
        if left > 0 and (
            unlimited
            or ((rules.max_age is None or age <= rules.max_age) and left >= rules.min_fresh)
        ):
            return Hit(entry, age)
        background = unlimited and left <= 0 and age < lifetime + freshness.stale_while_revalidate
        if not background and not on_error:
            return MISS
        return Stale(entry, age, background, on_error)

    def store(
        self,
        rules: RequestRules,
        freshness: Freshness,
        *,
        status: int,
        reason: bytes,
        headers: Headers,
        body: bytes,
        connection: frozenset[bytes] = frozenset(),
    ) -> Entry | None:
        """Keep an answer to ``rules``; None when it is larger than ``max_object``.

        It replaces the stored variants the same request would have
        selected. ``connection`` names further hop-by-hop fields to drop.
        """
        lines: list[bytes] = []
        lines_304: list[bytes] = []
        etag: bytes | None = None
        last_modified: bytes | None = None
        for name, value in headers:
            lname = name.lower()
            if lname in _STORE_DROP or lname in connection:
                continue
            line = b"%s: %s\r\n" % (name, value)
            lines.append(line)
            if lname in NOT_MODIFIED_FIELDS:
                lines_304.append(line)
            if lname == b"etag":
                etag = etag or value
            elif lname == b"last-modified":
                last_modified = last_modified or value
        status_line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        fields = b"".join(lines)
        fields_304 = b"".join(lines_304)
        key = rules.key
        size = len(key) + len(status_line) + len(fields) + len(fields_304) + len(body)
        if size > self.max_object:
            return None
        variants = self._variants.get(key)
        if variants is not None:
            for old in [e for e in variants if vary_matches(e.freshness.vary, rules.headers)]:
                self._remove(old)
            variants = self._variants.get(key)
            if variants is not None and len(variants) >= _MAX_VARIANTS:
                self._remove(variants[0])
        lru = self._lru
        while lru and self.bytes + size > self.memory:
            self._remove(next(iter(lru)))
            self.stats.evictions += 1
        self.serial += 1
        entry = Entry(
            key,
            status,
            status_line,
            fields,
            fields_304,
            body,
            freshness,
            etag,
            parse_http_date(last_modified) if last_modified is not None else None,
            size,
            self.serial,
        )
        self._variants.setdefault(key, []).append(entry)
        lru[entry] = None
        self.bytes += size
        self.stats.stores += 1
        return entry

    def purge(self, key: bytes, *, prefix: bool = False) -> int:
        """Remove every variant stored under ``key`` (or under keys starting with it).

        Returns the number of entries removed.
        """
        if prefix:
            keys = [k for k in self._variants if k.startswith(key)]
        else:
            keys = [key] if key in self._variants else []
        removed = 0
        for k in keys:
            for entry in list(self._variants.get(k, ())):
                self._remove(entry)
                removed += 1
        return removed

    def _remove(self, entry: Entry) -> None:
        entry.live = False
        del self._lru[entry]
        self.bytes -= entry.size
        variants = self._variants[entry.key]
        variants.remove(entry)
        if not variants:
            del self._variants[entry.key]
