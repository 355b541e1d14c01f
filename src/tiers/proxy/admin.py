"""The admin listener: status JSON, Prometheus metrics and cache purge, behind a token.

    GET  /status                  JSON: pools and servers, cache, abuse limits, connections
    GET  /metrics                 Prometheus text exposition format 0.0.4
    POST /cache/purge?url=PREFIX  drop cached pages whose key starts with PREFIX

Every request needs ``Authorization: Bearer <token>`` (401 otherwise); the
token is compared in constant time. The listener binds loopback by default
and serves one request per connection: it is for operators and scrapers, not
for traffic, so it stays small and never shares the request path's code
beyond the request parser.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiers.config.address import Address
from tiers.errors import ProxyError
from tiers.proxy.requestparser import RequestError, RequestHead, RequestParser

log = logging.getLogger("tiers.proxy")

_READ_TIMEOUT = 5.0
_MAX_HEAD = 16 * 1024


@dataclass(frozen=True)
class Metric:
    """One metric family: a name, its type (counter or gauge), help, and labelled samples."""

    name: str
    kind: str
    help: str
    samples: Sequence[tuple[dict[str, str], float]] = field(default_factory=list)


def render_metrics(metrics: Sequence[Metric]) -> bytes:
    """The Prometheus text format of ``metrics``."""
    lines: list[str] = []
    for metric in metrics:
        lines.append(f"# HELP {metric.name} {metric.help}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for labels, value in metric.samples:
            if labels:
                text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
                lines.append(f"{metric.name}{{{text}}} {_number(value)}")
            else:
                lines.append(f"{metric.name} {_number(value)}")
    return ("\n".join(lines) + "\n").encode()


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def load_or_create_token(configured: str | None, token_file: str | None) -> str:
    """The configured token, else a new random one (written to ``token_file``, mode 0600)."""
    if configured is not None:
        return configured
    token = secrets.token_urlsafe(24)
    if token_file is not None:
        path = Path(token_file)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(token + "\n")
            os.chmod(path, 0o600)
        except OSError as exc:
            raise ProxyError(f"cannot write admin token to {path}: {exc}") from exc
    return token


@dataclass
class AdminHandlers:
    """What the admin endpoints read from the running proxy (they may ask other workers)."""

    status: Callable[[], Awaitable[dict[str, Any]]]
    metrics: Callable[[], Awaitable[list[Metric]]]
    purge: Callable[[str], Awaitable[int]] | None = None


class AdminServer:
    """A token-protected HTTP listener for operators."""

    def __init__(self, listen: Address, token: str, handlers: AdminHandlers) -> None:
        self.listen = listen
        self._token = f"Bearer {token}".encode()
        self._handlers = handlers
        self._server: asyncio.AbstractServer | None = None
        self.address: tuple[str, int] = (listen.host, listen.port)

    async def start(self) -> None:
        """Bind and serve; raises ProxyError when the address cannot be bound."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.listen.host, self.listen.port, reuse_address=True)
        except OSError as exc:
            raise ProxyError(f"cannot listen for admin on {self.listen}: {exc}") from exc
        sockname = self._server.sockets[0].getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(_read_head(reader), _READ_TIMEOUT)
            if head is None:
                status, body, ctype = 400, b"bad request\n", "text/plain"
            else:
                status, body, ctype = await self._answer(head)
            extra = 'WWW-Authenticate: Bearer realm="tiers"\r\n' if status == 401 else ""
            head_text = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                         f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"Cache-Control: no-store\r\nConnection: close\r\n{extra}\r\n")
            writer.write(head_text.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        except Exception as exc:  # an admin bug must not take the proxy down
            log.error("admin: unexpected %s: %s", type(exc).__name__, exc)
        finally:
            writer.close()

    async def _answer(self, head: RequestHead) -> tuple[int, bytes, str]:
        supplied = next((v for k, v in head.headers if k.lower() == b"authorization"), b"")
        if not hmac.compare_digest(supplied, self._token):
            return 401, b"unauthorized\n", "text/plain"
        path, _, query = head.target.decode("latin-1").partition("?")
        method = head.method
        if path == "/status" and method in (b"GET", b"HEAD"):
            body = json.dumps(await self._handlers.status(), indent=2).encode() + b"\n"
            return 200, body, "application/json"
        if path == "/metrics" and method in (b"GET", b"HEAD"):
            return 200, render_metrics(await self._handlers.metrics()), \
                "text/plain; version=0.0.4; charset=utf-8"
        if path == "/cache/purge" and method == b"POST":
            if self._handlers.purge is None:
                return 404, b"no page cache\n", "text/plain"
            prefix = urllib.parse.parse_qs(query).get("url", [""])[0]
            if not prefix:
                return 400, b"give ?url=PREFIX (a cache key prefix: host + path)\n", \
                    "text/plain"
            try:
                count = await self._handlers.purge(prefix)
            except ProxyError as exc:
                return 503, f"{exc}\n".encode(), "text/plain"
            return 200, json.dumps({"purged": count}).encode() + b"\n", "application/json"
        if path in ("/status", "/metrics", "/cache/purge"):
            return 405, b"method not allowed\n", "text/plain"
        return 404, b"not found\n", "text/plain"


async def _read_head(reader: asyncio.StreamReader) -> RequestHead | None:
    parser = RequestParser()
    received = 0
    while True:
        data = await reader.read(4096)
        if not data:
            return None
        received += len(data)
        if received > _MAX_HEAD:
            return None
        for event in parser.feed(data):
            if isinstance(event, RequestHead):
                return event
            if isinstance(event, RequestError):
                return None


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 503: "Service Unavailable"}
