"""[proxy] policy in tiers.toml: pools from app groups, routes, abuse, cache, admin."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiers.config.address import Address
from tiers.config.loader import parse_topology
from tiers.config.proxy import Balance, RouteKind, Server
from tiers.errors import ConfigError

GROUPS = """
[app]
port = 9001
[app.groups.crawler]
count = 1
port = 9101
workers = 1
"""


def test_defaults_route_everything_to_the_main_group() -> None:
    policy = parse_topology("").proxy.policy
    assert [p.name for p in policy.pools] == ["app"]
    assert policy.pools[0].servers == (Server(Address("127.0.0.1", 8401)),
                                       Server(Address("127.0.0.1", 8402)))
    assert len(policy.routes) == 1
    assert policy.routes[0].kind is RouteKind.POOL and policy.routes[0].pool == "app"
    assert policy.admin.listen == Address("127.0.0.1", 8409)


def test_app_groups_get_their_own_servers_and_pools() -> None:
    topology = parse_topology(GROUPS)
    (crawler,) = topology.app_groups
    assert crawler.name == "crawler" and crawler.ports == (9101,) and crawler.workers == 1
    assert crawler.app == topology.app.app  # shared settings
    assert crawler.service_names() == ["crawler1"]
    pools = {p.name: p for p in topology.proxy.policy.pools}
    assert pools["crawler"].servers == (Server(Address("127.0.0.1", 9101)),)


def test_routes_pools_and_sections(tmp_path: Path) -> None:
    (tmp_path / "static").mkdir()
    text = GROUPS + """
[proxy]
listen = "127.0.0.1:7000"
max_body_size = 1024

[proxy.pools.web]
servers = ["127.0.0.1:9500", { address = "127.0.0.1:9501", weight = 3, backup = true }]
balance = "uri_hash"
slow_start = 5

[[proxy.routes]]
name = "crawlers"
user_agent = "(?i)googlebot"
pool = "crawler"

[[proxy.routes]]
path_prefix = "/static/"
static = "static"

[[proxy.routes]]
hosts = ["old.example.com"]
redirect = "https://example.com$uri"
status = 301

[[proxy.routes]]
networks = ["10.0.0.0/8"]
methods = ["post"]
headers = { "X-Debug" = "^1$" }
respond = 403
body = "no"

[[proxy.routes]]
pool = "web"

[proxy.abuse]
rate = 10
burst = 20
deny_user_agents = ["(?i)badbot"]

[proxy.cache]
memory = 1000000
stale_if_error = 30

[proxy.admin]
token = "0123456789abcdef0123"
"""
    policy = parse_topology(text, base=tmp_path).proxy.policy
    web = policy.pool("web")
    assert web.balance is Balance.URI_HASH and web.slow_start == 5.0
    assert web.servers[1] == Server(Address("127.0.0.1", 9501), weight=3, backup=True)
    kinds = [r.kind for r in policy.routes]
    assert kinds == [RouteKind.POOL, RouteKind.STATIC, RouteKind.REDIRECT, RouteKind.RESPOND,
                     RouteKind.POOL]
    assert policy.routes[1].root == (tmp_path / "static").resolve()
    assert policy.routes[2].status == 301 and policy.routes[2].match.hosts == ("old.example.com",)
    respond = policy.routes[3]
    assert respond.status == 403 and respond.match.methods == ("POST",)
    assert respond.match.headers == (("x-debug", "^1$"),)
    assert policy.abuse.rate == 10 and policy.abuse.deny_user_agents == ("(?i)badbot",)
    assert policy.cache.stale_if_error == 30.0
    assert policy.admin.listen == Address("127.0.0.1", 7009)  # proxy port + 9
    assert policy.max_body_size == 1024


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[[proxy.routes]]\npool = 'nope'\n", "proxy.routes[0].pool", "no pool named 'nope'"),
        ("[[proxy.routes]]\npath_prefix = '/x'\n", "proxy.routes[0].-", "exactly one of"),
        ("[[proxy.routes]]\npool = 'app'\nstatic = '.'\n", "proxy.routes[0].-", "exactly one"),
        ("[[proxy.routes]]\nuser_agent = '(('\npool = 'app'\n", "proxy.routes[0].user_agent",
         "not a valid regular expression"),
        ("[[proxy.routes]]\nnetworks = ['10.0.0.300/8']\npool = 'app'\n",
         "proxy.routes[0].networks", "not a network"),
        ("[[proxy.routes]]\nredirect = '/x'\nstatus = 200\n", "proxy.routes[0].status",
         "between 300 and 399"),
        ("[[proxy.routes]]\nstatic = 'no/such/dir'\n", "proxy.routes[0].static",
         "is not a directory"),
        ("[[proxy.routes]]\npath_prefix = 'x'\npool = 'app'\n", "proxy.routes[0].path_prefix",
         "must start with '/'"),
        ("[proxy.pools.web]\nservers = 'ghost'\n", "proxy.pools.web.servers",
         "no app group named 'ghost'"),
        ("[proxy.pools.web]\nservers = []\n", "proxy.pools.web.servers", "non-empty"),
        ("[proxy.pools.web]\nservers = ['x:1']\nbalance = 'random'\n",
         "proxy.pools.web.balance", "unknown balance"),
        ("[proxy.abuse]\ndeny_networks = ['nonsense']\n", "proxy.abuse.deny_networks",
         "not a network"),
        ("[proxy.admin]\ntoken = 'short'\n", "proxy.admin.token", "at least 16"),
        ("[proxy.cache]\nsize = 1\n", "proxy.cache.size", "unknown key"),
        ("[proxy]\nroutez = 1\n", "proxy.routez", "unknown key"),
        ("[app.groups.app]\nport = 9100\n", "app.groups.app.-", "lower-case identifier"),
        ("[app.groups.crawler]\ncount = 1\n", "app.groups.crawler.port", "its own"),
        ("[app.groups.crawler]\nport = 8402\n", "app.groups.crawler.ports", "already used"),
        ("[proxy]\nlisten = '127.0.0.1:8392'\n", "proxy.admin.listen", "already used"),
    ],
)
def test_policy_mistakes_name_the_key(text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_topology(text, source="tiers.toml")
    assert caught.value.key == key
    assert reason in caught.value.reason


def test_admin_can_be_disabled() -> None:
    policy = parse_topology("[proxy.admin]\nlisten = false\n").proxy.policy
    assert policy.admin.listen is None
