"""The demo topology (examples/bookmarks/tiers.toml) run for real on ephemeral ports:
crawlers reach only the crawler server, people only the main app servers, and the
stylesheet and robots.txt come from disk through the proxy, never from an app server."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import tempfile
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.stackctl import StackHandle, free_ports, tear_down
from tiers.proxy.accesslog import parse_line

DEMO = Path(__file__).resolve().parents[2] / "examples" / "bookmarks"
DEMO_FILE = DEMO / "tiers.toml"
BROWSER = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
BINGBOT = "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)"
LOG_WAIT = 5.0  # the access log is flushed at least every second


# ---- a copy of the demo file on ephemeral ports ------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string without \u escapes of surrogates is a TOML basic string.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def to_toml(table: dict[str, Any], path: tuple[str, ...] = ()) -> str:
    """``table`` as TOML text: scalars first, then sub-tables, then arrays of tables."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()
             if not isinstance(v, dict) and not _is_table_array(v)]
    out = "\n".join(lines) + "\n" if lines else ""
    for key, value in table.items():
        name = ".".join(_toml_key(part) for part in (*path, key))
        if isinstance(value, dict):
            out += f"\n[{name}]\n" + to_toml(value, (*path, key))
        elif _is_table_array(value):
            for item in value:
                out += f"\n[[{name}]]\n" + to_toml(item, (*path, key))
    return out


def demo_on_free_ports(root: Path) -> StackHandle:
    """Write ``root/tiers.toml``: the demo file with every port free and every path absolute."""
    raw = tomllib.loads(DEMO_FILE.read_text(encoding="utf-8"))
    proxy, app, db = raw["proxy"], raw["app"], raw["db"]
    groups = app.get("groups", {})
    app_count = app.get("count", 2)
    group_counts = {name: group.get("count", 1) for name, group in groups.items()}
    db_count = db.get("replicas", 1) + 1
    ports = free_ports(2 + app_count + sum(group_counts.values()) + db_count)
    proxy_port, admin_port = ports.pop(), ports.pop()

    proxy["listen"] = f"127.0.0.1:{proxy_port}"
    proxy.setdefault("admin", {})["listen"] = f"127.0.0.1:{admin_port}"
    app.pop("port", None)
    app["ports"] = app_ports = [ports.pop() for _ in range(app_count)]
    for name, group in groups.items():
        group.pop("port", None)
        group["ports"] = [ports.pop() for _ in range(group_counts[name])]
    db.pop("port", None)
    db["ports"] = db_ports = [ports.pop() for _ in range(db_count)]

    # The copy lives elsewhere: what was relative to the demo's directory becomes absolute.
    def absolute(text: str) -> str:
        return str((DEMO / text).resolve())

    app["pythonpath"] = [absolute(entry) for entry in app.get("pythonpath", [])]
    if app.get("migrations"):
        app["migrations"] = absolute(app["migrations"])
    for route in proxy["routes"]:
        if "static" in route:
            route["static"] = absolute(route["static"])

    text = to_toml(raw)
    assert tomllib.loads(text) == raw  # the writer lost nothing
    handle = StackHandle(root=root, proxy_port=proxy_port, app_ports=app_ports,
                         db_ports=db_ports, admin_port=admin_port)
    handle.topology.write_text(text, encoding="utf-8")
    return handle


# ---- requests and the access log ---------------------------------------------------


def get(handle: StackHandle, path: str, user_agent: str,
        **headers: str) -> tuple[int, http.client.HTTPMessage, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", handle.proxy_port, timeout=10)
    try:
        connection.request("GET", path, headers={"User-Agent": user_agent, **headers})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def probe_path(path: str) -> str:
    """``path`` with a query no other request carries, to find its access log line."""
    return f"{path}?probe={uuid.uuid4().hex}"


def logged(handle: StackHandle, uri: str) -> dict[str, str]:
    """The access log record of the one request for ``uri``, once it is flushed."""
    access_log = handle.state_dir / "logs" / "access.log"
    found: list[dict[str, str]] = []

    def flushed() -> bool:
        if not access_log.exists():
            return False
        found[:] = []
        for line in access_log.read_bytes().splitlines():
            record = {k: v.decode() for k, v in parse_line(line).items()}
            if record.get("uri") == uri:
                found.append(record)
        return bool(found)

    handle.wait_for(flushed, LOG_WAIT, f"the access log line of {uri}")
    assert len(found) == 1, found
    return found[0]


# ---- the stack ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_stack() -> Iterator[StackHandle]:
    root = Path(tempfile.mkdtemp(prefix="tiers-demo-"))
    root.chmod(0o755)  # PostgreSQL runs as its own user when the tests run as root
    handle = None
    try:
        handle = demo_on_free_ports(root)
        handle.tiers("up", "-d")
        yield handle
    finally:
        if handle is not None:
            tear_down(handle)
        shutil.rmtree(root, ignore_errors=True)


def address_of(handle: StackHandle, service: str) -> str:
    return str(handle.service(service)["address"])


def crawler_port(handle: StackHandle) -> int:
    raw = tomllib.loads(handle.topology.read_text(encoding="utf-8"))
    (port,) = raw["app"]["groups"]["crawler"]["ports"]
    return int(port)


def test_every_service_of_the_demo_is_ready(demo_stack: StackHandle) -> None:
    services = {s["name"]: s for s in demo_stack.status()["services"]}
    assert {"app1", "app2", "crawler1", "proxy", "db-primary"} <= set(services)
    assert [n for n in services if n.startswith(("app", "crawler"))] == [
        "app1", "app2", "crawler1"]
    for service in services.values():
        assert service["state"] == "ready", service
    assert services["crawler1"]["address"] == f"127.0.0.1:{crawler_port(demo_stack)}"


@pytest.mark.parametrize("user_agent", [GOOGLEBOT, BINGBOT])
def test_crawlers_are_served_by_the_crawler_server(demo_stack: StackHandle,
                                                   user_agent: str) -> None:
    crawler = address_of(demo_stack, "crawler1")
    for _ in range(3):
        path = probe_path("/")
        status, headers, body = get(demo_stack, path, user_agent)
        assert status == 200
        assert headers["Content-Type"].startswith("text/html")
        assert b"/static/style.css" in body
        record = logged(demo_stack, path)
        assert (record["route"], record["upstream"]) == ("crawlers", crawler)
        assert record["ua"] == user_agent


def test_people_are_served_by_the_main_app_servers(demo_stack: StackHandle) -> None:
    apps = {address_of(demo_stack, "app1"), address_of(demo_stack, "app2")}
    for _ in range(4):
        path = probe_path("/")
        status, _, body = get(demo_stack, path, BROWSER)
        assert status == 200
        assert b"Hot entries" in body
        record = logged(demo_stack, path)
        assert record["route"] == "default"
        assert record["upstream"] in apps


def test_the_stylesheet_comes_from_disk_with_a_validator(demo_stack: StackHandle) -> None:
    on_disk = (DEMO / "static" / "style.css").read_bytes()
    path = probe_path("/static/style.css")
    status, headers, body = get(demo_stack, path, BROWSER)
    assert status == 200
    assert headers["Content-Type"].split(";")[0].strip() == "text/css"
    assert body == on_disk
    etag = headers["ETag"]
    assert etag
    record = logged(demo_stack, path)
    # No app server saw it: a static answer has no upstream.
    assert (record["route"], record["upstream"], record["status"]) == ("static", "-", "200")

    again = probe_path("/static/style.css")
    status, headers, body = get(demo_stack, again, BROWSER, **{"If-None-Match": etag})
    assert (status, body) == (304, b"")
    assert headers["ETag"] == etag
    record = logged(demo_stack, again)
    assert (record["route"], record["upstream"], record["status"]) == ("static", "-", "304")


def test_crawlers_get_files_from_disk_too(demo_stack: StackHandle) -> None:
    path = probe_path("/static/style.css")
    status, _, _ = get(demo_stack, path, GOOGLEBOT)
    assert status == 200
    record = logged(demo_stack, path)
    assert (record["route"], record["upstream"]) == ("static", "-")


@pytest.mark.parametrize("user_agent", [GOOGLEBOT, BROWSER])
def test_robots_txt_is_served_from_the_static_directory(demo_stack: StackHandle,
                                                        user_agent: str) -> None:
    path = probe_path("/robots.txt")
    status, headers, body = get(demo_stack, path, user_agent)
    assert status == 200
    assert headers["Content-Type"].split(";")[0].strip() == "text/plain"
    assert body == (DEMO / "static" / "robots.txt").read_bytes()
    record = logged(demo_stack, path)
    assert (record["route"], record["upstream"]) == ("robots", "-")


def test_a_missing_static_file_is_404_from_the_proxy(demo_stack: StackHandle) -> None:
    path = probe_path("/static/no-such-file.css")
    status, _, _ = get(demo_stack, path, BROWSER)
    assert status == 404
    record = logged(demo_stack, path)
    assert (record["route"], record["upstream"]) == ("static", "-")
