"""The site's data: what the pages read and write, behind one narrow interface.

``SqlStore`` keeps all the SQL and talks to PostgreSQL through a
``tiers.db.router.Cluster``: writes go to the primary; reads go to a replica
that has the reader's last write. The reader's causal token is not passed
around: ``tiers.app.causal.CausalMiddleware`` puts it in the request's scope,
the cluster's reads use it, and its writes update it. ``MemoryStore`` (in
``bookmarks.memory``) has the same interface and follows the same scope, for
tests of the pages without a database.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol

import psycopg
from psycopg.rows import TupleRow

from bookmarks.forms import NewBookmark

RECENT_LIMIT = 30
HOT_LIMIT = 20
HOT_WINDOW = "24 hours"
BOOKMARKS_LIMIT = 500
# Entry ids are bigint; a larger number in a URL is simply not an entry.
MAX_ENTRY_ID = 2**63 - 1


@dataclass(frozen=True)
class Entry:
    id: int
    url: str
    title: str
    created_at: datetime
    users: int


@dataclass(frozen=True)
class Bookmark:
    user: str
    comment: str
    created_at: datetime


@dataclass(frozen=True)
class FrontPage:
    recent: Sequence[Entry]
    hot: Sequence[Entry]


@dataclass(frozen=True)
class EntryPage:
    entry: Entry
    bookmarks: Sequence[Bookmark]


@dataclass(frozen=True)
class Saved:
    """Where a saved bookmark is, and the causal token of its commit (None if there is none)."""

    entry_id: int
    token: str | None


class Store(Protocol):
    """What the pages need; reads see the current request's causal token (see above)."""

    def front_page(self) -> FrontPage: ...

    def entry_page(self, entry_id: int) -> EntryPage | None: ...

    def save_bookmark(self, bookmark: NewBookmark) -> Saved: ...


Connection = psycopg.Connection[TupleRow]


class WriteBlock(Protocol):
    token: str | None

    def __enter__(self) -> Connection: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class ClusterLike(Protocol):
    """The part of tiers.db.router.Cluster the store uses."""

    def read(self) -> AbstractContextManager[Connection]: ...

    def write(self) -> WriteBlock: ...


_RECENT_SQL = """
SELECT e.id, e.url, e.title, e.created_at,
       (SELECT count(*) FROM bookmarks b WHERE b.entry_id = e.id) AS users
FROM entries e
ORDER BY e.created_at DESC, e.id DESC
LIMIT %s
"""

_HOT_SQL = """
SELECT e.id, e.url, e.title, e.created_at,
       (SELECT count(*) FROM bookmarks b WHERE b.entry_id = e.id) AS users
FROM (SELECT entry_id, count(*) AS recent, max(created_at) AS latest
      FROM bookmarks
      WHERE created_at > now() - %s::interval
      GROUP BY entry_id
      ORDER BY recent DESC, latest DESC
      LIMIT %s) h
JOIN entries e ON e.id = h.entry_id
ORDER BY h.recent DESC, h.latest DESC
"""

_ENTRY_SQL = """
SELECT e.id, e.url, e.title, e.created_at,
       (SELECT count(*) FROM bookmarks b WHERE b.entry_id = e.id) AS users
FROM entries e
WHERE e.id = %s
"""

_BOOKMARKS_SQL = """
SELECT user_name, comment, created_at
FROM bookmarks
WHERE entry_id = %s
ORDER BY created_at DESC, user_name
LIMIT %s
"""

# DO UPDATE rather than DO NOTHING so RETURNING yields the id of an existing
# entry too. A title that was only a placeholder (the URL itself) gives way
# to a real one.
_UPSERT_ENTRY_SQL = """
INSERT INTO entries (url, title) VALUES (%s, %s)
ON CONFLICT (url) DO UPDATE
SET title = CASE WHEN entries.title = entries.url THEN EXCLUDED.title ELSE entries.title END
RETURNING id
"""

# One bookmark per user per entry: saving again replaces the comment and
# keeps the first date, so re-saving does not push an entry up the hot list.
_UPSERT_BOOKMARK_SQL = """
INSERT INTO bookmarks (entry_id, user_name, comment) VALUES (%s, %s, %s)
ON CONFLICT (entry_id, user_name) DO UPDATE SET comment = EXCLUDED.comment
"""


def _entry(row: tuple[Any, ...]) -> Entry:
    return Entry(id=row[0], url=row[1], title=row[2], created_at=row[3], users=row[4])


class SqlStore:
    """The store over PostgreSQL, through a read/write router."""

    def __init__(self, cluster: ClusterLike) -> None:
        self.cluster = cluster

    def front_page(self) -> FrontPage:
        with self.cluster.read() as conn:
            recent = conn.execute(_RECENT_SQL, (RECENT_LIMIT,)).fetchall()
            hot = conn.execute(_HOT_SQL, (HOT_WINDOW, HOT_LIMIT)).fetchall()
        return FrontPage(recent=[_entry(r) for r in recent], hot=[_entry(r) for r in hot])

    def entry_page(self, entry_id: int) -> EntryPage | None:
        if not 0 < entry_id <= MAX_ENTRY_ID:
            return None
        with self.cluster.read() as conn:
            row = conn.execute(_ENTRY_SQL, (entry_id,)).fetchone()
            if row is None:
                return None
            rows = conn.execute(_BOOKMARKS_SQL, (entry_id, BOOKMARKS_LIMIT)).fetchall()
        bookmarks = [Bookmark(user=r[0], comment=r[1], created_at=r[2]) for r in rows]
        return EntryPage(entry=_entry(row), bookmarks=bookmarks)

    def save_bookmark(self, bookmark: NewBookmark) -> Saved:
        transaction = self.cluster.write()
        with transaction as conn:
            row = conn.execute(_UPSERT_ENTRY_SQL, (bookmark.url, bookmark.title)).fetchone()
            if row is None:
                raise RuntimeError("INSERT ... RETURNING returned no row")
            entry_id = int(row[0])
            conn.execute(_UPSERT_BOOKMARK_SQL, (entry_id, bookmark.user, bookmark.comment))
        return Saved(entry_id=entry_id, token=transaction.token)


class ProcessLocalStore:
    """A store built on first use in each process, from ``factory``.

    The app module is imported in the gunicorn master before the workers
    fork; building the store (and its cluster, with its health monitor)
    lazily, and again in a process whose pid changed, means no process ever
    uses connections, threads or state made by its parent, and importing the
    app needs no database settings.
    """

    def __init__(self, factory: Callable[[], Store]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._pid = 0
        self._store: Store | None = None

    def get(self) -> Store:
        store, pid = self._store, os.getpid()
        if store is not None and self._pid == pid:
            return store
        with self._lock:
            if self._store is None or self._pid != pid:
                self._store = self._factory()
                self._pid = pid
            return self._store

    def front_page(self) -> FrontPage:
        return self.get().front_page()

    def entry_page(self, entry_id: int) -> EntryPage | None:
        return self.get().entry_page(entry_id)

    def save_bookmark(self, bookmark: NewBookmark) -> Saved:
        return self.get().save_bookmark(bookmark)
