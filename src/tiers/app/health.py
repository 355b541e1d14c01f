"""The health check answered in front of the app.

The proxy checks every app server many times a second. Answering here, before
the app, keeps the check cheap and independent of the app's own routes and
of the database: it says "this worker accepts and serves HTTP", which is what
the proxy needs to decide whether to send it traffic.
"""

from __future__ import annotations

from collections.abc import Iterable
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

HEALTH_PATH = "/_tiers/health"

_BODY = b"ok"
_HEADERS = [
    ("Content-Type", "text/plain; charset=utf-8"),
    ("Content-Length", str(len(_BODY))),
    # A page cache in front must never answer the check for a dead server.
    ("Cache-Control", "no-store"),
]


class HealthMiddleware:
    """Answer ``GET``/``HEAD`` of ``path`` with 200 ``ok``; pass everything else to ``app``."""

    def __init__(self, app: WSGIApplication, path: str = HEALTH_PATH) -> None:
        self.app = app
        self.path = path

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD")
        if environ.get("PATH_INFO") == self.path and method in ("GET", "HEAD"):
            start_response("200 OK", list(_HEADERS))
            return [] if method == "HEAD" else [_BODY]
        return self.app(environ, start_response)
