"""Sans-I/O parser of what a backend answers: bytes in, response events out.

Events, in order, per response: one ``ResponseHead`` (1xx interim responses
are consumed silently), any number of ``BodyData``, then ``END``. Anything
that cannot be framed raises ``UpstreamProtocolError``: a backend's bad
answer is a failure of that exchange, not an input to answer.

A plain response that arrives whole in one read, head and body framed by
Content-Length, is read in one call by the C scanner (``tiers.proxy.heads``)
when it is built; anything else is llhttp's, with the same events.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import httptools

from tiers.proxy.errors import UpstreamProtocolError
from tiers.proxy.heads import SCAN_RESPONSE, ScanResponse
from tiers.proxy.http1 import (
    END,
    HTTP_VERSIONS,
    NO_TOKENS,
    BodyData,
    Framing,
    MessageEnd,
    header_tokens,
    value_tokens,
)

# Framing members as module names: cheaper than a lookup through the class.
_NONE: Final = Framing.NONE
_LENGTH: Final = Framing.LENGTH
_CHUNKED: Final = Framing.CHUNKED
_CLOSE: Final = Framing.CLOSE


class ResponseHead:
    """A backend's final (non-1xx) response head.

    ``names`` are the header names lower-cased, parallel to ``headers``
    (empty when not known). A plain class, as ``RequestHead`` is.
    """

    __slots__ = ("connection", "content_length", "framing", "headers", "keep_alive", "names",
                 "reason", "status", "version")

    def __init__(self, status: int, reason: bytes, version: bytes,  # noqa: PLR0917
                 headers: list[tuple[bytes, bytes]], framing: Framing,
                 content_length: int | None, keep_alive: bool, connection: frozenset[bytes],
                 names: Sequence[bytes] = ()) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.framing = framing
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.connection = connection
        self.names = names

    def __repr__(self) -> str:
        return f"ResponseHead({self.status}, {self.reason!r})"


ResponseEvent = ResponseHead | BodyData | MessageEnd

_MAX_RESPONSE_HEAD: Final = 65536
_MAX_RESPONSE_HEADERS: Final = 200


def _bodyless(status: int, head_request: bool) -> bool:
    """A response that has no body whatever its headers say."""
    return head_request or status in {204, 304}


def whole_body(head: ResponseHead, data: bytes) -> bytes:
    """The body of the whole response ``data`` whose head ``feed_whole`` gave."""
    length = head.content_length
    if head.framing is _LENGTH and length:
        return data[len(data) - length:]
    return b""


def whole_events(head: ResponseHead, data: bytes) -> list[ResponseEvent]:
    """The events ``feed`` gives for the whole response ``data`` whose head ``feed_whole`` gave."""
    body = whole_body(head, data)
    return [head, BodyData(body), END] if body else [head, END]


def _chunked(headers: list[tuple[bytes, bytes]], names: list[bytes]) -> bool:
    """Whether the body is chunked; UpstreamProtocolError for any other transfer coding."""
    if b"transfer-encoding" not in names:
        return False
    # Only chunked is undone here; another coding would reach the
    # client undeclared once the header is re-framed.
    coding = headers[names.index(b"transfer-encoding")][1]
    if names.count(b"transfer-encoding") > 1 or coding.strip(b" \t").lower() != b"chunked":
        raise UpstreamProtocolError("unsupported transfer coding in response")
    return True


def _connection_tokens(headers: list[tuple[bytes, bytes]],
                       names: list[bytes]) -> frozenset[bytes]:
    """The tokens of the Connection fields, however many there are."""
    if b"connection" not in names:
        return NO_TOKENS
    if names.count(b"connection") == 1:
        return value_tokens(headers[names.index(b"connection")][1])
    return header_tokens([field[1] for lname, field in zip(names, headers, strict=True)
                          if lname == b"connection"])


def _response_head(status: int, reason: bytes, version: bytes,  # noqa: PLR0917
                   headers: list[tuple[bytes, bytes]], names: list[bytes],
                   length: int | None, head_request: bool, chunked: bool,
                   connection: frozenset[bytes]) -> ResponseHead:
    """The ``ResponseHead`` of a final response whose Content-Length (if any) is
    ``length``, chunked or not, with the tokens of its Connection fields."""
    if _bodyless(status, head_request):
        framing = _NONE
    elif chunked:
        framing = _CHUNKED
    elif length is not None:
        framing = _LENGTH
    else:
        framing = _CLOSE
    keep_alive = b"close" not in connection if version == b"1.1" else b"keep-alive" in connection
    return ResponseHead(status, reason, version, headers, framing, length,
                        keep_alive and framing is not _CLOSE, connection, names)


class _ResponseReader:
    """The state of ``ResponseParser`` and the target of llhttp's callbacks.

    llhttp keeps its callbacks, bound to this object, for its whole life, so
    this object must not hold llhttp in turn: that cycle would leave garbage
    for the cyclic collector with every parser. ``llhttp`` is set only while
    ``ResponseParser.feed`` runs.
    """

    __slots__ = (
        "clean",
        "done",
        "extra",
        "framing",
        "head",
        "head_request",
        "head_used",
        "headers",
        "in_head",
        "interim",
        "llhttp",
        "names",
        "out",
        "reason",
    )

    def __init__(self, head_request: bool) -> None:
        self.llhttp: httptools.HttpResponseParser | None = None
        self.out: list[ResponseEvent] = []
        # The fields of the message llhttp reads, made anew by on_message_begin.
        self.headers: list[tuple[bytes, bytes]] = []
        self.names: list[bytes] = []
        self.reset(head_request)

    def reset(self, head_request: bool) -> None:
        """Expect a new response (to a HEAD request if ``head_request``)."""
        self.head_request = head_request
        self.reason = b""
        self.in_head = True
        self.head_used = 0
        self.interim = False
        self.framing = _NONE
        self.head: ResponseHead | None = None
        self.done = False
        self.extra = False
        # llhttp ended the response itself and expects another on the same
        # stream: only then may its state carry over to the next exchange.
        self.clean = False

    def on_message_begin(self) -> None:
        if self.done:
            # A second response to one request: the stream is out of step.
            self.extra = True
            return
        self.headers = []
        self.names = []
        self.reason = b""
        self.in_head = True
        self.head_used = 0

    def on_status(self, reason: bytes) -> None:
        if not self.done:
            self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.done:
            return
        headers = self.headers
        if len(headers) >= _MAX_RESPONSE_HEADERS:
            raise UpstreamProtocolError("too many response header fields")
        headers.append((name, value))
        self.names.append(name.lower())

    def on_headers_complete(self) -> None:
        if self.done:
            return
        parser = self.llhttp
        assert parser is not None
        status = parser.get_status_code()
        self.in_head = False
        if status < 200:
            # llhttp ends a 1xx message here and parses the next one.
            self.interim = True
            return
        version = HTTP_VERSIONS.get(parser.get_http_version())
        if version is None:
            raise UpstreamProtocolError("unsupported HTTP version in response")
        headers = self.headers
        names = self.names
        length: int | None = None
        if b"content-length" in names:
            # llhttp checked its digits and that it is not repeated.
            length = int(headers[names.index(b"content-length")][1].strip(b" \t"))
        head_request = self.head_request
        head = _response_head(status, self.reason, version, headers, names, length,
                              head_request, _chunked(headers, names),
                              _connection_tokens(headers, names))
        self.framing = head.framing
        self.head = head
        out = self.out
        out.append(head)
        if head_request:
            # llhttp would wait for the body the headers announce; there is none.
            self.done = True
            out.append(END)

    def take_scanned(self, data: bytes, status: int, reason: bytes,  # noqa: PLR0917
                     version: bytes, headers: list[tuple[bytes, bytes]], names: list[bytes],
                     head_end: int, length: int, connection: bytes | None,
                     ) -> ResponseHead | None:
        """The head of a whole response the scanner read: its head ends at
        ``head_end``, ``length`` is its Content-Length or -1 and ``connection``
        its Connection field (the scanner declines a transfer coding). None unless
        ``data`` holds exactly that response, head and body; its body is then
        the last ``content_length`` bytes of ``data`` (none if it has no body)."""
        size = len(data)
        head_request = self.head_request
        if _bodyless(status, head_request):
            if head_end != size:
                return None
        elif length < 0 or head_end + length != size:
            return None
        head = _response_head(status, reason, version, headers, names,
                              None if length < 0 else length, head_request, False,
                              NO_TOKENS if connection is None else value_tokens(connection))
        self.head = head
        self.framing = head.framing
        self.in_head = False
        self.done = True
        # llhttp has seen none of it and still expects a message.
        self.clean = True
        return head

    def on_body(self, body: bytes) -> None:
        if self.done:
            self.extra = True
            return
        self.out.append(BodyData(body))

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if not self.done:
            self.done = True
            self.out.append(END)
            parser = self.llhttp
            self.clean = parser is not None and parser.should_keep_alive()


class ResponseParser:
    """Parses the responses a backend sends, one per request, on one connection.

    ``head_request`` says the request was HEAD: its response has no body
    whatever its headers say. 1xx interim responses are consumed silently
    (the proxy answers ``Expect: 100-continue`` itself). ``feed`` and
    ``feed_eof`` raise ``UpstreamProtocolError`` on anything that cannot be
    framed. ``extra`` turns true when bytes arrive after the response ended,
    which makes the connection unfit for reuse. ``begin`` readies the parser
    for the next response on the same connection.

    A parser holds no reference cycle: dropping it frees it at once.
    """

    __slots__ = ("_llhttp", "_reader", "_scan")

    def __init__(self, head_request: bool = False, use_scanner: bool = True) -> None:
        self._scan: ScanResponse | None = SCAN_RESPONSE if use_scanner else None
        reader = _ResponseReader(head_request)
        self._reader = reader
        self._llhttp = httptools.HttpResponseParser(reader)

    @property
    def head(self) -> ResponseHead | None:
        """The final response head, once parsed."""
        return self._reader.head

    @property
    def done(self) -> bool:
        """The response has ended."""
        return self._reader.done

    @property
    def extra(self) -> bool:
        """Bytes came after the end of the response."""
        return self._reader.extra

    @property
    def reusable(self) -> bool:
        """The response ended cleanly and the backend keeps the connection open."""
        reader = self._reader
        head = reader.head
        return reader.done and not reader.extra and head is not None and head.keep_alive

    def begin(self, head_request: bool) -> None:
        """Expect the response to the next request sent on the same connection.

        llhttp's state carries over only when it ended the last response
        itself and expects another; otherwise (a HEAD response, whose body
        llhttp still awaits, or a response that did not end cleanly) parsing
        starts afresh.
        """
        reader = self._reader
        if reader.clean and not reader.extra:
            reader.reset(head_request)
        else:
            reader = _ResponseReader(head_request)
            self._reader = reader
            self._llhttp = httptools.HttpResponseParser(reader)

    def feed_whole(self, data: bytes) -> ResponseHead | None:
        """Parse ``data`` if it is exactly one whole response the head scanner reads.

        Then its head (``whole_body`` gives the body): what the events of
        ``feed`` would have said, without making them. Else None, and
        nothing has changed: ``feed_rest`` takes the bytes as ``feed`` would.
        """
        reader = self._reader
        scan = self._scan
        if scan is None or reader.done or not reader.in_head or reader.head_used != 0:
            return None
        scanned = scan(data, _MAX_RESPONSE_HEADERS)
        if scanned is None:
            return None
        status, reason, version, headers, names, head_end, length, connection = scanned
        return reader.take_scanned(data, status, reason, version, headers, names,
                                   head_end, length, connection)

    def feed(self, data: bytes) -> list[ResponseEvent]:
        """Parse ``data``; return the events it completes."""
        head = self.feed_whole(data)
        if head is not None:
            return whole_events(head, data)
        return self.feed_rest(data)

    def feed_rest(self, data: bytes) -> list[ResponseEvent]:
        """``feed`` for bytes that ``feed_whole`` declined: llhttp reads them."""
        reader = self._reader
        if reader.done:
            reader.extra = True
            return []
        out: list[ResponseEvent] = []
        reader.out = out
        llhttp = self._llhttp
        reader.llhttp = llhttp
        try:
            llhttp.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            raise UpstreamProtocolError("backend switched protocols unasked") from exc
        except httptools.HttpParserError as exc:
            context = exc.__context__
            if isinstance(context, UpstreamProtocolError):
                raise context from exc
            raise UpstreamProtocolError(f"invalid response: {exc}") from exc
        finally:
            reader.llhttp = None
        if reader.in_head:
            reader.head_used += len(data)
            if reader.head_used > _MAX_RESPONSE_HEAD:
                raise UpstreamProtocolError("response head too large")
        return out

    def feed_eof(self) -> list[ResponseEvent]:
        """The backend closed its side: end a close-delimited body, else fail."""
        reader = self._reader
        if reader.done:
            return []
        if reader.head is not None and reader.framing is _CLOSE:
            reader.done = True
            return [END]
        raise UpstreamProtocolError("backend closed the connection before the response ended")
