"""What the site keeps in the cache tier, and why a reader never sees less than it wrote.

Two things go through ``tiers.cache`` (the process's cluster from
``TIERS_CACHE_NODES``; without it every page reads the database as before):

* A per-user fragment: the rendered list of a user's stars, under
  ``user:<name>:stars`` for :data:`FRAGMENT_TTL` seconds. The star and copy
  handlers delete it right after their commit, before the redirect.
* A hot computation: the hot-entries ranking of the front page, under
  :data:`HOT_KEY`, through ``tiers.cache.stampede.get_or_compute`` with a
  :data:`HOT_TTL` second TTL, so a burst of front-page requests after it
  expires runs the ranking query once (one caller holds the lease, the others
  serve the stale ranking or wait for the new one). It is one ranking for
  everybody, at most that old: a new bookmark shows in "Recent entries"
  (read with the reader's causal token) at once, in the ranking within
  seconds.

Read-your-writes for the fragment. Deleting after the commit is not enough
on its own: a reader that read the stars before the commit, or from a
replica that had not replayed it, can store its list *after* the delete,
and the writer's next page would then show the list without the new star.
A reader with the writer's causal token is safe (its read goes to a replica
that has the write, or to the primary, so what it stores has the write), but
readers without it (other visitors, another tab) are not. So each fragment
is stored with the causal tokens its reader held (``tiers.db.tokens``, one
LSN per database cluster): a read with a token sees at least that position,
so the tag is a lower bound of what the fragment shows. A reader uses a
cached fragment only if, for every cluster it holds a token for, the tag has
at least that position; otherwise it renders from the database (with its
token) and stores that. The writer holds its commit's token, so it never
gets a fragment from before its write, however the delete and a refill
interleave. The delete is what lets everybody else see the write at once;
the rare stale refill just described shows them the old list until the
writer's next view replaces it or :data:`FRAGMENT_TTL` ends. (After a
failover that lost commits, tokens of the old history may exceed new
positions; the TTL bounds that case too.)

Every cache failure is a miss: reads of a dead node are misses, writes to it
are dropped, and the pages fall back on the database. A cached fragment is
put into the page as HTML, so whoever can write to the cache nodes can write
to the pages: keep the nodes as private as the database (the stack binds them
to loopback).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from bookmarks.store import Entry
from tiers.cache import CacheCluster, get_or_compute
from tiers.cache.errors import CacheError
from tiers.db.tokens import current_tokens, reached

log = logging.getLogger("bookmarks")

FRAGMENT_TTL = 60
HOT_KEY = "front:hot"
HOT_TTL = 10


def stars_key(user: str) -> str:
    """The cache key of ``user``'s rendered stars (names are plain words: valid keys)."""
    return f"user:{user}:stars"


class EntriesCodec:
    """Entries to JSON bytes and back, for the hot ranking's envelope."""

    def dumps(self, value: Sequence[Entry]) -> bytes:
        rows = [[e.id, e.url, e.title, e.created_at.isoformat(), e.users] for e in value]
        return json.dumps(rows, separators=(",", ":")).encode()

    def loads(self, data: bytes) -> list[Entry]:
        return [Entry(id=row[0], url=row[1], title=row[2],
                      created_at=datetime.fromisoformat(row[3]), users=row[4])
                for row in json.loads(data)]


ENTRIES = EntriesCodec()


def covers(tag: Mapping[str, str], needed: Mapping[str, str]) -> bool:
    """True if a fragment read with the tokens ``tag`` has every write in ``needed``."""
    try:
        return all(cluster in tag and reached(tag[cluster], token)
                   for cluster, token in needed.items())
    except (TypeError, ValueError):
        return False


def _fragment(cached: object) -> tuple[dict[str, str], str] | None:
    """The tag and HTML of a stored fragment, or None for anything else."""
    if not isinstance(cached, dict):
        return None
    tag, html = cached.get("tokens"), cached.get("html")
    if not isinstance(tag, dict) or not isinstance(html, str):
        return None
    return tag, html


class SiteCache:
    """The site's use of a cache cluster; with ``cluster()`` None it caches nothing."""

    def __init__(self, cluster: Callable[[], CacheCluster | None]) -> None:
        self.cluster = cluster

    def fragment(self, key: str, render: Callable[[], str]) -> str:
        """The fragment under ``key`` if its tag covers this reader's tokens, else ``render()``
        (then stored, tagged with those tokens)."""
        cluster = self.cluster()
        if cluster is None:
            return render()
        # Taken before the read: the tag must be what the read was held to.
        needed = current_tokens()
        found = _fragment(cluster.get(key))
        if found is not None and covers(found[0], needed):
            return found[1]
        html = render()
        stored: dict[str, Any] = {"tokens": needed, "html": html}
        try:
            cluster.set(key, stored, FRAGMENT_TTL)
        except CacheError as exc:  # too large for a node, say: the page is made anyway
            log.warning("fragment %s not cached: %s", key, exc)
        return html

    def forget(self, key: str) -> None:
        """Delete ``key`` everywhere it may be; call after the commit that changed it."""
        cluster = self.cluster()
        if cluster is not None:
            cluster.delete(key)

    def hot_entries(self, compute: Callable[[], Sequence[Entry]]) -> Sequence[Entry]:
        """The hot ranking, computed by one caller per :data:`HOT_TTL` across every server."""
        cluster = self.cluster()
        if cluster is None:
            return compute()
        return get_or_compute(cluster, HOT_KEY, lambda: list(compute()), HOT_TTL,
                              codec=ENTRIES)
