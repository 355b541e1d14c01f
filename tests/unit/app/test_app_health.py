from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tiers.app.health import HEALTH_PATH, HealthMiddleware


class Recorder:
    """A WSGI app that records that it was called."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        self.calls += 1
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"app"]


def call(app: Any, method: str, path: str) -> tuple[str, list[tuple[str, str]], bytes]:
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = status, headers

    body = b"".join(app({"REQUEST_METHOD": method, "PATH_INFO": path}, start_response))
    return seen["status"], seen["headers"], body


def test_get_health_is_answered_without_calling_the_app() -> None:
    inner = Recorder()
    status, headers, body = call(HealthMiddleware(inner), "GET", HEALTH_PATH)
    assert (status, body) == ("200 OK", b"ok")
    assert ("Content-Length", "2") in headers
    assert ("Cache-Control", "no-store") in headers
    assert inner.calls == 0


def test_head_health_has_no_body() -> None:
    inner = Recorder()
    status, _, body = call(HealthMiddleware(inner), "HEAD", HEALTH_PATH)
    assert (status, body) == ("200 OK", b"")
    assert inner.calls == 0


def test_other_paths_and_methods_go_to_the_app() -> None:
    inner = Recorder()
    middleware = HealthMiddleware(inner)
    assert call(middleware, "GET", "/")[2] == b"app"
    assert call(middleware, "GET", HEALTH_PATH + "/x")[2] == b"app"
    assert call(middleware, "POST", HEALTH_PATH)[2] == b"app"
    assert inner.calls == 3


def test_path_is_configurable() -> None:
    inner = Recorder()
    middleware = HealthMiddleware(inner, path="/ping")
    assert call(middleware, "GET", "/ping")[2] == b"ok"
    assert call(middleware, "GET", HEALTH_PATH)[2] == b"app"
