"""The one error tree of tiers.

    TiersError
     +-- ConfigError          a topology file or value is wrong (names file, key, reason)
     +-- StateError           the state directory is locked, stale or unusable
     +-- ServiceError         a service could not be prepared, started or stopped
     |    +-- AppLoadError      the WSGI app could not be imported (tiers.app.loader)
     +-- DatabaseError        a database node could not be reached or answered wrongly
     |    +-- NodeUnavailable   a node is gone or no longer primary (tiers.db.errors)
     |    +-- CrossShardError   one operation's keys map to several clusters (tiers.db.sharding)
     |    +-- FailoverStepError a failover step failed; names the step and node (tiers.db.promote)
     +-- CacheError           the cache tier failed; its own subtree is in tiers.cache.errors
     +-- JobError             the job queue failed; its own subtree is in tiers.jobs.errors
     +-- ProxyError           the proxy failed; its own subtree is in tiers.proxy.errors
          +-- UpstreamError     talking to one backend failed (connect, closed, timeout, protocol)
          +-- ClientGone        the client left or broke its request mid-flight

Foreign errors (OSError, psycopg errors, ...) are translated where they cross
into tiers, with ``raise ... from exc`` so the cause stays visible.
"""

from __future__ import annotations


class TiersError(Exception):
    """Base of every error tiers raises on purpose."""


class ConfigError(TiersError):
    """A topology value is wrong; the message names the file, the key and the reason."""

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = source
        self.key = key
        self.reason = reason
        super().__init__(f"{source}: {key}: {reason}")


class StateError(TiersError):
    """The state directory cannot be used as asked (already running, not running, unusable)."""


class ServiceError(TiersError):
    """A service could not be prepared, started or stopped."""


class DatabaseError(TiersError):
    """A database node could not be reached or gave an unexpected answer."""


class ProxyError(TiersError):
    """The proxy could not start, or one exchange through it failed."""
