"""The site's data: what the pages read and write, behind one narrow interface.

``SqlStore`` keeps all the SQL and talks to PostgreSQL through a
``tiers.db.router.Cluster``: writes go to the primary; reads go to a replica
that has the reader's last write on that cluster. The reader's causal tokens
(one per cluster) are not passed around: ``tiers.app.causal.CausalMiddleware``
puts them in the request's scope, each cluster's reads use its own, and its
writes update its own, so a star written on the user's cluster and the
entries read from the page tables' cluster each keep read-your-writes. ``MemoryStore`` (in
``bookmarks.memory``) has the same interface and follows the same scope, for
tests of the pages without a database.

Where the data lives (``SqlStore.from_databases``, over
``tiers.db.clusters.Databases``):

* ``entries`` and ``bookmarks`` (:data:`PAGE_TABLES`) are one table group:
  the pages join them and a save writes both in one transaction, so they
  must share a cluster. The topology may move them together to another
  cluster (``[db.tables] bookmarks = {cluster = "social", tables =
  ["entries", "bookmarks"]}``); a map that splits them is refused when the
  store is built, with CrossShardError naming each table's cluster.
* ``stars`` is sharded by user name: a user's stars live on the cluster of
  the user's virtual shard, with ids from ``tiers_next_id(shard)`` that
  carry it. A user's page reads their stars from that one cluster and the
  starred entries' titles from the page tables' cluster (two reads, never
  one transaction). Copying one user's stars to another is one transaction,
  so it needs both users on one cluster, else CrossShardError before
  anything is written.

Without a table map or shard map every table is on the one cluster, as
``SqlStore(cluster)`` builds it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol

import psycopg
from psycopg.rows import TupleRow

from bookmarks.forms import NewBookmark
from tiers.db.clusters import Databases
from tiers.db.sharding import DEFAULT_VIRTUAL_SHARDS, shard_for_key

RECENT_LIMIT = 30
HOT_LIMIT = 20
HOT_WINDOW = "24 hours"
BOOKMARKS_LIMIT = 500
STARS_LIMIT = 200
# The tables the pages join and a save writes together: one table group.
PAGE_TABLES = ("entries", "bookmarks")
# Sharded by user name.
STARS_TABLE = "stars"
# Entry ids are bigint; a larger number in a URL is simply not an entry.
MAX_ENTRY_ID = 2**63 - 1
# entries.title's CHECK (1 to 200 characters), as bookmarks.forms.TITLE_MAX.
TITLE_LIMIT = 200
# Where jobs are enqueued and taken (tiers worker serves the main cluster).
MAIN_CLUSTER = "main"


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


@dataclass(frozen=True)
class Star:
    """One of a user's stars; ``url`` and ``title`` are None if the entry is not found."""

    id: int
    entry_id: int
    url: str | None
    title: str | None
    created_at: datetime


@dataclass(frozen=True)
class StarsPage:
    """A user's stars, newest first, and the virtual shard they live on."""

    user: str
    shard: int
    stars: Sequence[Star]


@dataclass(frozen=True)
class Starred:
    """A star (new, or the one the user already had) and its commit's causal token."""

    id: int
    user: str
    entry_id: int
    token: str | None


@dataclass(frozen=True)
class Copied:
    """How many stars a copy added to the target user, and its commit's causal token."""

    count: int
    token: str | None


class Store(Protocol):
    """What the pages need; reads see the current request's causal token (see above)."""

    def front_page(self) -> FrontPage:
        """Recent and hot entries in one read."""
        ...

    def recent_entries(self) -> Sequence[Entry]:
        """The front page's recent entries alone (when the hot ones come from a cache)."""
        ...

    def hot_entries(self) -> Sequence[Entry]:
        """The front page's hot entries alone: the ranking worth caching."""
        ...

    def entry_page(self, entry_id: int) -> EntryPage | None: ...

    def save_bookmark(self, bookmark: NewBookmark) -> Saved: ...

    def star(self, user: str, entry_id: int) -> Starred | None:
        """Star an entry as ``user``; None if there is no such entry."""
        ...

    def stars_page(self, user: str) -> StarsPage: ...

    def copy_stars(self, source: str, target: str) -> Copied:
        """Give ``target`` every star of ``source`` in one transaction.

        CrossShardError, with nothing written, if the two users' stars live
        on different clusters.
        """
        ...


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


class ShardRouting(Protocol):
    """The part of tiers.db.clusters.Databases the store uses for the sharded table."""

    def shard_for(self, key: str) -> int: ...

    def for_key(self, key: str) -> ClusterLike: ...

    def for_keys(self, keys: Iterable[str]) -> ClusterLike: ...


class OneCluster:
    """Every key on one cluster, over the default number of virtual shards (ids still carry
    the shard, so the rows can be spread over clusters later without new ids)."""

    def __init__(self, cluster: ClusterLike) -> None:
        self.cluster = cluster

    def shard_for(self, key: str) -> int:
        return shard_for_key(key, DEFAULT_VIRTUAL_SHARDS)

    def for_key(self, key: str) -> ClusterLike:
        return self.cluster

    def for_keys(self, keys: Iterable[str]) -> ClusterLike:
        return self.cluster


_RECENT_SQL = """
SELECT e.id, e.url, e.title, e.created_at,
       (SELECT count(*) FROM bookmarks b WHERE b.entry_id = e.id) AS users
FROM entries e
ORDER BY e.created_at DESC, e.id DESC
LIMIT %s
"""

# The hot ranking: the counts the cron job bookmarks.rank_hot stored (as of
# hot_counts_meta.computed_at) plus the bookmarks made since, so a new bookmark
# counts at once and only a minute of bookmarks is aggregated per request.
# Until the job has run (no hot_counts_meta row), everything is counted live.
# Stored counts may still include bookmarks that left the window since the
# job ran: the ranking is at most one run behind for those.
_HOT_SQL = """
WITH since AS (
    SELECT greatest(coalesce((SELECT computed_at FROM hot_counts_meta), '-infinity'),
                    now() - %(window)s::interval) AS t
), counts AS (
    SELECT entry_id, recent, latest FROM hot_counts
    WHERE latest > now() - %(window)s::interval
    UNION ALL
    SELECT b.entry_id, count(*), max(b.created_at)
    FROM bookmarks b, since
    WHERE b.created_at > since.t
    GROUP BY b.entry_id
)
SELECT e.id, e.url, e.title, e.created_at,
       (SELECT count(*) FROM bookmarks b WHERE b.entry_id = e.id) AS users
FROM (SELECT entry_id, sum(recent) AS recent, max(latest) AS latest
      FROM counts
      GROUP BY entry_id
      ORDER BY recent DESC, latest DESC
      LIMIT %(limit)s) h
JOIN entries e ON e.id = h.entry_id
ORDER BY h.recent DESC, h.latest DESC
"""

# The cron job's work: every entry's bookmarks in the window, as of now(), in
# one transaction with the time it stands for.
_RANK_DELETE_SQL = "DELETE FROM hot_counts"
_RANK_INSERT_SQL = """
INSERT INTO hot_counts (entry_id, recent, latest)
SELECT entry_id, count(*), max(created_at)
FROM bookmarks
WHERE created_at > now() - %s::interval
GROUP BY entry_id
"""
_RANK_STAMP_SQL = """
INSERT INTO hot_counts_meta (one, computed_at) VALUES (true, now())
ON CONFLICT (one) DO UPDATE SET computed_at = EXCLUDED.computed_at
"""

# The title job's result: a placeholder title (the URL itself) gives way to the
# fetched one; any entry records when its page was fetched.
_FETCHED_TITLE_SQL = """
UPDATE entries
SET title = CASE WHEN title = url THEN %s ELSE title END, fetched_at = now()
WHERE id = %s
RETURNING title
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


_ENTRY_EXISTS_SQL = "SELECT 1 FROM entries WHERE id = %s"

# The id is made by the user's cluster, with the user's virtual shard in it.
_STAR_SQL = """
INSERT INTO stars (id, user_name, entry_id) VALUES (tiers_next_id(%s), %s, %s)
ON CONFLICT (user_name, entry_id) DO NOTHING
RETURNING id
"""

_STAR_ID_SQL = "SELECT id FROM stars WHERE user_name = %s AND entry_id = %s"

_STARS_SQL = """
SELECT id, entry_id, created_at
FROM stars
WHERE user_name = %s
ORDER BY id DESC
LIMIT %s
"""

_STARRED_ENTRIES_SQL = "SELECT id, url, title FROM entries WHERE id = ANY(%s)"

# Oldest first, so the copies' ids keep the original order.
_COPY_STARS_SQL = """
INSERT INTO stars (id, user_name, entry_id)
SELECT tiers_next_id(%s), %s, s.entry_id
FROM (SELECT entry_id, id FROM stars WHERE user_name = %s ORDER BY id) s
ON CONFLICT (user_name, entry_id) DO NOTHING
RETURNING id
"""


def _entry(row: tuple[Any, ...]) -> Entry:
    return Entry(id=row[0], url=row[1], title=row[2], created_at=row[3], users=row[4])


AfterSave = Callable[[Any, int, NewBookmark], None]


class SqlStore:
    """The store over PostgreSQL: the page tables on ``cluster``, stars where ``shards`` says.

    Without ``shards`` the stars are on ``cluster`` too. ``after_save(conn,
    entry_id, bookmark)`` runs in the transaction of every saved bookmark (the
    site enqueues its jobs there), or, when the jobs live on another cluster
    (``jobs_cluster``), in a transaction of its own there just after the save
    commits: one transaction cannot span two clusters, so then a crash between
    the two commits can lose the jobs of that one save.
    """

    def __init__(self, cluster: ClusterLike, shards: ShardRouting | None = None, *,
                 after_save: AfterSave | None = None,
                 jobs_cluster: ClusterLike | None = None) -> None:
        self.cluster = cluster
        self.shards: ShardRouting = OneCluster(cluster) if shards is None else shards
        self.after_save = after_save
        self.jobs_cluster = jobs_cluster

    @classmethod
    def from_databases(cls, databases: Databases, *,
                       after_save: AfterSave | None = None) -> SqlStore:
        """The store over every cluster; CrossShardError if the page tables are apart.

        Jobs live on the main cluster (where ``tiers worker`` takes them).
        """
        pages = databases.for_tables(PAGE_TABLES)
        jobs = databases.cluster(MAIN_CLUSTER)
        return cls(pages, databases, after_save=after_save,
                   jobs_cluster=None if jobs is pages else jobs)

    def front_page(self) -> FrontPage:
        with self.cluster.read() as conn:
            recent = conn.execute(_RECENT_SQL, (RECENT_LIMIT,)).fetchall()
            hot = conn.execute(_HOT_SQL, {"window": HOT_WINDOW, "limit": HOT_LIMIT}).fetchall()
        return FrontPage(recent=[_entry(r) for r in recent], hot=[_entry(r) for r in hot])

    def recent_entries(self) -> Sequence[Entry]:
        with self.cluster.read() as conn:
            return [_entry(r) for r in conn.execute(_RECENT_SQL, (RECENT_LIMIT,)).fetchall()]

    def hot_entries(self) -> Sequence[Entry]:
        with self.cluster.read() as conn:
            rows = conn.execute(_HOT_SQL, {"window": HOT_WINDOW, "limit": HOT_LIMIT}).fetchall()
        return [_entry(r) for r in rows]

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
            if self.after_save is not None and self.jobs_cluster is None:
                self.after_save(conn, entry_id, bookmark)
        if self.after_save is not None and self.jobs_cluster is not None:
            with self.jobs_cluster.write() as jobs_conn:
                self.after_save(jobs_conn, entry_id, bookmark)
        return Saved(entry_id=entry_id, token=transaction.token)

    def apply_fetched_title(self, entry_id: int, title: str) -> str | None:
        """Record a fetch of the entry's page: its title replaces a placeholder title.

        Returns the entry's title now (None if there is no such entry);
        ValueError for a title that is only whitespace.
        """
        title = " ".join(title.split())[:TITLE_LIMIT]
        if not title:
            raise ValueError("a fetched title needs some text")
        with self.cluster.write() as conn:
            row = conn.execute(_FETCHED_TITLE_SQL, (title, entry_id)).fetchone()
        return None if row is None else str(row[0])

    def recompute_hot(self) -> int:
        """Store every entry's bookmark count in the hot window (the cron job); how many."""
        with self.cluster.write() as conn:
            conn.execute(_RANK_DELETE_SQL)
            inserted = conn.execute(_RANK_INSERT_SQL, (HOT_WINDOW,)).rowcount
            conn.execute(_RANK_STAMP_SQL)
        return int(inserted)


    def star(self, user: str, entry_id: int) -> Starred | None:
        if not 0 < entry_id <= MAX_ENTRY_ID:
            return None
        # A read of the page tables' cluster, then a write on the user's: two
        # clusters, so two steps. Entries are never deleted, so the check holds.
        with self.cluster.read() as conn:
            if conn.execute(_ENTRY_EXISTS_SQL, (entry_id,)).fetchone() is None:
                return None
        transaction = self.shards.for_key(user).write()
        with transaction as conn:
            row = conn.execute(_STAR_SQL, (self.shards.shard_for(user), user,
                                           entry_id)).fetchone()
            if row is None:  # starred before
                row = conn.execute(_STAR_ID_SQL, (user, entry_id)).fetchone()
            if row is None:
                raise RuntimeError("a star that conflicted cannot be found")
            star_id = int(row[0])
        return Starred(id=star_id, user=user, entry_id=entry_id, token=transaction.token)

    def stars_page(self, user: str) -> StarsPage:
        with self.shards.for_key(user).read() as conn:
            rows = conn.execute(_STARS_SQL, (user, STARS_LIMIT)).fetchall()
        found: dict[int, tuple[str, str]] = {}
        if rows:
            with self.cluster.read() as conn:
                wanted = sorted({int(r[1]) for r in rows})
                for entry in conn.execute(_STARRED_ENTRIES_SQL, (wanted,)).fetchall():
                    found[int(entry[0])] = (entry[1], entry[2])
        stars = []
        for star_id, entry_id, created_at in rows:
            url, title = found.get(int(entry_id), (None, None))
            stars.append(Star(id=int(star_id), entry_id=int(entry_id), url=url, title=title,
                              created_at=created_at))
        return StarsPage(user=user, shard=self.shards.shard_for(user), stars=stars)

    def copy_stars(self, source: str, target: str) -> Copied:
        # Refused here, before any connection, if the users live apart.
        cluster = self.shards.for_keys([source, target])
        transaction = cluster.write()
        with transaction as conn:
            rows = conn.execute(_COPY_STARS_SQL,
                                (self.shards.shard_for(target), target, source)).fetchall()
        return Copied(count=len(rows), token=transaction.token)


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

    def recent_entries(self) -> Sequence[Entry]:
        return self.get().recent_entries()

    def hot_entries(self) -> Sequence[Entry]:
        return self.get().hot_entries()

    def entry_page(self, entry_id: int) -> EntryPage | None:
        return self.get().entry_page(entry_id)

    def save_bookmark(self, bookmark: NewBookmark) -> Saved:
        return self.get().save_bookmark(bookmark)

    def star(self, user: str, entry_id: int) -> Starred | None:
        return self.get().star(user, entry_id)

    def stars_page(self, user: str) -> StarsPage:
        return self.get().stars_page(user)

    def copy_stars(self, source: str, target: str) -> Copied:
        return self.get().copy_stars(source, target)
