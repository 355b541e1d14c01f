"""What the proxy sends on: request heads for backends, response heads for clients.

Pure functions over parsed heads, so every header rule is tested without a
socket. Framing is re-decided at each hop: the codec hands over bodies with
the transfer coding removed, and these functions say how to frame them again.

Hop-by-hop headers (RFC 9110, 7.6.1) are dropped in both directions: the
fixed set below plus every header that a Connection header names.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

from tiers.proxy.heads import JOIN_HEAD
from tiers.proxy.http1 import Framing
from tiers.proxy.requestparser import RequestHead
from tiers.proxy.responseparser import ResponseHead

HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}
)
# Also rebuilt by the proxy itself rather than copied.
_REQUEST_DROP: Final = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"transfer-encoding",
    b"expect",
    b"x-forwarded-for",
    b"x-forwarded-proto",
}
_RESPONSE_DROP: Final = HOP_BY_HOP | {b"content-length", b"transfer-encoding"}

IDEMPOTENT_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"

_CHUNKED: Final = Framing.CHUNKED
_CLOSE: Final = Framing.CLOSE
_NONE: Final = Framing.NONE
_STATUS_LINES: Final = {status: b"HTTP/1.1 %d " % status for status in range(100, 600)}
_PROTO_HTTP: Final = b"X-Forwarded-Proto: http"


def upstream_request_head(
    head: RequestHead,
    client_ip: bytes,
    default_host: bytes,
    proto: bytes = b"http",
    request_id: bytes | None = None,
) -> bytes:
    """The head to send to a backend for ``head``, always as HTTP/1.1 keep-alive.

    Appends ``client_ip`` to X-Forwarded-For (joining repeated headers into
    one list), sets X-Forwarded-Proto, and frames the body with
    Content-Length when the client did, else chunked. A request without Host
    (HTTP/1.0) gets ``default_host``, the backend's own address. A
    ``request_id`` is sent as X-Request-Id unless the request carries one.
    """
    host = head.host if head.host is not None else default_host
    headers = head.headers
    names = head.names
    if not isinstance(names, list) or len(names) != len(headers):
        names = _lower_names(headers)
    named = head.connection
    drop = _REQUEST_DROP if not named or named <= _REQUEST_DROP else _REQUEST_DROP | named
    if request_id is not None and b"x-request-id" in names and b"x-request-id" not in drop:
        request_id = None  # the client's (or an outer proxy's) id travels on
    # Own lines, without their CRLF. The parser joined repeated X-Forwarded-For.
    forwarded = head.forwarded_for
    if forwarded is not None:
        last = [b"X-Forwarded-For: %s, %s" % (forwarded, client_ip)]
    else:
        last = [b"X-Forwarded-For: " + client_ip]
    last.append(_PROTO_HTTP if proto == b"http" else b"X-Forwarded-Proto: " + proto)
    if request_id is not None:
        last.append(b"X-Request-Id: " + request_id)
    if head.framing is _CHUNKED:
        last.append(b"Transfer-Encoding: chunked")
    elif head.content_length is not None:
        last.append(b"Content-Length: %d" % head.content_length)
    return JOIN_HEAD([b"%s %s HTTP/1.1" % (head.method, head.path), b"Host: " + host], names,
                     headers, drop, last)


@dataclass(frozen=True, slots=True)
class ResponsePlan:
    """How to relay one response: re-chunk its body or not, keep the client connection or not."""

    chunked: bool
    keep_alive: bool
    has_body: bool


# Every plan there can be, made once and indexed by its three flags as bits
# (chunked 4, keep_alive 2, has_body 1): deciding a response allocates nothing.
_PLANS: Final = [
    ResponsePlan(chunked, keep_alive, has_body)
    for chunked in (False, True)
    for keep_alive in (False, True)
    for has_body in (False, True)
]


def plan_response(
    request: RequestHead, response: ResponseHead, *, request_body_done: bool, stopping: bool
) -> ResponsePlan:
    """Decide the client-side framing of ``response``.

    A body of unknown length (chunked or close-delimited upstream) goes to an
    HTTP/1.1 client chunked, so the connection survives; an HTTP/1.0 client
    cannot take chunks and gets it delimited by closing. The client connection
    is kept only if the client asked for it, its request body was read to the
    end (else the next "request" would start inside it) and the proxy is not
    stopping. Plans are shared, immutable values.
    """
    framing = response.framing
    chunked = False
    close_delimited = False
    if framing is _CHUNKED or framing is _CLOSE:
        if request.version == b"1.1":
            chunked = True
        else:
            close_delimited = True
    keep_alive = request.keep_alive and request_body_done and not close_delimited and not stopping
    return _PLANS[(4 if chunked else 0) + (2 if keep_alive else 0) + (framing is not _NONE)]


def client_response_head(
    response: ResponseHead, plan: ResponsePlan, request: RequestHead, extra: bytes = b""
) -> bytes:
    """The status line and headers to send to the client for ``response``.

    ``extra`` is one more header line of the proxy's own, without its CRLF.
    """
    status = response.status
    line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d " % status
    headers = response.headers
    names = response.names
    if not isinstance(names, list) or len(names) != len(headers):
        names = _lower_names(headers)
    named = response.connection
    # Hop-by-hop, plus what the Connection header named.
    drop = _RESPONSE_DROP if not named or named <= _RESPONSE_DROP else _RESPONSE_DROP | named
    # Own lines, without their CRLF.
    last: list[bytes] = []
    if plan.chunked:
        last.append(b"Transfer-Encoding: chunked")
    elif response.content_length is not None and status != 204:
        # Kept for HEAD and 304 too, where it describes the body not sent.
        last.append(b"Content-Length: %d" % response.content_length)
    if not plan.keep_alive:
        last.append(b"Connection: close")
    elif request.version == b"1.0":
        last.append(b"Connection: keep-alive")
    if extra:
        last.append(extra)
    return JOIN_HEAD([line + response.reason], names, headers, drop, last)


def _lower_names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """The lower-cased header names, for a head not made by the parser (which has them)."""
    return [name.lower() for name, _ in headers]


def chunk_size_line(size: int) -> bytes:
    """The chunk-size line that precedes ``size`` bytes of chunked body."""
    return b"%x\r\n" % size


def error_response(
    status: int,
    message: str,
    *,
    keep_alive: bool,
    head_only: bool = False,
    extra: bytes = b"",
    body: bytes | None = None,
) -> bytes:
    """A complete plain-text response the proxy answers itself (4xx/5xx, redirects).

    ``extra`` is more header lines, each ending in CRLF (Location, Retry-After);
    ``body`` replaces the default body of ``message`` and a newline.
    """
    if body is None:
        body = (message + "\n").encode()
    try:
        phrase = HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b"Error"
    head = (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\nCache-Control: no-store\r\n%s%s\r\n"
        % (status, phrase, len(body), extra, b"" if keep_alive else b"Connection: close\r\n")
    )
    return head if head_only else head + body


def header_value(head: RequestHead, lname: bytes) -> bytes | None:
    """The first value of header ``lname`` (lower-case), or None."""
    size = len(lname)
    for name, value in head.headers:
        # Comparing lengths first spares lower-casing nearly every other name.
        if len(name) == size and name.lower() == lname:
            return value
    return None
