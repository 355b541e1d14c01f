"""An in-memory Store with a primary and one lagging replica, for tests of the pages.

Every write gets the next LSN as its causal token and records it in the
request's causal scope, as tiers' router does. There is one log for every
table, as on one cluster, so every token is kept under ``main`` even when
the shard map spreads the stars over several cluster names. Reads follow the router's
rule with the scope's token: a read whose token the replica has not
reached sees the primary (everything); any other read sees only what the
replica has replayed (``replica_position``, which tests advance with
``catch_up``). A page that loses the reader's token therefore shows stale
data here, as it would with a real lagging replica.

Stars are placed by a :class:`tiers.db.sharding.ShardMap` (by default every
virtual shard on ``main``), with ids from a :class:`tiers.db.ids.IdGenerator`
carrying the user's shard; copying stars between users on different
clusters raises CrossShardError as the SQL store does. ``stars_by_cluster``
shows where each star went.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from bookmarks.forms import NewBookmark
from bookmarks.store import (
    BOOKMARKS_LIMIT,
    HOT_LIMIT,
    RECENT_LIMIT,
    STARS_LIMIT,
    Bookmark,
    Copied,
    Entry,
    EntryPage,
    FrontPage,
    Saved,
    Star,
    Starred,
    StarsPage,
)
from tiers.db.ids import IdGenerator
from tiers.db.postgres import format_lsn, parse_lsn
from tiers.db.sharding import DEFAULT_VIRTUAL_SHARDS, ShardMap
from tiers.db.tokens import current_token, note_write

HOT_WINDOW = timedelta(hours=24)


@dataclass
class _EntryRow:
    id: int
    url: str
    title: str
    created_at: datetime
    lsn: int


@dataclass
class _BookmarkRow:
    entry_id: int
    user: str
    created_at: datetime
    # (lsn, comment) for each save, oldest first: a snapshot takes the last it has replayed.
    versions: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class _StarRow:
    id: int
    user: str
    entry_id: int
    created_at: datetime
    lsn: int


class MemoryStore:
    """A Store in memory; ``read_tokens`` records the token of every read and
    ``hot_computations`` counts ``hot_entries`` calls, for assertions."""

    def __init__(self, clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 shards: ShardMap | None = None) -> None:
        self._clock = clock
        self.shards = shards if shards is not None else ShardMap.evenly(
            ["main"], DEFAULT_VIRTUAL_SHARDS)
        self._ids = IdGenerator(virtual_shards=self.shards.virtual_shards)
        # Per cluster, (user, entry id) -> star, as each cluster's table would hold them.
        self.stars_by_cluster: dict[str, dict[tuple[str, int], _StarRow]] = {
            name: {} for name in self.shards.clusters}
        self._lock = threading.Lock()
        self._entries: dict[int, _EntryRow] = {}
        self._by_url: dict[str, int] = {}
        self._bookmarks: dict[tuple[int, str], _BookmarkRow] = {}
        self.position = 0
        self.replica_position = 0
        self.read_tokens: list[str | None] = []
        self.hot_computations = 0  # hot_entries calls, to see what a cache saves

    def catch_up(self) -> None:
        """Let the replica replay everything written so far."""
        self.replica_position = self.position

    def _visible(self) -> int:
        """The position a read sees: the replica's if it has the token, else the primary's."""
        token = current_token()
        self.read_tokens.append(token)
        if token is not None and parse_lsn(token) > self.replica_position:
            return self.position
        return self.replica_position

    def _entry(self, row: _EntryRow, at: int) -> Entry:
        users = sum(
            1 for b in self._bookmarks.values() if b.entry_id == row.id and b.versions[0][0] <= at
        )
        return Entry(row.id, row.url, row.title, row.created_at, users)

    def _bookmarks_at(self, at: int) -> list[tuple[_BookmarkRow, str]]:
        seen = []
        for row in self._bookmarks.values():
            comments = [comment for lsn, comment in row.versions if lsn <= at]
            if comments:
                seen.append((row, comments[-1]))
        return seen

    def front_page(self) -> FrontPage:
        with self._lock:
            at = self._visible()
            return FrontPage(recent=self._recent(at), hot=self._hot(at))

    def recent_entries(self) -> Sequence[Entry]:
        with self._lock:
            return self._recent(self._visible())

    def hot_entries(self) -> Sequence[Entry]:
        with self._lock:
            self.hot_computations += 1
            return self._hot(self._visible())

    def _recent(self, at: int) -> list[Entry]:
        entries = [row for row in self._entries.values() if row.lsn <= at]
        entries.sort(key=lambda row: (row.created_at, row.id), reverse=True)
        return [self._entry(row, at) for row in entries[:RECENT_LIMIT]]

    def _hot(self, at: int) -> list[Entry]:
        since = self._clock() - HOT_WINDOW
        counts: dict[int, tuple[int, datetime]] = {}
        for row, _comment in self._bookmarks_at(at):
            if row.created_at > since:
                count, latest = counts.get(row.entry_id, (0, row.created_at))
                counts[row.entry_id] = (count + 1, max(latest, row.created_at))
        ranked = sorted(counts.items(), key=lambda item: item[1], reverse=True)
        return [self._entry(self._entries[entry_id], at) for entry_id, _ in ranked[:HOT_LIMIT]]

    def entry_page(self, entry_id: int) -> EntryPage | None:
        with self._lock:
            at = self._visible()
            row = self._entries.get(entry_id)
            if row is None or row.lsn > at:
                return None
            marks = [
                Bookmark(b.user, comment, b.created_at)
                for b, comment in self._bookmarks_at(at)
                if b.entry_id == entry_id
            ]
            marks.sort(key=lambda b: b.user)
            marks.sort(key=lambda b: b.created_at, reverse=True)
            return EntryPage(entry=self._entry(row, at), bookmarks=marks[:BOOKMARKS_LIMIT])

    def save_bookmark(self, bookmark: NewBookmark) -> Saved:
        with self._lock:
            self.position += 1
            lsn, now = self.position, self._clock()
            entry_id = self._by_url.get(bookmark.url)
            if entry_id is None:
                entry_id = len(self._entries) + 1
                self._entries[entry_id] = _EntryRow(
                    entry_id, bookmark.url, bookmark.title, now, lsn
                )
                self._by_url[bookmark.url] = entry_id
            row = self._bookmarks.setdefault(
                (entry_id, bookmark.user), _BookmarkRow(entry_id, bookmark.user, now)
            )
            row.versions.append((lsn, bookmark.comment))
        token = format_lsn(lsn)
        note_write(token)
        return Saved(entry_id=entry_id, token=token)

    # -- stars ---------------------------------------------------------------------

    def _star_table(self, user: str) -> dict[tuple[str, int], _StarRow]:
        return self.stars_by_cluster[self.shards.cluster_for(user)]

    def _add_star(self, user: str, entry_id: int, lsn: int, now: datetime) -> _StarRow | None:
        """A new star, or None if the user has this one already."""
        table = self._star_table(user)
        if (user, entry_id) in table:
            return None
        row = _StarRow(self._ids.next_id(self.shards.shard_for(user)), user, entry_id, now, lsn)
        table[(user, entry_id)] = row
        return row

    def star(self, user: str, entry_id: int) -> Starred | None:
        with self._lock:
            at = self._visible()
            entry = self._entries.get(entry_id)
            if entry is None or entry.lsn > at:
                return None
            self.position += 1
            row = self._add_star(user, entry_id, self.position, self._clock())
            if row is None:
                self.position -= 1
                row = self._star_table(user)[(user, entry_id)]
                return Starred(id=row.id, user=user, entry_id=entry_id, token=None)
            lsn = self.position
        token = format_lsn(lsn)
        note_write(token)
        return Starred(id=row.id, user=user, entry_id=entry_id, token=token)

    def stars_page(self, user: str) -> StarsPage:
        with self._lock:
            at = self._visible()
            rows = [row for (owner, _), row in self._star_table(user).items()
                    if owner == user and row.lsn <= at]
            rows.sort(key=lambda row: row.id, reverse=True)
            stars = []
            for row in rows[:STARS_LIMIT]:
                entry = self._entries.get(row.entry_id)
                stars.append(Star(id=row.id, entry_id=row.entry_id,
                                  url=None if entry is None else entry.url,
                                  title=None if entry is None else entry.title,
                                  created_at=row.created_at))
            return StarsPage(user=user, shard=self.shards.shard_for(user), stars=stars)

    def copy_stars(self, source: str, target: str) -> Copied:
        self.shards.cluster_for_all([source, target])  # CrossShardError, nothing written
        with self._lock:
            mine = sorted((row for (owner, _), row in self._star_table(source).items()
                           if owner == source), key=lambda row: row.id)
            lsn, now = self.position + 1, self._clock()
            added = [row for row in (self._add_star(target, r.entry_id, lsn, now) for r in mine)
                     if row is not None]
            if not added:
                return Copied(count=0, token=None)
            self.position = lsn
        token = format_lsn(lsn)
        note_write(token)
        return Copied(count=len(added), token=token)
