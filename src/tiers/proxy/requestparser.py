"""Sans-I/O parser of what a client sends: bytes in, request events out.

llhttp in strict mode already refuses most framing attacks (Content-Length
together with Transfer-Encoding, duplicate Content-Length, bad chunk sizes,
obs-fold, whitespace before a colon, bare CR or LF). What it lets through, and
this module refuses itself: a missing or repeated Host, a Transfer-Encoding in
HTTP/1.0 or whose codings are not exactly ``chunked``, HTTP versions other
than 1.0 and 1.1, CONNECT, and oversized request lines and heads (llhttp has
no limits). It also hides one trap: on an ``Upgrade`` request httptools tells
llhttp to skip the body, so a request body would be parsed as the next
request; the parser below re-frames that body instead (see ``_resume``).

A plain head without a body, whole in one read, is read in one call by the
C scanner (``tiers.proxy.heads``) when it is built; it declines anything
else, which llhttp then parses as before, so both give the same events.

Events, in order, per request: one ``RequestHead``, any number of
``BodyData``, then ``END``; or a ``RequestError`` after which the parser stays
closed. Requests may be pipelined: the events of several can come from one
``feed``.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import httptools

from tiers.proxy.heads import SCAN_REQUEST, ScanRequest
from tiers.proxy.http1 import (
    END,
    HTTP_VERSIONS,
    NO_TOKENS,
    BodyData,
    Framing,
    MessageEnd,
    header_tokens,
    remember,
    value_tokens,
)


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what a client may send before its request head is complete."""

    max_request_line: int = 8192
    max_head_size: int = 32768
    max_header_count: int = 100


DEFAULT_LIMITS: Final = Limits()


class RequestHead:
    """A parsed, validated request head.

    ``target`` is the request target as sent (for the access log), ``path``
    the origin-form target to forward. ``host`` is the authority to forward:
    the Host header, or the authority of an absolute-form target, or None for
    an HTTP/1.0 request without Host. ``connection`` holds the lower-cased
    tokens of the Connection header(s). ``user_agent``, ``forwarded_for``
    and ``referer`` are kept for the access log (repeated X-Forwarded-For
    joined by ", "; the first of the others). ``names`` are the header names
    lower-cased, parallel to ``headers`` (empty when not known).

    A plain class rather than a dataclass: one is made per request, and in
    the compiled build a dataclass's generated ``__init__`` stays interpreted.
    """

    __slots__ = ("connection", "content_length", "expect_continue", "forwarded_for", "framing",
                 "headers", "host", "keep_alive", "method", "names", "path", "referer",
                 "target", "user_agent", "version")

    def __init__(self, method: bytes, target: bytes, path: bytes, version: bytes,  # noqa: PLR0917
                 headers: list[tuple[bytes, bytes]], host: bytes | None, keep_alive: bool,
                 framing: Framing, content_length: int | None, expect_continue: bool,
                 connection: frozenset[bytes], user_agent: bytes | None = None,
                 forwarded_for: bytes | None = None, referer: bytes | None = None,
                 names: Sequence[bytes] = ()) -> None:
        self.method = method
        self.target = target
        self.path = path
        self.version = version
        self.headers = headers
        self.host = host
        self.keep_alive = keep_alive
        self.framing = framing
        self.content_length = content_length
        self.expect_continue = expect_continue
        self.connection = connection
        self.user_agent = user_agent
        self.forwarded_for = forwarded_for
        self.referer = referer
        self.names = names

    def __repr__(self) -> str:
        return f"RequestHead({self.method!r}, {self.target!r}, host={self.host!r})"

    def changed(self, *, method: bytes | None = None,
                headers: list[tuple[bytes, bytes]] | None = None,
                names: Sequence[bytes] | None = None) -> RequestHead:
        """A copy with the given parts replaced."""
        return RequestHead(
            self.method if method is None else method, self.target, self.path, self.version,
            self.headers if headers is None else headers, self.host, self.keep_alive,
            self.framing, self.content_length, self.expect_continue, self.connection,
            self.user_agent, self.forwarded_for, self.referer,
            self.names if names is None else names,
        )


@dataclass(frozen=True, slots=True)
class RequestError:
    """The request is malformed; answer ``status`` and close the connection."""

    status: int
    reason: str


RequestEvent = RequestHead | BodyData | MessageEnd | RequestError


class _Reject(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Phase(enum.Enum):
    HEAD = 0
    BODY_LENGTH = 1
    BODY_CHUNKED = 2
    CLOSED = 3


# Enum members looked up through the class cost more than a module name; the
# per-request paths below use these.
_HEAD: Final = _Phase.HEAD
_BODY_LENGTH: Final = _Phase.BODY_LENGTH
_BODY_CHUNKED: Final = _Phase.BODY_CHUNKED
_CLOSED: Final = _Phase.CLOSED
_NONE: Final = Framing.NONE
_LENGTH: Final = Framing.LENGTH
_CHUNKED: Final = Framing.CHUNKED

# Header names the parser must look at; everything else is passed through untouched.
_SPECIAL: Final = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"expect",
        b"user-agent",
        b"x-forwarded-for",
        b"referer",
    }
)
# RFC 3986 host (reg-name, IPv4 or IP-literal) with an optional port.
_HOST_RE: Final = re.compile(rb"(?:[A-Za-z0-9._~!$&'()*+,;=%-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?")
_SYNTHETIC_CHUNKED: Final = b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
# Host values already found valid (see ``tiers.proxy.http1.remember``).
_valid_hosts: Final[dict[bytes, bytes]] = {}


def _llhttp_reject(exc: Exception) -> _Reject:
    context = exc.__context__
    if isinstance(context, _Reject):
        return context
    reason = str(exc)
    if "HTTP version" in reason:
        return _Reject(505, reason)
    return _Reject(400, reason or type(exc).__name__)


def _check_host(hosts: list[bytes] | None, version: bytes) -> bytes | None:
    if hosts is None:
        if version == b"1.1":
            raise _Reject(400, "missing Host header")
        return None
    if len(hosts) != 1:
        raise _Reject(400, "more than one Host header")
    raw = hosts[0]
    host = _valid_hosts.get(raw)
    if host is None:
        host = raw.strip(b" \t")
        if _HOST_RE.fullmatch(host) is None:
            raise _Reject(400, "invalid Host header")
        remember(_valid_hosts, raw, host)
    return host


def _check_framing(
    special: dict[bytes, list[bytes]], version: bytes
) -> tuple[Framing, int | None]:
    lengths = special.get(b"content-length")
    codings_values = special.get(b"transfer-encoding")
    if codings_values is not None:
        if lengths is not None:
            raise _Reject(400, "both Content-Length and Transfer-Encoding")
        if version != b"1.1":
            raise _Reject(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = [
            c.strip(b" \t").lower() for value in codings_values for c in value.split(b",")
        ]
        codings = [c for c in codings if c]
        if not codings or codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
            raise _Reject(400, "Transfer-Encoding must end with a single chunked")
        if len(codings) != 1:
            raise _Reject(501, "unsupported transfer coding")
        return _CHUNKED, None
    if lengths is None:
        return _NONE, None
    if len(lengths) != 1:
        raise _Reject(400, "more than one Content-Length")
    value = lengths[0].strip(b" \t")
    if not value.isdigit() or len(value) > 18:
        raise _Reject(400, "invalid Content-Length")
    length = int(value)
    return (_LENGTH if length else _NONE), length


def _check_target(method: bytes, target: bytes, host: bytes | None) -> tuple[bytes, bytes | None]:
    first = target[:1]
    if first == b"/":
        if b"#" in target:
            raise _Reject(400, "fragment in request target")
        return target, host
    if target == b"*":
        if method != b"OPTIONS":
            raise _Reject(400, "asterisk target outside OPTIONS")
        return target, host
    lowered = target[:8].lower()
    if lowered.startswith(b"http://") or lowered.startswith(b"https://"):
        # Absolute form: the target's authority replaces Host (RFC 9112, 3.2.2).
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError as exc:
            raise _Reject(400, "invalid request target") from exc
        # httptools' stub types these parts as bytes and int, but a part the
        # target lacks is None: read them untyped, or the compiled build
        # rejects the None.
        host_part: bytes | None = getattr(url, "host")  # noqa: B009
        port: int | None = getattr(url, "port")  # noqa: B009
        path_part: bytes | None = getattr(url, "path")  # noqa: B009
        query: bytes | None = getattr(url, "query")  # noqa: B009
        if not host_part or b"#" in target:
            raise _Reject(400, "invalid request target")
        authority = host_part if port is None else b"%s:%d" % (host_part, port)
        if b":" in host_part:
            authority = b"[" + host_part + b"]" + authority[len(host_part) :]
        path = path_part or b"/"
        if query:
            path += b"?" + query
        return path, authority
    raise _Reject(400, "invalid request target")


def _keeps_alive(version: bytes, connection: frozenset[bytes]) -> bool:
    if version == b"1.1":
        return b"close" not in connection
    return b"keep-alive" in connection


def _expects_continue(expect: bytes | None, version: bytes) -> bool:
    """Whether the client waits for 100 Continue; 417 for any other expectation."""
    if expect is None:
        return False
    if expect.strip(b" \t").lower() != b"100-continue":
        raise _Reject(417, "unsupported expectation")
    return version == b"1.1"


class RequestParser:
    """Turns the bytes of one client connection into request events.

    ``feed`` never raises on bad input: it returns a ``RequestError`` and
    ignores everything after it. After a request that does not keep the
    connection alive, further bytes are ignored as well.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS, use_scanner: bool = True) -> None:
        self._limits = limits
        self._scan: ScanRequest | None = SCAN_REQUEST if use_scanner else None
        self._max_line = limits.max_request_line
        self._max_head = limits.max_head_size
        self._max_headers = limits.max_header_count
        self._parser = httptools.HttpRequestParser(self)
        self._phase = _HEAD
        self._out: list[RequestEvent] = []
        self._remaining = 0
        self._keep_alive = True
        # An Upgrade request with a body: llhttp reports an end that is not the end.
        self._resume_framing: Framing | None = None
        self._skip_end = False
        self._synthetic = False
        self._feeding_head = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._names: list[bytes] = []
        self._special: dict[bytes, list[bytes]] = {}
        self._head_used = 0
        self._line_len = 0
        self._line_done = False
        self._tail = b""

    @property
    def in_head(self) -> bool:
        """Some bytes of a request head have arrived but the head is not complete."""
        return self._phase is _HEAD and self._head_used > 0

    @property
    def closed(self) -> bool:
        """No further request will be read from this connection."""
        return self._phase is _CLOSED

    def feed(self, data: bytes) -> list[RequestEvent]:
        """Parse ``data`` and return the events it completes."""
        out: list[RequestEvent] = []
        self._out = out
        pos = 0
        size = len(data)
        try:
            while pos < size:
                phase = self._phase
                if phase is _HEAD:
                    pos = self._feed_head(data, pos)
                elif phase is _BODY_LENGTH:
                    # Feeding exactly the body keeps the next head's bytes countable.
                    take = min(self._remaining, size - pos)
                    self._remaining -= take
                    self._execute(data[pos : pos + take])
                    pos += take
                elif phase is _BODY_CHUNKED:
                    # The chunk framing is llhttp's to find; a pipelined head after
                    # the last chunk in this same read escapes the head budget, which
                    # stays bounded by the read size.
                    self._execute(data[pos:] if pos else data)
                    pos = size
                else:
                    break
        except _Reject as rej:
            self._phase = _CLOSED
            out.append(RequestError(rej.status, rej.reason))
        return out

    def _feed_head(self, data: bytes, pos: int) -> int:
        tail = self._tail
        if not tail and not self._head_used:
            # The common case: a whole head at the start of a read, within limits.
            scan = self._scan
            if scan is not None:
                scanned = scan(data, pos, self._max_head, self._max_line, self._max_headers)
                if isinstance(scanned, tuple):
                    (method, target, version, headers, names, stop, host, connection,
                     user_agent, forwarded_for, referer, expect) = scanned
                    self._complete_scanned(method, version, target, headers, names, host,
                                           connection, user_agent, forwarded_for, referer,
                                           expect)
                    # No body: the request is whole, as llhttp would say next.
                    self.on_message_complete()
                    return stop
                if scanned >= 0:
                    return self._feed_whole_head(data, pos, scanned)
            else:
                found = data.find(b"\r\n\r\n", pos)
                if found != -1:
                    stop = found + 4
                    if (stop - pos <= self._max_head
                            and data.find(b"\n", pos, stop) - pos - 1 <= self._max_line):
                        return self._feed_whole_head(data, pos, stop)
        size = len(data)
        end = -1
        if tail:
            joined = tail + data[pos : pos + 3]
            found = joined.find(b"\r\n\r\n")
            if found != -1:
                end = pos + found + 4 - len(tail)
        if end == -1:
            found = data.find(b"\r\n\r\n", pos)
            if found != -1:
                end = found + 4
        stop = size if end == -1 else end
        span = stop - pos
        if not self._line_done:
            newline = data.find(b"\n", pos, stop)
            if newline == -1:
                # May end with the line's CR, which the limit does not count.
                self._line_len += span
                too_long = self._line_len > self._max_line + 1
            else:
                self._line_len += newline - pos - 1
                self._line_done = True
                too_long = self._line_len > self._max_line
            if too_long:
                raise _Reject(414, "request line too long")
        self._head_used += span
        if self._head_used > self._limits.max_head_size:
            if not self._line_done:
                raise _Reject(414, "request line too long")
            raise _Reject(431, "request header fields too large")
        if end == -1:
            self._tail = (tail + data[max(pos, size - 3) :])[-3:]
        self._feeding_head = True
        try:
            self._execute(data[pos:stop])
        finally:
            self._feeding_head = False
        return stop

    def _feed_whole_head(self, data: bytes, pos: int, stop: int) -> int:
        """Have llhttp read the whole head ``data[pos:stop]``, known to be within limits."""
        self._feeding_head = True
        try:
            self._execute(data if pos == 0 and stop == len(data) else data[pos:stop])
        finally:
            self._feeding_head = False
        return stop

    def _execute(self, chunk: bytes) -> None:
        try:
            self._parser.feed_data(chunk)
        except httptools.HttpParserUpgrade as upgrade:
            self._resume(chunk[int(upgrade.args[0]) :])
        except httptools.HttpParserError as exc:
            raise _llhttp_reject(exc) from exc

    def _resume(self, rest: bytes) -> None:
        # llhttp stops at an Upgrade request. The proxy does not switch protocols
        # (Upgrade is hop-by-hop and is not forwarded), so parsing goes on with a
        # fresh parser; a body that llhttp skipped is framed by a synthetic head
        # whose events are swallowed, so its bytes are read as body, never as a
        # request of their own.
        self._parser = httptools.HttpRequestParser(self)
        framing = self._resume_framing
        self._resume_framing = None
        if framing is not None:
            self._synthetic = True
            if framing is _CHUNKED:
                self._parser.feed_data(_SYNTHETIC_CHUNKED)
            else:
                self._parser.feed_data(
                    b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % self._remaining
                )
        if rest:
            self._execute(rest)

    # ---- httptools callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        if self._synthetic:
            return
        self._url = b""
        self._headers = []
        self._names = []
        self._special = {}
        if not self._feeding_head:
            # A head that began inside a chunked body's read: its request line
            # was not measured, so only the head budget applies to it.
            self._line_done = True

    def on_url(self, url: bytes) -> None:
        if self._synthetic:
            return
        url = self._url + url
        self._url = url
        if len(url) > self._max_line:
            raise _Reject(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._synthetic:
            return
        headers = self._headers
        if len(headers) >= self._max_headers:
            raise _Reject(431, "too many header fields")
        headers.append((name, value))
        lname = name.lower()
        self._names.append(lname)
        if lname in _SPECIAL:
            special = self._special
            values = special.get(lname)
            if values is None:
                special[lname] = [value]
            else:
                values.append(value)

    def on_headers_complete(self) -> None:
        if self._synthetic:
            self._synthetic = False
            return
        parser = self._parser
        version = HTTP_VERSIONS.get(parser.get_http_version())
        if version is None:
            raise _Reject(505, "HTTP version not supported")
        self._complete_head(parser.get_method(), version, self._url, self._headers,
                            self._names, self._special, parser)

    def _complete_head(self, method: bytes, version: bytes, target: bytes,  # noqa: PLR0917
                       headers: list[tuple[bytes, bytes]], names: list[bytes],
                       special: dict[bytes, list[bytes]],
                       parser: httptools.HttpRequestParser) -> None:
        """Check a head llhttp read; emit its ``RequestHead``."""
        if method == b"CONNECT":
            raise _Reject(501, "CONNECT is not supported")
        hosts = special.get(b"host")
        host = None
        if hosts is not None and len(hosts) == 1:
            host = _valid_hosts.get(hosts[0])
        if host is None:
            host = _check_host(hosts, version)
        if b"content-length" in special or b"transfer-encoding" in special:
            framing, length = _check_framing(special, version)
        else:
            framing, length = _NONE, None
        tokens = special.get(b"connection")
        connection = NO_TOKENS if tokens is None else header_tokens(tokens)
        keep_alive = _keeps_alive(version, connection)
        expect = special.get(b"expect")
        if expect is not None and len(expect) != 1:
            raise _Reject(417, "unsupported expectation")
        expect_continue = _expects_continue(None if expect is None else expect[0], version)
        # Origin form, by far the most common. (``find`` rather than ``in``:
        # bytes.__contains__ first tries its argument as an integer.)
        if target[:1] == b"/" and target.find(b"#") == -1:
            path = target
        else:
            path, host = _check_target(method, target, host)

        if framing is not _NONE and parser.should_upgrade():
            self._resume_framing = framing
            self._skip_end = True
        if framing is _LENGTH:
            self._phase = _BODY_LENGTH
            self._remaining = length or 0
        elif framing is _CHUNKED:
            self._phase = _BODY_CHUNKED
        user_agent = special.get(b"user-agent")
        forwarded = special.get(b"x-forwarded-for")
        referer = special.get(b"referer")
        self._emit(RequestHead(
            method, target, path, version, headers, host, keep_alive, framing, length,
            expect_continue, connection,
            None if user_agent is None else user_agent[0],
            None if forwarded is None
            else forwarded[0] if len(forwarded) == 1 else b", ".join(forwarded),
            None if referer is None else referer[0],
            names,
        ))

    def _complete_scanned(self, method: bytes, version: bytes, target: bytes,  # noqa: PLR0917
                          headers: list[tuple[bytes, bytes]], names: list[bytes],
                          host_field: bytes | None, connection_field: bytes | None,
                          user_agent: bytes | None, forwarded_for: bytes | None,
                          referer: bytes | None, expect: bytes | None) -> None:
        """``_complete_head`` for a head the C scanner read: a method other than
        CONNECT, an origin-form target without "#", no body, and none of the
        fields it reports repeated."""
        host = None if host_field is None else _valid_hosts.get(host_field)
        if host is None:
            host = _check_host(None if host_field is None else [host_field], version)
        connection = NO_TOKENS if connection_field is None else value_tokens(connection_field)
        keep_alive = _keeps_alive(version, connection)
        self._emit(RequestHead(
            method, target, target, version, headers, host, keep_alive, _NONE, None,
            _expects_continue(expect, version), connection, user_agent, forwarded_for,
            referer, names,
        ))

    def _emit(self, head: RequestHead) -> None:
        """Emit a checked head; the parser's head state starts afresh."""
        self._keep_alive = head.keep_alive
        self._head_used = 0
        self._line_len = 0
        self._line_done = False
        self._tail = b""
        self._out.append(head)

    def on_body(self, body: bytes) -> None:
        self._out.append(BodyData(body))

    def on_message_complete(self) -> None:
        if self._synthetic:
            return
        if self._skip_end:
            self._skip_end = False
            return
        self._out.append(END)
        self._phase = _HEAD if self._keep_alive else _CLOSED

