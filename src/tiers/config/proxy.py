"""The proxy's policy as frozen values: routes, pools, abuse limits, page cache, admin.

These are inert data, validated by ``tiers.config.loader`` (or built directly
in tests) and handed to the proxy process, which compiles what it needs
(regular expressions, networks, hash rings) once at start and on reload.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from tiers.config.address import Address


class Balance(enum.Enum):
    """How a pool picks a server for a request."""

    ROUND_ROBIN = "round_robin"  # weighted, smooth (nginx's algorithm)
    LEAST_CONN = "least_conn"  # fewest active requests, relative to weight
    URI_HASH = "uri_hash"  # ketama ring on the request URI: a server change moves ~1/N keys


@dataclass(frozen=True)
class Server:
    """One backend server of a pool."""

    address: Address
    weight: int = 1
    # Used only while every non-backup server of the pool is down.
    backup: bool = False


@dataclass(frozen=True)
class Pool:
    """A named group of backend servers and how requests are spread over them."""

    name: str
    servers: tuple[Server, ...]
    balance: Balance = Balance.ROUND_ROBIN
    # A server that comes back up gets a share of traffic that grows linearly
    # from almost nothing to its full weight over this many seconds (0: at once).
    slow_start: float = 0.0
    # Requests in flight per server (0: unlimited). Beyond it, requests wait in a
    # queue of at most ``queue`` entries for ``queue_timeout`` seconds, then get 503.
    max_conns: int = 0
    queue: int = 128
    queue_timeout: float = 5.0
    # Passive health: this many consecutive connection errors or 5xx answers
    # take a server out at once (active checks bring it back).
    passive_fall: int = 3


@dataclass(frozen=True)
class Match:
    """What a request must look like for a route to apply; every given part must match.

    Empty parts match everything. ``hosts`` are exact names or ``*.suffix``
    wildcards, compared case-insensitively without the port. ``headers`` maps
    a lower-case header name to a regular expression searched in its value (a
    missing header does not match). ``user_agent`` is a case-insensitive
    regular expression searched in User-Agent. ``networks`` are CIDR blocks
    of the client address.
    """

    hosts: tuple[str, ...] = ()
    path_prefix: str | None = None
    path_regex: str | None = None
    methods: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    user_agent: str | None = None
    networks: tuple[str, ...] = ()


class RouteKind(enum.Enum):
    POOL = "pool"  # forward to a backend pool
    STATIC = "static"  # serve files from a directory
    REDIRECT = "redirect"  # answer with a redirect
    RESPOND = "respond"  # answer with a fixed status and body


@dataclass(frozen=True)
class Route:
    """One routing rule: the first route whose ``match`` fits a request decides it."""

    name: str
    kind: RouteKind
    match: Match = field(default_factory=Match)
    pool: str | None = None  # POOL
    root: Path | None = None  # STATIC: files under this directory
    # STATIC: remove the matched path_prefix before looking the file up.
    strip_prefix: bool = True
    location: str | None = None  # REDIRECT: target; "$uri" stands for the request URI
    status: int = 200  # REDIRECT (301, 302, 303, 307, 308) or RESPOND
    body: str = ""  # RESPOND
    # POOL: the page cache may answer for this route (see CacheConfig).
    cache: bool = True
    # POOL: cache even requests that carry Cookie or Authorization headers.
    cache_private_requests: bool = False


@dataclass(frozen=True)
class AbuseConfig:
    """Per-client-IP limits (mod_dosdetector style) and static deny lists."""

    # Requests per second per client address; 0 disables rate limiting.
    rate: float = 0.0
    burst: int = 50
    # A client that goes over the limit is answered 429 for this many seconds.
    block_for: float = 60.0
    # Addresses never limited (monitoring, the proxy's own network).
    exempt_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    deny_networks: tuple[str, ...] = ()
    # Case-insensitive regular expressions searched in User-Agent.
    deny_user_agents: tuple[str, ...] = ()


@dataclass(frozen=True)
class CacheConfig:
    """The proxy's shared page cache for GET and HEAD (Squid/Varnish style)."""

    enabled: bool = True
    memory: int = 64 * 1024 * 1024  # bytes of bodies and heads, LRU beyond it
    max_object: int = 1024 * 1024  # larger responses pass through uncached
    # Used when the response does not say (Cache-Control stale-while-revalidate
    # / stale-if-error extensions take precedence).
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0


@dataclass(frozen=True)
class AdminConfig:
    """The admin listener: status JSON, Prometheus metrics, cache purge."""

    listen: Address | None = Address("127.0.0.1", 8409)
    # Bearer token required on every admin request; None: a random one is
    # made at start and written to <state dir>/admin.token.
    token: str | None = None


@dataclass(frozen=True)
class ProxyPolicy:
    """Everything the proxy decides per request, beyond its listener and timeouts."""

    pools: tuple[Pool, ...] = ()
    routes: tuple[Route, ...] = ()
    abuse: AbuseConfig = field(default_factory=AbuseConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    # Largest request body accepted (413 beyond it); 0: no limit.
    max_body_size: int = 16 * 1024 * 1024
    # Set X-Request-Id on requests that have none, and echo it in responses.
    request_id: bool = True

    def pool(self, name: str) -> Pool:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)
