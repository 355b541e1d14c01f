"""Sans-I/O HTTP/1.1 codec: bytes in, events out, on top of httptools (llhttp).

``RequestParser`` reads what a client sends; ``ResponseParser`` reads what a
backend answers. Neither touches a socket or a clock, so both are tested by
feeding bytes.

llhttp in strict mode already refuses most framing attacks (Content-Length
together with Transfer-Encoding, duplicate Content-Length, bad chunk sizes,
obs-fold, whitespace before a colon, bare CR or LF). What it lets through, and
this module refuses itself: a missing or repeated Host, a Transfer-Encoding in
HTTP/1.0 or whose codings are not exactly ``chunked``, HTTP versions other
than 1.0 and 1.1, CONNECT, and oversized request lines and heads (llhttp has
no limits). It also hides one trap: on an ``Upgrade`` request httptools tells
llhttp to skip the body, so a request body would be parsed as the next
request; the parser below re-frames that body instead (see ``_resume``).

Events, in order, per request: one ``RequestHead``, any number of
``BodyData``, then ``END``; or a ``RequestError`` after which the parser stays
closed. Requests may be pipelined: the events of several can come from one
``feed``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import httptools

from tiers.proxy.errors import UpstreamProtocolError


class Framing(enum.Enum):
    """How a message body is delimited."""

    NONE = 0
    LENGTH = 1
    CHUNKED = 2
    CLOSE = 3  # responses only: the body runs until the backend closes


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what a client may send before its request head is complete."""

    max_request_line: int = 8192
    max_head_size: int = 32768
    max_header_count: int = 100


DEFAULT_LIMITS = Limits()


@dataclass(slots=True, eq=False)
class RequestHead:
    """A parsed, validated request head.

    ``target`` is the request target as sent (for the access log), ``path``
    the origin-form target to forward. ``host`` is the authority to forward:
    the Host header, or the authority of an absolute-form target, or None for
    an HTTP/1.0 request without Host. ``connection`` holds the lower-cased
    tokens of the Connection header(s). ``user_agent`` and ``forwarded_for``
    are kept for the access log (repeated X-Forwarded-For joined by ", ").
    """

    method: bytes
    target: bytes
    path: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    host: bytes | None
    keep_alive: bool
    framing: Framing
    content_length: int | None
    expect_continue: bool
    connection: frozenset[bytes]
    user_agent: bytes | None = None
    forwarded_for: bytes | None = None


class BodyData:
    """A piece of a message body, with transfer coding already removed."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class MessageEnd:
    """The current message is complete."""

    __slots__ = ()


END = MessageEnd()


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


# Header names the parser must look at; everything else is passed through untouched.
_SPECIAL = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"expect",
        b"user-agent",
        b"x-forwarded-for",
    }
)
# RFC 3986 host (reg-name, IPv4 or IP-literal) with an optional port.
_HOST_RE = re.compile(rb"(?:[A-Za-z0-9._~!$&'()*+,;=%-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?")
_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
_SYNTHETIC_CHUNKED = b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


def _tokens(values: list[bytes] | None) -> frozenset[bytes]:
    if values is None:
        return frozenset()
    found = set()
    for value in values:
        for raw in value.split(b","):
            token = raw.strip(b" \t").lower()
            if token:
                found.add(token)
    return frozenset(found)


def _first(values: list[bytes] | None) -> bytes | None:
    return None if values is None else values[0]


def _joined(values: list[bytes] | None) -> bytes | None:
    if values is None:
        return None
    return values[0] if len(values) == 1 else b", ".join(values)


def _llhttp_reject(exc: Exception) -> _Reject:
    context = exc.__context__
    if isinstance(context, _Reject):
        return context
    reason = str(exc)
    if "HTTP version" in reason:
        return _Reject(505, reason)
    return _Reject(400, reason or type(exc).__name__)


class RequestParser:
    """Turns the bytes of one client connection into request events.

    ``feed`` never raises on bad input: it returns a ``RequestError`` and
    ignores everything after it. After a request that does not keep the
    connection alive, further bytes are ignored as well.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._parser = httptools.HttpRequestParser(self)
        self._phase = _Phase.HEAD
        self._out: list[RequestEvent] = []
        self._remaining = 0
        self._keep_alive = True
        # An Upgrade request with a body: llhttp reports an end that is not the end.
        self._resume_framing: Framing | None = None
        self._skip_end = False
        self._synthetic = False
        self._feeding_head = False
        self._reset_message()
        self._reset_head_budget()

    def _reset_message(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._special: dict[bytes, list[bytes]] = {}

    def _reset_head_budget(self) -> None:
        self._head_used = 0
        self._line_len = 0
        self._line_done = False
        self._tail = b""

    @property
    def in_head(self) -> bool:
        """Some bytes of a request head have arrived but the head is not complete."""
        return self._phase is _Phase.HEAD and self._head_used > 0

    @property
    def closed(self) -> bool:
        """No further request will be read from this connection."""
        return self._phase is _Phase.CLOSED

    def feed(self, data: bytes) -> list[RequestEvent]:
        """Parse ``data`` and return the events it completes."""
        out: list[RequestEvent] = []
        self._out = out
        pos = 0
        size = len(data)
        try:
            while pos < size:
                phase = self._phase
                if phase is _Phase.HEAD:
                    pos = self._feed_head(data, pos)
                elif phase is _Phase.BODY_LENGTH:
                    # Feeding exactly the body keeps the next head's bytes countable.
                    take = min(self._remaining, size - pos)
                    self._remaining -= take
                    self._execute(data[pos : pos + take])
                    pos += take
                elif phase is _Phase.BODY_CHUNKED:
                    # The chunk framing is llhttp's to find; a pipelined head after
                    # the last chunk in this same read escapes the head budget, which
                    # stays bounded by the read size.
                    self._execute(data[pos:] if pos else data)
                    pos = size
                else:
                    break
        except _Reject as rej:
            self._phase = _Phase.CLOSED
            out.append(RequestError(rej.status, rej.reason))
        return out

    def _feed_head(self, data: bytes, pos: int) -> int:
        size = len(data)
        end = -1
        tail = self._tail
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
        limits = self._limits
        if not self._line_done:
            newline = data.find(b"\n", pos, stop)
            if newline == -1:
                # May end with the line's CR, which the limit does not count.
                self._line_len += span
                too_long = self._line_len > limits.max_request_line + 1
            else:
                self._line_len += newline - pos - 1
                self._line_done = True
                too_long = self._line_len > limits.max_request_line
            if too_long:
                raise _Reject(414, "request line too long")
        self._head_used += span
        if self._head_used > limits.max_head_size:
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
            if framing is Framing.CHUNKED:
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
        self._reset_message()
        if not self._feeding_head:
            # A head that began inside a chunked body's read: its request line
            # was not measured, so only the head budget applies to it.
            self._line_done = True

    def on_url(self, url: bytes) -> None:
        if self._synthetic:
            return
        self._url += url
        if len(self._url) > self._limits.max_request_line:
            raise _Reject(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._synthetic:
            return
        headers = self._headers
        if len(headers) >= self._limits.max_header_count:
            raise _Reject(431, "too many header fields")
        headers.append((name, value))
        lname = name.lower()
        if lname in _SPECIAL:
            self._special.setdefault(lname, []).append(value)

    def on_headers_complete(self) -> None:
        if self._synthetic:
            self._synthetic = False
            return
        parser = self._parser
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            raise _Reject(505, "HTTP version not supported")
        method = parser.get_method()
        if method == b"CONNECT":
            raise _Reject(501, "CONNECT is not supported")
        special = self._special
        host = self._check_host(special.get(b"host"), version)
        framing, length = self._check_framing(special, version)
        connection = _tokens(special.get(b"connection"))
        if version == b"1.1":
            keep_alive = b"close" not in connection
        else:
            keep_alive = b"keep-alive" in connection
        expect_continue = False
        expect = special.get(b"expect")
        if expect is not None:
            if len(expect) != 1 or expect[0].strip(b" \t").lower() != b"100-continue":
                raise _Reject(417, "unsupported expectation")
            expect_continue = version == b"1.1"
        target = self._url
        path, host = self._check_target(method, target, host)

        if parser.should_upgrade() and framing is not Framing.NONE:
            self._resume_framing = framing
            self._skip_end = True
        self._keep_alive = keep_alive
        if framing is Framing.LENGTH:
            self._phase = _Phase.BODY_LENGTH
            self._remaining = length or 0
        elif framing is Framing.CHUNKED:
            self._phase = _Phase.BODY_CHUNKED
        self._reset_head_budget()
        self._out.append(
            RequestHead(
                method=method,
                target=target,
                path=path,
                version=version,
                headers=self._headers,
                host=host,
                keep_alive=keep_alive,
                framing=framing,
                content_length=length,
                expect_continue=expect_continue,
                connection=connection,
                user_agent=_first(special.get(b"user-agent")),
                forwarded_for=_joined(special.get(b"x-forwarded-for")),
            )
        )

    def on_body(self, body: bytes) -> None:
        self._out.append(BodyData(body))

    def on_message_complete(self) -> None:
        if self._synthetic:
            return
        if self._skip_end:
            self._skip_end = False
            return
        self._out.append(END)
        self._phase = _Phase.HEAD if self._keep_alive else _Phase.CLOSED

    # ---- checks --------------------------------------------------------------

    @staticmethod
    def _check_host(hosts: list[bytes] | None, version: bytes) -> bytes | None:
        if hosts is None:
            if version == b"1.1":
                raise _Reject(400, "missing Host header")
            return None
        if len(hosts) != 1:
            raise _Reject(400, "more than one Host header")
        host = hosts[0].strip(b" \t")
        if _HOST_RE.fullmatch(host) is None:
            raise _Reject(400, "invalid Host header")
        return host

    @staticmethod
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
            return Framing.CHUNKED, None
        if lengths is None:
            return Framing.NONE, None
        if len(lengths) != 1:
            raise _Reject(400, "more than one Content-Length")
        value = lengths[0].strip(b" \t")
        if not value.isdigit() or len(value) > 18:
            raise _Reject(400, "invalid Content-Length")
        length = int(value)
        return (Framing.LENGTH if length else Framing.NONE), length

    @staticmethod
    def _check_target(
        method: bytes, target: bytes, host: bytes | None
    ) -> tuple[bytes, bytes | None]:
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
            if not url.host or b"#" in target:
                raise _Reject(400, "invalid request target")
            authority = url.host if url.port is None else b"%s:%d" % (url.host, url.port)
            if b":" in url.host:
                authority = b"[" + url.host + b"]" + authority[len(url.host) :]
            path = url.path or b"/"
            if url.query:
                path += b"?" + url.query
            return path, authority
        raise _Reject(400, "invalid request target")


# ---- responses ------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class ResponseHead:
    """A backend's final (non-1xx) response head."""

    status: int
    reason: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    framing: Framing
    content_length: int | None
    keep_alive: bool
    connection: frozenset[bytes]


ResponseEvent = ResponseHead | BodyData | MessageEnd

_MAX_RESPONSE_HEAD = 65536
_MAX_RESPONSE_HEADERS = 200


class ResponseParser:
    """Parses the one response a backend sends to one request.

    ``head_request`` says the request was HEAD: its response has no body
    whatever its headers say. 1xx interim responses are consumed silently
    (the proxy answers ``Expect: 100-continue`` itself). ``feed`` and
    ``feed_eof`` raise ``UpstreamProtocolError`` on anything that cannot be
    framed. ``extra`` turns true when bytes arrive after the response ended,
    which makes the connection unfit for reuse.
    """

    def __init__(self, head_request: bool) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._head_request = head_request
        self._out: list[ResponseEvent] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._in_head = True
        self._head_used = 0
        self._interim = False
        self._framing = Framing.NONE
        self.head: ResponseHead | None = None
        self.done = False
        self.extra = False

    def feed(self, data: bytes) -> list[ResponseEvent]:
        """Parse ``data``; return the events it completes."""
        if self.done:
            self.extra = True
            return []
        out: list[ResponseEvent] = []
        self._out = out
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            raise UpstreamProtocolError("backend switched protocols unasked") from exc
        except httptools.HttpParserError as exc:
            context = exc.__context__
            if isinstance(context, UpstreamProtocolError):
                raise context from exc
            raise UpstreamProtocolError(f"invalid response: {exc}") from exc
        if self._in_head:
            self._head_used += len(data)
            if self._head_used > _MAX_RESPONSE_HEAD:
                raise UpstreamProtocolError("response head too large")
        return out

    def feed_eof(self) -> list[ResponseEvent]:
        """The backend closed its side: end a close-delimited body, else fail."""
        if self.done:
            return []
        if self.head is not None and self._framing is Framing.CLOSE:
            self.done = True
            return [END]
        raise UpstreamProtocolError("backend closed the connection before the response ended")

    def on_message_begin(self) -> None:
        self._headers = []
        self._reason = b""
        self._in_head = True
        self._head_used = 0

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self._headers) >= _MAX_RESPONSE_HEADERS:
            raise UpstreamProtocolError("too many response header fields")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        self._in_head = False
        if status < 200:
            # llhttp ends a 1xx message here and parses the next one.
            self._interim = True
            return
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            raise UpstreamProtocolError("unsupported HTTP version in response")
        length: int | None = None
        chunked = False
        connection_values: list[bytes] = []
        for name, value in self._headers:
            lname = name.lower()
            if lname == b"content-length":
                length = int(value.strip(b" \t"))  # llhttp checked digits and duplicates
            elif lname == b"transfer-encoding":
                # Only chunked is undone here; another coding would reach the
                # client undeclared once the header is re-framed.
                if chunked or value.strip(b" \t").lower() != b"chunked":
                    raise UpstreamProtocolError("unsupported transfer coding in response")
                chunked = True
            elif lname == b"connection":
                connection_values.append(value)
        if self._head_request or status in (204, 304):
            framing = Framing.NONE
        elif chunked:
            framing = Framing.CHUNKED
        elif length is not None:
            framing = Framing.LENGTH
        else:
            framing = Framing.CLOSE
        self._framing = framing
        connection = _tokens(connection_values or None)
        if version == b"1.1":
            keep_alive = b"close" not in connection
        else:
            keep_alive = b"keep-alive" in connection
        head = ResponseHead(
            status=status,
            reason=self._reason,
            version=version,
            headers=self._headers,
            framing=framing,
            content_length=length,
            keep_alive=keep_alive and framing is not Framing.CLOSE,
            connection=connection,
        )
        self.head = head
        self._out.append(head)
        if self._head_request:
            # llhttp would wait for the body the headers announce; there is none.
            self.done = True
            self._out.append(END)

    def on_body(self, body: bytes) -> None:
        if self.done:
            self.extra = True
            return
        self._out.append(BodyData(body))

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if not self.done:
            self.done = True
            self._out.append(END)
