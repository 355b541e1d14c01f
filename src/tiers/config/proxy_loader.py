"""Build the proxy's policy (pools, routes, abuse limits, cache, admin) from ``[proxy]``.

    [proxy.pools.crawler]          # a pool per app group exists by default
    servers = "crawler"            # an app group, or a list of "host:port" /
    balance = "least_conn"         #   { address = "host:port", weight = 2, backup = true }

    [[proxy.routes]]               # first match wins; without routes, all goes to pool "app"
    name = "crawlers"
    user_agent = "(?i)googlebot|bingbot"
    pool = "crawler"

    [[proxy.routes]]
    path_prefix = "/static/"
    static = "examples/bookmarks/static"

Match keys: hosts, path_prefix, path_regex, methods, headers (a table of
header name to regex), user_agent, networks. Exactly one action: pool,
static, redirect (with status, default 302) or respond (a status, with body).
A request no route matches is answered 404.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

from tiers.config.address import Address
from tiers.config.proxy import (
    AbuseConfig,
    AdminConfig,
    Balance,
    CacheConfig,
    Match,
    Pool,
    ProxyPolicy,
    Route,
    RouteKind,
    Server,
)
from tiers.config.sections import Section, parse_address

_POLICY_KEYS = {"pools", "routes", "abuse", "cache", "admin", "max_body_size", "request_id"}
_MATCH_KEYS = {"hosts", "path_prefix", "path_regex", "methods", "headers", "user_agent",
               "networks"}
_ACTIONS = ("pool", "static", "redirect", "respond")
_REDIRECTS = (301, 302, 303, 307, 308)


def policy_keys() -> set[str]:
    """Keys of ``[proxy]`` that belong to the policy rather than the listener."""
    return set(_POLICY_KEYS)


def build_policy(s: Section, base: Path, groups: dict[str, list[Address]]) -> ProxyPolicy:
    """The policy from the ``[proxy]`` table; ``groups`` maps app group names to servers."""
    d = ProxyPolicy()
    pools = _build_pools(s.sub("pools"), groups)
    names = {pool.name for pool in pools}
    routes_raw = s.raw.get("routes", [])
    if not isinstance(routes_raw, list):
        raise s.fail("routes", "must be an array of tables ([[proxy.routes]])")
    routes = tuple(
        _build_route(Section(s.source, f"proxy.routes[{index}]", raw), index, base, names)
        for index, raw in enumerate(routes_raw)
    )
    if not routes:
        routes = (Route(name="default", kind=RouteKind.POOL, pool="app"),)
    return ProxyPolicy(
        pools=pools,
        routes=routes,
        abuse=_build_abuse(s.sub("abuse")),
        cache=_build_cache(s.sub("cache")),
        admin=_build_admin(s.sub("admin")),
        max_body_size=s.integer("max_body_size", d.max_body_size, 0),
        request_id=s.get("request_id", bool, d.request_id),
    )


def _build_pools(s: Section, groups: dict[str, list[Address]]) -> tuple[Pool, ...]:
    pools = []
    for name, raw in s.raw.items():
        pools.append(_build_pool(Section(s.source, f"{s.name}.{name}", raw), name, groups))
    defined = {pool.name for pool in pools}
    for name, addresses in groups.items():
        if name not in defined:
            pools.append(Pool(name=name, servers=tuple(Server(a) for a in addresses)))
    return tuple(pools)


def _build_pool(s: Section, name: str, groups: dict[str, list[Address]]) -> Pool:
    d = Pool(name=name, servers=())
    s.check_keys({"servers", "balance", "slow_start", "max_conns", "queue", "queue_timeout",
                  "passive_fall"})
    servers = _build_servers(s, name, groups)
    balance_text = s.get("balance", str, d.balance.value)
    try:
        balance = Balance(balance_text)
    except ValueError:
        known = ", ".join(b.value for b in Balance)
        raise s.fail("balance", f"unknown balance {balance_text!r} (known: {known})") from None
    return Pool(
        name=name,
        servers=servers,
        balance=balance,
        slow_start=s.seconds("slow_start", d.slow_start, low=0.0),
        max_conns=s.integer("max_conns", d.max_conns, 0),
        queue=s.integer("queue", d.queue, 0),
        queue_timeout=s.seconds("queue_timeout", d.queue_timeout),
        passive_fall=s.integer("passive_fall", d.passive_fall, 1),
    )


def _build_servers(s: Section, name: str, groups: dict[str, list[Address]]
                   ) -> tuple[Server, ...]:
    raw = s.raw.get("servers", name if name in groups else None)
    if raw is None:
        raise s.fail("servers", "missing: an app group name or a list of addresses")
    if isinstance(raw, str):
        if raw not in groups:
            raise s.fail("servers", f"no app group named {raw!r} "
                                    f"(groups: {', '.join(sorted(groups))})")
        return tuple(Server(address) for address in groups[raw])
    if not isinstance(raw, list) or not raw:
        raise s.fail("servers", "must be an app group name or a non-empty list")
    servers = []
    for index, item in enumerate(raw):
        key = f"servers[{index}]"
        entry = Section(s.source, f"{s.name}.{key}",
                        {"address": item} if isinstance(item, str) else item)
        entry.check_keys({"address", "weight", "backup"})
        if "address" not in entry.raw:
            raise entry.fail("address", "missing")
        servers.append(Server(
            address=parse_address(entry, "address", Address("", 0)),
            weight=entry.integer("weight", 1, 1, 1000),
            backup=entry.get("backup", bool, False),
        ))
    return tuple(servers)


def _build_route(s: Section, index: int, base: Path, pools: set[str]) -> Route:
    s.check_keys({"name", "strip_prefix", "status", "body", "cache", "cache_private_requests"}
                 | _MATCH_KEYS | set(_ACTIONS))
    actions = [a for a in _ACTIONS if a in s.raw]
    if len(actions) != 1:
        raise s.fail("-", f"needs exactly one of {', '.join(_ACTIONS)} (got {len(actions)})")
    action = actions[0]
    common: dict[str, Any] = {
        "name": s.get("name", str, f"route{index}"),
        "match": _build_match(s),
        "cache": s.get("cache", bool, True),
        "cache_private_requests": s.get("cache_private_requests", bool, False),
    }
    if action == "pool":
        pool = s.get("pool", str, "")
        if pool not in pools:
            raise s.fail("pool", f"no pool named {pool!r} (pools: {', '.join(sorted(pools))})")
        return Route(kind=RouteKind.POOL, pool=pool, **common)
    if action == "static":
        root = Path(s.get("static", str, ""))
        root = root if root.is_absolute() else (base / root).resolve()
        if not root.is_dir():
            raise s.fail("static", f"{root} is not a directory")
        return Route(kind=RouteKind.STATIC, root=root,
                     strip_prefix=s.get("strip_prefix", bool, True), **common)
    if action == "redirect":
        status = s.integer("status", 302, 300, 399)
        if status not in _REDIRECTS:
            raise s.fail("status", f"a redirect needs one of {_REDIRECTS}, got {status}")
        return Route(kind=RouteKind.REDIRECT, location=s.get("redirect", str, ""),
                     status=status, **common)
    return Route(kind=RouteKind.RESPOND, status=s.integer("respond", 200, 200, 599),
                 body=s.get("body", str, ""), **common)


def _build_match(s: Section) -> Match:
    path_prefix = s.get("path_prefix", str, None)
    if path_prefix is not None and not path_prefix.startswith("/"):
        raise s.fail("path_prefix", "must start with '/'")
    headers_raw = s.get("headers", dict, {})
    headers = []
    for name, pattern in headers_raw.items():
        if not isinstance(pattern, str):
            raise s.fail(f"headers.{name}", "must be a regular expression string")
        _check_regex(s, f"headers.{name}", pattern)
        headers.append((name.lower(), pattern))
    for key in ("path_regex", "user_agent"):
        if key in s.raw:
            _check_regex(s, key, s.get(key, str, ""))
    networks = s.strings("networks")
    _check_networks(s, "networks", networks)
    return Match(
        hosts=tuple(h.lower() for h in s.strings("hosts")),
        path_prefix=path_prefix,
        path_regex=s.get("path_regex", str, None),
        methods=tuple(m.upper() for m in s.strings("methods")),
        headers=tuple(headers),
        user_agent=s.get("user_agent", str, None),
        networks=networks,
    )


def _build_abuse(s: Section) -> AbuseConfig:
    d = AbuseConfig()
    s.check_keys({"rate", "burst", "block_for", "exempt_networks", "deny_networks",
                  "deny_user_agents"})
    exempt = s.strings("exempt_networks", d.exempt_networks)
    deny = s.strings("deny_networks")
    _check_networks(s, "exempt_networks", exempt)
    _check_networks(s, "deny_networks", deny)
    agents = s.strings("deny_user_agents")
    for index, pattern in enumerate(agents):
        _check_regex(s, f"deny_user_agents[{index}]", pattern)
    return AbuseConfig(
        rate=s.get("rate", (int, float), d.rate),
        burst=s.integer("burst", d.burst, 1),
        block_for=s.seconds("block_for", d.block_for, low=0.0),
        exempt_networks=exempt,
        deny_networks=deny,
        deny_user_agents=agents,
    )


def _build_cache(s: Section) -> CacheConfig:
    d = CacheConfig()
    s.check_keys({"enabled", "memory", "max_object", "stale_while_revalidate",
                  "stale_if_error"})
    return CacheConfig(
        enabled=s.get("enabled", bool, d.enabled),
        memory=s.integer("memory", d.memory, 0),
        max_object=s.integer("max_object", d.max_object, 0),
        stale_while_revalidate=s.seconds("stale_while_revalidate", d.stale_while_revalidate,
                                         low=0.0),
        stale_if_error=s.seconds("stale_if_error", d.stale_if_error, low=0.0),
    )


def _build_admin(s: Section) -> AdminConfig:
    d = AdminConfig()
    s.check_keys({"listen", "token"})
    listen: Address | None = d.listen
    if s.raw.get("listen") is False:
        listen = None
    elif "listen" in s.raw:
        listen = parse_address(s, "listen", Address("", 0))
    token = s.get("token", str, None)
    if token is not None and len(token) < 16:
        raise s.fail("token", "must be at least 16 characters")
    return AdminConfig(listen=listen, token=token)


def _check_regex(s: Section, key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise s.fail(key, f"not a valid regular expression: {exc}") from None


def _check_networks(s: Section, key: str, networks: tuple[str, ...]) -> None:
    for network in networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError as exc:
            raise s.fail(key, f"not a network: {exc}") from None
