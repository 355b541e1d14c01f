"""examples/bookmarks/tiers.toml: the demo topology loads with its crawler group, pools and
routes, its crawler pattern is routing.CRAWLER_USER_AGENTS, and what its static routes serve
is what the pages link."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from bookmarks.app import create_app
from bookmarks.memory import MemoryStore

from tiers.config import load_topology
from tiers.config.model import Address, Topology
from tiers.config.proxy import Route, RouteKind, Server
from tiers.proxy.routing import CRAWLER_USER_AGENTS, Router

DEMO = Path(__file__).resolve().parents[3] / "examples" / "bookmarks"
DEMO_FILE = DEMO / "tiers.toml"
BROWSER = b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
GOOGLEBOT = b"Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"


@pytest.fixture(scope="module")
def topology() -> Topology:
    return load_topology(DEMO_FILE)


@pytest.fixture(scope="module")
def router(topology: Topology) -> Router:
    return Router.compile(topology.proxy.policy.routes)


def routes_by_name(topology: Topology) -> dict[str, Route]:
    return {route.name: route for route in topology.proxy.policy.routes}


def test_the_crawler_pattern_is_the_one_routing_defines() -> None:
    raw = tomllib.loads(DEMO_FILE.read_text(encoding="utf-8"))
    (crawlers,) = [r for r in raw["proxy"]["routes"] if r.get("name") == "crawlers"]
    assert crawlers["user_agent"] == CRAWLER_USER_AGENTS


def test_groups_two_app_servers_and_one_single_worker_crawler_server(
        topology: Topology) -> None:
    assert topology.app.name == "app"
    assert topology.app.service_names() == ["app1", "app2"]
    assert topology.app.app == "bookmarks.app:app"
    assert topology.app.pythonpath == (DEMO.parent,)
    assert topology.app.migrations == DEMO / "migrations"
    (crawler,) = topology.app_groups
    assert crawler.name == "crawler"
    assert crawler.service_names() == ["crawler1"]
    assert crawler.workers == 1
    # The crawler server runs the same site as the others.
    assert (crawler.app, crawler.pythonpath, crawler.migrations) == (
        topology.app.app, topology.app.pythonpath, topology.app.migrations)


def test_pools_follow_the_groups(topology: Topology) -> None:
    pools = {pool.name: pool for pool in topology.proxy.policy.pools}
    assert set(pools) == {"app", "crawler"}
    assert pools["app"].servers == tuple(Server(a) for a in topology.app.addresses())
    (crawler,) = topology.app_groups
    assert pools["crawler"].servers == (Server(Address("127.0.0.1", crawler.ports[0])),)


def test_routes_files_first_then_crawlers_then_everyone(topology: Topology) -> None:
    routes = topology.proxy.policy.routes
    assert [route.name for route in routes] == ["static", "robots", "crawlers", "default"]
    static, robots, crawlers, default = routes
    assert static.kind is RouteKind.STATIC and static.root == DEMO / "static"
    assert static.match.path_prefix == "/static/" and static.strip_prefix
    assert robots.kind is RouteKind.STATIC and robots.root == DEMO / "static"
    assert robots.match.path_regex == r"^/robots\.txt$" and not robots.strip_prefix
    assert crawlers.kind is RouteKind.POOL and crawlers.pool == "crawler"
    assert crawlers.match.user_agent == CRAWLER_USER_AGENTS
    assert default.kind is RouteKind.POOL and default.pool == "app"
    assert default.match == type(default.match)()  # matches everything


def test_the_default_ports_are_those_of_a_plain_up_plus_one_for_crawlers(
        topology: Topology) -> None:
    plain = load_topology(None, cwd=DEMO.parent)  # no tiers.toml there: the defaults
    assert topology.proxy.listen == plain.proxy.listen
    assert topology.proxy.policy.admin.listen == plain.proxy.policy.admin.listen
    assert topology.app.ports == plain.app.ports
    assert topology.db.ports == plain.db.ports
    (crawler,) = topology.app_groups
    taken = {topology.proxy.listen.port, *topology.app.ports, *topology.db.ports}
    assert crawler.ports[0] not in taken


@pytest.mark.parametrize(
    ("path", "user_agent", "route"),
    [
        (b"/", GOOGLEBOT, "crawlers"),
        (b"/entry/1", b"Mozilla/5.0 (compatible; bingbot/2.0)", "crawlers"),
        (b"/", BROWSER, "default"),
        (b"/", None, "default"),
        (b"/static/style.css", BROWSER, "static"),
        (b"/static/style.css", GOOGLEBOT, "static"),
        (b"/robots.txt", GOOGLEBOT, "robots"),
        (b"/robots.txt?x=1", BROWSER, "robots"),
        (b"/robots.txt.bak", BROWSER, "default"),
        (b"/staticfoo", BROWSER, "default"),
    ],
)
def test_requests_take_the_route_the_demo_means(
        router: Router, path: bytes, user_agent: bytes | None, route: str) -> None:
    headers = [(b"Host", b"127.0.0.1:8400")]
    if user_agent is not None:
        headers.append((b"User-Agent", user_agent))
    rule = router.route(b"GET", b"127.0.0.1:8400", path, headers, b"127.0.0.1",
                        user_agent=user_agent)
    assert rule is not None and rule.name == route


def test_every_file_the_pages_link_is_served_by_a_static_route(router: Router) -> None:
    app = create_app(MemoryStore())
    app.testing = True
    page = app.test_client().get("/").get_data(as_text=True)
    assert "<style" not in page
    links = re.findall(r'<link [^>]*href="([^"]+)"', page)
    assert "/static/style.css" in links and "/static/favicon.svg" in links
    for link in [*links, "/robots.txt"]:
        rule = router.route(b"GET", None, link.encode(), [], b"127.0.0.1", user_agent=BROWSER)
        assert rule is not None and rule.kind is RouteKind.STATIC, link
        assert rule.root is not None
        relative = rule.static_path(link.encode())
        assert relative is not None and (rule.root / relative).is_file(), link


def test_without_the_proxy_routes_flask_serves_the_stylesheet_too() -> None:
    # A plain `tiers up` sends /static/ to the app servers: the pages must still be styled.
    app = create_app(MemoryStore())
    app.testing = True
    response = app.test_client().get("/static/style.css")
    assert response.status_code == 200
    assert response.mimetype == "text/css"
    assert response.get_data() == (DEMO / "static" / "style.css").read_bytes()
    response.close()
