from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from tiers.app.health import HEALTH_PATH
from tiers.app.metrics import (
    CONTENT_TYPE,
    METRICS_PATH,
    Family,
    MetricsMiddleware,
    is_loopback,
    local_request,
    render,
)
from tiers.app.server import ServerOptions, wrap
from tiers.cache.cluster import CacheCluster
from tiers.cache.fake import FakeNodes
from tiers.cache.ring import NodeSpec
from tiers.errors import ConfigError

NODES = [NodeSpec("127.0.0.1", 1), NodeSpec("127.0.0.1", 2)]


class Recorder:
    """A WSGI app that records that it was called."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        self.calls += 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"app"]


def call(app: Any, path: str = METRICS_PATH, method: str = "GET",
         **extra: str) -> tuple[str, dict[str, str], str]:
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "REMOTE_ADDR": "127.0.0.1",
               **extra}
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = status, dict(headers)

    body = b"".join(app(environ, start_response)).decode()
    return seen["status"], seen["headers"], body


def samples(text: str) -> dict[str, float]:
    """Every sample line as 'name{labels}' -> value."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


@pytest.fixture
def nodes() -> FakeNodes:
    return FakeNodes()


@pytest.fixture
def cluster(nodes: FakeNodes) -> Iterator[CacheCluster]:
    with CacheCluster(NODES, nodes) as cluster:
        yield cluster


def test_render_writes_the_text_format() -> None:
    family = Family("x_seconds", "histogram", "A histogram.", [
        ("_bucket", {"node": 'a"b\\c', "le": "0.5"}, 2.0),
        ("_bucket", {"node": 'a"b\\c', "le": "+Inf"}, 3.0),
        ("_sum", {"node": 'a"b\\c'}, 0.75),
        ("_count", {}, 3.0),
    ])
    assert render([family]).decode().splitlines() == [
        "# HELP x_seconds A histogram.",
        "# TYPE x_seconds histogram",
        'x_seconds_bucket{node="a\\"b\\\\c",le="0.5"} 2',
        'x_seconds_bucket{node="a\\"b\\\\c",le="+Inf"} 3',
        'x_seconds_sum{node="a\\"b\\\\c"} 0.75',
        "x_seconds_count 3",
    ]
    assert render([]) == b""


def test_metrics_show_each_nodes_counters_for_this_worker(cluster: CacheCluster,
                                                          nodes: FakeNodes) -> None:
    keys = [f"key{n}" for n in range(20)]
    for key in keys[:10]:
        cluster.set(key, "v")
    assert len(cluster.get_many(keys)) == 10
    app = MetricsMiddleware(Recorder(), server="app1", cache=lambda: cluster)
    status, headers, body = call(app)
    assert status == "200 OK"
    assert headers["Content-Type"] == CONTENT_TYPE
    assert headers["Cache-Control"] == "no-store"
    found = samples(body)
    pid = os.getpid()
    assert found[f'tiers_app_worker_info{{server="app1",worker="{pid}"}}'] == 1
    hits = misses = 0.0
    for node in NODES:
        labels = f'server="app1",worker="{pid}",pool="nodes",node="{node.address}"'
        hits += found[f"tiers_cache_hits_total{{{labels}}}"]
        misses += found[f"tiers_cache_misses_total{{{labels}}}"]
        assert found[f"tiers_cache_errors_total{{{labels}}}"] == 0
        assert found[f"tiers_cache_ejections_total{{{labels}}}"] == 0
        assert found[f'tiers_cache_node_state{{{labels},state="up"}}'] == 1
        assert found[f'tiers_cache_node_state{{{labels},state="ejected"}}'] == 0
        count = found[f"tiers_cache_request_duration_seconds_count{{{labels}}}"]
        assert found[f'tiers_cache_request_duration_seconds_bucket{{{labels},le="+Inf"}}'] \
            == count
        assert f"tiers_cache_request_duration_seconds_sum{{{labels}}}" in found
    assert (hits, misses) == (10, 10)
    assert "# TYPE tiers_cache_request_duration_seconds histogram" in body


def test_an_ejected_node_shows_its_state_and_errors(cluster: CacheCluster,
                                                    nodes: FakeNodes) -> None:
    dead = NODES[0]
    nodes.kill(dead)
    for n in range(40):
        cluster.get(f"key{n}")
    body = call(MetricsMiddleware(Recorder(), server="app1", cache=lambda: cluster))[2]
    found = samples(body)
    labels = f'server="app1",worker="{os.getpid()}",pool="nodes",node="{dead.address}"'
    assert found[f"tiers_cache_ejections_total{{{labels}}}"] == 1
    assert found[f"tiers_cache_errors_total{{{labels}}}"] >= 2
    assert found[f'tiers_cache_node_state{{{labels},state="ejected"}}'] == 1
    assert found[f'tiers_cache_node_state{{{labels},state="up"}}'] == 0


def test_without_a_cache_only_the_worker_is_shown() -> None:
    body = call(MetricsMiddleware(Recorder(), server="app1", cache=lambda: None))[2]
    assert list(samples(body)) == [f'tiers_app_worker_info{{server="app1",worker="{os.getpid()}"}}']


def test_a_cache_that_cannot_be_built_is_a_comment_not_an_error() -> None:
    def broken() -> CacheCluster | None:
        raise ConfigError("environment", "TIERS_CACHE_NODES", "entry 'x:y': bad port")

    status, _, body = call(MetricsMiddleware(Recorder(), cache=broken))
    assert status == "200 OK"
    assert "# cache unavailable: environment: TIERS_CACHE_NODES: entry 'x:y'" in body
    assert "tiers_app_worker_info" in body


@pytest.mark.parametrize("extra", [
    {"HTTP_X_FORWARDED_FOR": "127.0.0.1"},  # what the proxy adds to every request
    {"HTTP_FORWARDED": "for=127.0.0.1"},
    {"REMOTE_ADDR": "10.0.0.5"},
    {"REMOTE_ADDR": "::ffff:10.0.0.5"},
    {"REMOTE_ADDR": ""},
])
def test_only_local_unforwarded_requests_are_answered(extra: dict[str, str]) -> None:
    inner = Recorder()
    status, _, body = call(MetricsMiddleware(inner, cache=lambda: None), **extra)
    assert (status, body) == ("404 Not Found", "not found\n")
    assert inner.calls == 0  # the app never sees the path either


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.1", "::1", "::ffff:127.0.0.1"])
def test_loopback_peers_are_local(address: str) -> None:
    assert is_loopback(address)
    assert local_request({"REMOTE_ADDR": address})
    assert not local_request({"REMOTE_ADDR": address, "HTTP_X_FORWARDED_FOR": "1.2.3.4"})


@pytest.mark.parametrize("address", ["10.1.1.1", "::2", "localhost", "", None, 7])
def test_other_peers_are_not(address: object) -> None:
    assert not is_loopback(address)


def test_other_methods_are_405_and_head_has_no_body() -> None:
    app = MetricsMiddleware(Recorder(), cache=lambda: None)
    status, headers, _ = call(app, method="POST")
    assert status == "405 Method Not Allowed" and headers["Allow"] == "GET, HEAD"
    status, headers, body = call(app, method="HEAD")
    assert status == "200 OK" and body == "" and int(headers["Content-Length"]) > 0


def test_other_paths_reach_the_app() -> None:
    inner = Recorder()
    status, _, body = call(MetricsMiddleware(inner, cache=lambda: None), path="/")
    assert (status, body, inner.calls) == ("200 OK", "app", 1)


def test_the_server_answers_health_and_metrics_before_the_app(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIERS_CACHE_NODES", raising=False)
    inner = Recorder()
    app = wrap(ServerOptions(name="app7", host="127.0.0.1", port=1, app="x:y"), inner)
    assert call(app, path=HEALTH_PATH)[2] == "ok"
    body = call(app)[2]
    assert re.search(r'tiers_app_worker_info\{server="app7",worker="\d+"\} 1', body)
    assert call(app, HTTP_X_FORWARDED_FOR="127.0.0.1")[0] == "404 Not Found"
    assert inner.calls == 0
