"""Abuse control: static deny lists and per-client rate limits, in the style of mod_dosdetector.

``Abuse.compile`` turns an ``AbuseConfig`` into an ``Abuse`` once; its
``check`` decides one request from the client address, the User-Agent and
the time the caller passes in (no clock is read here), and returns a
``Verdict``:

1. A User-Agent that matches ``deny_user_agents`` is denied (403). A request
   without one is searched as the empty string, so ``^$`` denies both.
2. An address in ``deny_networks`` is denied (403). Deny lists apply to
   everyone, exempt networks included: they are explicit.
3. With ``rate`` 0, or an address in ``exempt_networks``, the request is
   allowed and nothing is remembered about the client.
4. Otherwise each client has a token bucket that holds up to ``burst``
   tokens and refills at ``rate`` per second; a request takes one token. A
   client that finds its bucket empty is blocked for ``block_for`` seconds:
   that request and every one during the block are answered 429 with
   Retry-After set to the time left. Requests made while blocked do not
   extend the block, so Retry-After stays true: a client that waits as told
   is served. The block still holds off a client that never stops, which
   gets at most ``burst`` requests per ``block_for`` seconds, because it
   leaves the block with a full bucket and is blocked again once that is
   spent. With ``block_for`` 0 there is no block: an over-limit request
   gets 429 with the time until the next token, a plain token bucket.

A client is one IPv4 address, or one IPv6 /64 (``ipv6_prefix``): a host
given an IPv6 network can pick any address in its /64, so counting single
addresses would let it multiply its limit at will. IPv4-mapped IPv6 peers
count as the IPv4 address. A peer that is not an IP address (``b"-"``) is
keyed by that text, so all such peers share one bucket.

Memory is bounded: at most ``max_clients`` buckets, kept in least recently
used order, and at most ``max_clients`` blocks, kept in expiry order. A new
client beyond the bound evicts the bucket unused the longest (which loses
nothing but a partly spent burst); a block beyond it releases the block
closest to its end. Every request costs O(1): two dictionary probes, and
the deny and exempt networks are probed once per distinct prefix length
(``tiers.proxy.matchers.Networks``). Buckets that have filled up again are
worth nothing and are dropped, a few on each new client and all of them by
``sweep``, which the server calls every few seconds.
"""

from __future__ import annotations

import enum
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from tiers.config.proxy import AbuseConfig
from tiers.errors import ConfigError
from tiers.proxy.matchers import Networks, UserAgentPattern, parse_address

__all__ = [
    "ALLOW",
    "DEFAULT_MAX_CLIENTS",
    "DENIED_NETWORK",
    "DENIED_USER_AGENT",
    "Abuse",
    "AbuseStats",
    "Action",
    "Verdict",
]

# About 200 bytes a client (bucket, key, ordering links): some 13 MB at most.
DEFAULT_MAX_CLIENTS: Final = 65536
_SOURCE: Final = "proxy.abuse"
# Buckets dropped on the way when a new client arrives: enough to keep ahead
# of arrivals, few enough to keep every request O(1).
_TRIM_PER_INSERT: Final = 2


class Action(enum.Enum):
    """What to do with a request."""

    ALLOW = "allow"
    DENY = "deny"  # answer 403
    LIMITED = "limited"  # answer 429 with Retry-After


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision on one request.

    ``status`` is the status to answer (0 for ALLOW), ``retry_after`` the
    whole seconds for the Retry-After header (at least 1 for LIMITED, else
    0), ``reason`` a short text for the access log.
    """

    action: Action
    status: int
    retry_after: int
    reason: str


ALLOW: Final = Verdict(Action.ALLOW, 0, 0, "")
DENIED_USER_AGENT: Final = Verdict(Action.DENY, 403, 0, "denied user agent")
DENIED_NETWORK: Final = Verdict(Action.DENY, 403, 0, "denied network")


@dataclass(frozen=True, slots=True)
class AbuseStats:
    """Counters for metrics: requests by verdict since start, and clients tracked now."""

    allowed: int
    denied: int
    limited: int
    # Blocks started since start, and clients blocked now.
    blocks: int
    blocked: int
    # Clients with a bucket now, and buckets evicted early to respect the bound.
    tracked: int
    evicted: int


class _Bucket:
    __slots__ = ("last", "tokens")

    def __init__(self, tokens: float, last: float) -> None:
        self.tokens = tokens
        self.last = last  # time of the client's last request: buckets are in this order


class Abuse:
    """Deny lists and per-client rate limits, compiled once from an ``AbuseConfig``.

    ``Abuse(config, ...)`` is the same as ``Abuse.compile(config, ...)``.
    Not thread-safe: one instance belongs to one event loop. ``now`` must
    come from a monotonic clock (``loop.time()``); if it goes back, elapsed
    time counts as zero.
    """

    __slots__ = (
        "_block_for",
        "_blocks",
        "_buckets",
        "_burst",
        "_deny",
        "_deny_agents",
        "_exempt",
        "_max_clients",
        "_needs_address",
        "_rate",
        "_v6_shift",
        "allowed",
        "blocks",
        "denied",
        "evicted",
        "limited",
    )

    def __init__(
        self,
        config: AbuseConfig,
        *,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        ipv6_prefix: int = 64,
        source: str = _SOURCE,
    ) -> None:
        if not (math.isfinite(config.rate) and config.rate >= 0):
            raise ConfigError(source, "rate", f"must be a number >= 0 (got {config.rate})")
        if config.rate > 0 and config.burst < 1:
            raise ConfigError(source, "burst", f"must be at least 1 (got {config.burst})")
        if not (math.isfinite(config.block_for) and config.block_for >= 0):
            raise ConfigError(
                source, "block_for", f"must be a number of seconds >= 0 (got {config.block_for})"
            )
        if max_clients < 1:
            raise ConfigError(source, "max_clients", f"must be at least 1 (got {max_clients})")
        if not 1 <= ipv6_prefix <= 128:
            raise ConfigError(source, "ipv6_prefix", f"must be 1-128 (got {ipv6_prefix})")
        for i, pattern in enumerate(config.deny_user_agents):
            try:
                UserAgentPattern((pattern,))
            except re.error as exc:
                raise ConfigError(
                    source, f"deny_user_agents[{i}]", f"not a valid regular expression: {exc}"
                ) from exc
        self._deny_agents = (
            UserAgentPattern(config.deny_user_agents) if config.deny_user_agents else None
        )
        deny = Networks.parse(config.deny_networks, source, "deny_networks")
        self._deny = deny if deny else None
        self._exempt = Networks.parse(config.exempt_networks, source, "exempt_networks")
        self._rate = float(config.rate)
        self._burst = float(config.burst)
        self._block_for = float(config.block_for)
        self._needs_address = self._deny is not None or self._rate > 0
        self._max_clients = max_clients
        self._v6_shift = 128 - ipv6_prefix
        self._buckets: OrderedDict[int | bytes, _Bucket] = OrderedDict()
        self._blocks: OrderedDict[int | bytes, float] = OrderedDict()
        self.allowed = 0
        self.denied = 0
        self.limited = 0
        self.blocks = 0
        self.evicted = 0

    @classmethod
    def compile(
        cls,
        config: AbuseConfig,
        *,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        ipv6_prefix: int = 64,
        source: str = _SOURCE,
    ) -> Abuse:
        """Compile ``config``; at most ``max_clients`` clients are remembered at once.

        Raises ConfigError (``source``, key, reason) for a negative or
        non-finite rate or block_for, a burst below 1 with a rate, a network
        or User-Agent pattern that does not parse, or bounds out of range.
        """
        return cls(config, max_clients=max_clients, ipv6_prefix=ipv6_prefix, source=source)

    @property
    def limiting(self) -> bool:
        """Whether rate limiting is on (``rate`` > 0)."""
        return self._rate > 0

    def check(self, client_ip: bytes, user_agent: bytes | None, now: float) -> Verdict:
        """Decide one request from ``client_ip`` (peer address as text) at time ``now``.

        Never raises. Updates the counters and the client's bucket.
        """
        agents = self._deny_agents
        if agents is not None and agents.search(user_agent or b""):
            self.denied += 1
            return DENIED_USER_AGENT
        if not self._needs_address:
            self.allowed += 1
            return ALLOW
        address = parse_address(client_ip)
        deny = self._deny
        if deny is not None and address is not None and address in deny:
            self.denied += 1
            return DENIED_NETWORK
        rate = self._rate
        if rate <= 0 or (address is not None and address in self._exempt):
            self.allowed += 1
            return ALLOW

        key: int | bytes
        if address is None:
            key = client_ip
        elif address >> 128:  # IPv4
            key = address
        else:
            key = address >> self._v6_shift
        blocks = self._blocks
        if blocks:
            until = blocks.get(key)
            if until is not None:
                if now < until:
                    self.limited += 1
                    return _limited(until - now, "blocked")
                # The block is over: the client starts again with a full bucket.
                del blocks[key]

        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            self._trim(now, _TRIM_PER_INSERT)
            if len(buckets) >= self._max_clients:
                buckets.popitem(last=False)
                self.evicted += 1
            buckets[key] = _Bucket(self._burst - 1.0, now)
            self.allowed += 1
            return ALLOW
        buckets.move_to_end(key)
        tokens = bucket.tokens
        elapsed = now - bucket.last
        if elapsed > 0:
            tokens += elapsed * rate
            tokens = min(tokens, self._burst)
            bucket.last = now
        if tokens >= 1.0:
            bucket.tokens = tokens - 1.0
            self.allowed += 1
            return ALLOW

        self.limited += 1
        block_for = self._block_for
        if block_for <= 0:
            bucket.tokens = tokens
            return _limited((1.0 - tokens) / rate, "rate limited")
        # The bucket goes: a client leaves its block with a full one.
        del buckets[key]
        if len(blocks) >= self._max_clients:
            blocks.popitem(last=False)
        blocks[key] = now + block_for
        self.blocks += 1
        return _limited(block_for, "rate limited")

    def sweep(self, now: float) -> int:
        """Forget blocks that are over and buckets that have filled up again; return how many.

        Both are kept in the order they expire (blocks) or were last used
        (buckets), so this stops at the first one still needed: its cost is
        what it removes, plus one. A full bucket behind a bucket still
        filling waits for a later sweep (at most ``burst / rate`` seconds).
        """
        return self._expire_blocks(now) + self._trim(now, None)

    def stats(self, now: float) -> AbuseStats:
        """The counters as of ``now`` (blocks that are over are forgotten first)."""
        self._expire_blocks(now)
        return AbuseStats(
            allowed=self.allowed,
            denied=self.denied,
            limited=self.limited,
            blocks=self.blocks,
            blocked=len(self._blocks),
            tracked=len(self._buckets),
            evicted=self.evicted,
        )

    def _expire_blocks(self, now: float) -> int:
        blocks = self._blocks
        removed = 0
        while blocks:
            key = next(iter(blocks))
            if blocks[key] > now:
                break
            del blocks[key]
            removed += 1
        return removed

    def _trim(self, now: float, limit: int | None) -> int:
        """Drop up to ``limit`` (None: all) least recently used buckets that are full by ``now``."""
        buckets = self._buckets
        rate = self._rate
        burst = self._burst
        removed = 0
        while buckets and (limit is None or removed < limit):
            key = next(iter(buckets))
            bucket = buckets[key]
            if bucket.tokens + (now - bucket.last) * rate < burst:
                break
            del buckets[key]
            removed += 1
        return removed


def _limited(seconds: float, reason: str) -> Verdict:
    return Verdict(Action.LIMITED, 429, max(1, math.ceil(seconds)), reason)
