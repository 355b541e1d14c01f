"""The request and response codecs, fed raw bytes.

The request corpus lives in ``requests/``: every ``valid/NAME.http`` has a
``NAME.json`` listing the requests it must yield; every ``invalid/STATUS-NAME.http``
must be refused with STATUS. Each file is fed whole, one byte at a time and
in random pieces, and all three must agree.
"""

from __future__ import annotations

import gc
import json
import random
from pathlib import Path
from typing import Any

import pytest

from tiers.errors import ProxyError
from tiers.proxy.errors import UpstreamProtocolError
from tiers.proxy.http1 import END, BodyData, Framing, MessageEnd
from tiers.proxy.requestparser import Limits, RequestError, RequestEvent, RequestHead, RequestParser
from tiers.proxy.responseparser import ResponseEvent, ResponseHead, ResponseParser

CORPUS = Path(__file__).parent / "requests"
VALID = sorted(CORPUS.glob("valid/*.http"))
INVALID = sorted(CORPUS.glob("invalid/*.http"))


def _pieces(data: bytes, mode: str) -> list[bytes]:
    if mode == "whole":
        return [data]
    if mode == "bytes":
        return [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(len(data))
    out = []
    pos = 0
    while pos < len(data):
        step = rng.randint(1, 64)
        out.append(data[pos : pos + step])
        pos += step
    return out


def _feed(data: bytes, mode: str, limits: Limits | None = None) -> list[RequestEvent]:
    parser = RequestParser(limits) if limits else RequestParser()
    events: list[RequestEvent] = []
    for piece in _pieces(data, mode):
        events += parser.feed(piece)
    return events


def _requests(events: list[RequestEvent]) -> list[dict[str, Any]]:
    """Fold events into requests, checking they come in head, body*, end order."""
    requests: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    for event in events:
        assert not isinstance(event, RequestError), event
        if isinstance(event, RequestHead):
            assert current is None, "a head inside another request"
            current = {"head": event, "body": b""}
        elif isinstance(event, BodyData):
            assert current is not None
            current["body"] += event.data
        else:
            assert isinstance(event, MessageEnd)
            assert current is not None
            requests.append(current)
            current = None
    assert current is None, "a request without its end"
    return requests


@pytest.mark.parametrize("path", VALID, ids=[p.stem for p in VALID])
@pytest.mark.parametrize("mode", ["whole", "bytes", "random"])
def test_valid_request(path: Path, mode: str) -> None:
    expected = json.loads(path.with_suffix(".json").read_text())
    got = _requests(_feed(path.read_bytes(), mode))
    assert len(got) == len(expected)
    for request, want in zip(got, expected, strict=True):
        head: RequestHead = request["head"]
        assert head.method.decode() == want["method"]
        assert head.path.decode() == want["path"]
        assert (head.host.decode() if head.host is not None else None) == want["host"]
        assert request["body"].decode() == want["body"]
        if "keep_alive" in want:
            assert head.keep_alive is want["keep_alive"]
        if "version" in want:
            assert head.version.decode() == want["version"]
        if "framing" in want:
            assert head.framing is Framing[want["framing"]]
        if "content_length" in want:
            assert head.content_length == want["content_length"]
        if "expect_continue" in want:
            assert head.expect_continue is want["expect_continue"]
        if "user_agent" in want:
            assert head.user_agent is not None
            assert head.user_agent.decode() == want["user_agent"]
        if "forwarded_for" in want:
            assert head.forwarded_for is not None
            assert head.forwarded_for.decode() == want["forwarded_for"]


@pytest.mark.parametrize("path", INVALID, ids=[p.stem for p in INVALID])
@pytest.mark.parametrize("mode", ["whole", "bytes", "random"])
def test_invalid_request(path: Path, mode: str) -> None:
    status = int(path.stem.split("-", 1)[0])
    events = _feed(path.read_bytes(), mode)
    errors = [e for e in events if isinstance(e, RequestError)]
    assert [e.status for e in errors] == [status], events
    # Nothing is parsed after the error: the connection is finished.
    assert events[-1] is errors[0]


def test_corpus_is_not_empty() -> None:
    assert len(VALID) >= 20
    assert len(INVALID) >= 40
    statuses = {int(p.stem.split("-", 1)[0]) for p in INVALID}
    assert {400, 414, 431, 505} <= statuses


def test_parser_stays_closed_after_an_error() -> None:
    parser = RequestParser()
    assert isinstance(parser.feed(b"GET / HTTP/1.1\r\n\r\n")[0], RequestError)
    assert parser.closed
    assert parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == []


def test_bytes_after_connection_close_are_ignored() -> None:
    parser = RequestParser()
    events = parser.feed(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /2 HTTP/1.1\r\n"
    )
    assert [type(e) for e in events] == [RequestHead, MessageEnd]
    assert parser.closed


LIMITS = Limits(max_request_line=100, max_head_size=400, max_header_count=5)


@pytest.mark.parametrize("mode", ["whole", "bytes"])
def test_request_line_limit(mode: str) -> None:
    # "GET " + target + " HTTP/1.1" is the measured line.
    fits = b"GET /" + b"a" * (100 - 14) + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    assert len(fits.split(b"\r\n")[0]) == 100
    assert isinstance(_feed(fits, mode, LIMITS)[0], RequestHead)
    too_long = b"GET /" + b"a" * (101 - 14) + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    assert _feed(too_long, mode, LIMITS) == [RequestError(414, "request line too long")]


def test_unfinished_long_request_line_is_refused_without_waiting_for_its_end() -> None:
    parser = RequestParser(LIMITS)
    assert parser.feed(b"GET /" + b"a" * 90) == []
    assert parser.in_head
    assert parser.feed(b"a" * 20) == [RequestError(414, "request line too long")]


@pytest.mark.parametrize("mode", ["whole", "bytes"])
def test_head_size_limit(mode: str) -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX-A: "
    fits = head + b"v" * (400 - len(head) - 4) + b"\r\n\r\n"
    assert len(fits) == 400
    assert isinstance(_feed(fits, mode, LIMITS)[0], RequestHead)
    too_big = head + b"v" * (401 - len(head) - 4) + b"\r\n\r\n"
    assert [e.status for e in _feed(too_big, mode, LIMITS) if isinstance(e, RequestError)] == [431]


def test_head_limit_applies_to_each_pipelined_request_separately() -> None:
    one = b"GET / HTTP/1.1\r\nHost: a\r\nX-A: " + b"v" * 300 + b"\r\n\r\n"
    assert len(one) < 400
    events = _feed(one * 3, "whole", LIMITS)
    assert [type(e) for e in events] == [RequestHead, MessageEnd] * 3


def test_header_count_limit() -> None:
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(4))
    assert isinstance(
        _feed(b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n", "whole", LIMITS)[0], RequestHead
    )
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(5))
    events = _feed(b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n", "whole", LIMITS)
    assert events == [RequestError(431, "too many header fields")]


def test_head_limit_after_a_body_in_the_same_read() -> None:
    body_then_head = (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
        + b"GET / HTTP/1.1\r\nHost: a\r\nX-A: "
        + b"v" * 500
    )
    events = _feed(body_then_head, "whole", LIMITS)
    assert [type(e) for e in events] == [RequestHead, BodyData, MessageEnd, RequestError]
    assert isinstance(events[-1], RequestError) and events[-1].status == 431


def test_in_head_tracks_a_partial_head() -> None:
    parser = RequestParser()
    assert not parser.in_head
    parser.feed(b"GET / HT")
    assert parser.in_head
    events = parser.feed(b"TP/1.1\r\nHost: a\r\n\r\n")
    assert [type(e) for e in events] == [RequestHead, MessageEnd]
    assert not parser.in_head


def test_head_fields() -> None:
    raw = (
        b"POST /p?q=1 HTTP/1.1\r\nHost: a.test\r\nConnection: keep-alive, X-Hop\r\n"
        b"X-Hop: 1\r\nUser-Agent: ua/1\r\nContent-Length: 2\r\n\r\nhi"
    )
    events = RequestParser().feed(raw)
    head = events[0]
    assert isinstance(head, RequestHead)
    assert head.method == b"POST"
    assert head.target == b"/p?q=1"
    assert head.version == b"1.1"
    assert head.connection == frozenset({b"keep-alive", b"x-hop"})
    assert head.user_agent == b"ua/1"
    assert head.framing is Framing.LENGTH and head.content_length == 2
    assert (b"X-Hop", b"1") in head.headers
    assert isinstance(events[1], BodyData) and events[1].data == b"hi"
    assert events[2] is END


def test_absolute_form_keeps_raw_target_for_the_log() -> None:
    head = RequestParser().feed(b"GET http://b.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n")[0]
    assert isinstance(head, RequestHead)
    assert head.target == b"http://b.test/x"
    assert head.path == b"/x"
    assert head.host == b"b.test"


@pytest.mark.parametrize(
    ("target", "path", "host"),
    [
        (b"http://b.test", b"/", b"b.test"),
        (b"http://b.test:8080?q=1", b"/?q=1", b"b.test:8080"),
        (b"HTTP://[::1]:81/p?x", b"/p?x", b"[::1]:81"),
    ],
)
def test_absolute_form_parts_that_are_missing_take_defaults(
    target: bytes, path: bytes, host: bytes
) -> None:
    head = RequestParser().feed(b"GET %s HTTP/1.1\r\nHost: a.test\r\n\r\n" % target)[0]
    assert isinstance(head, RequestHead)
    assert (head.path, head.host) == (path, host)


# ---- responses --------------------------------------------------------------


def _respond(data: bytes, head_request: bool = False, eof: bool = False) -> list[ResponseEvent]:
    parser = ResponseParser(head_request)
    events = parser.feed(data)
    if eof:
        events += parser.feed_eof()
    return events


def _body(events: list[ResponseEvent]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, BodyData))


def test_response_content_length() -> None:
    events = _respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello")
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert (head.status, head.reason, head.framing) == (200, b"OK", Framing.LENGTH)
    assert head.content_length == 5 and head.keep_alive
    assert _body(events) == b"hello"
    assert events[-1] is END


def test_response_chunked() -> None:
    events = _respond(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    assert isinstance(events[0], ResponseHead) and events[0].framing is Framing.CHUNKED
    assert _body(events) == b"abcde"
    assert events[-1] is END


def test_response_close_delimited_ends_at_eof() -> None:
    parser = ResponseParser(False)
    events = parser.feed(b"HTTP/1.1 200 OK\r\n\r\nsome")
    events += parser.feed(b" body")
    assert events[-1] is not END
    events += parser.feed_eof()
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert head.framing is Framing.CLOSE and not head.keep_alive
    assert _body(events) == b"some body"
    assert events[-1] is END


def test_response_interim_1xx_is_skipped() -> None:
    events = _respond(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    )
    heads = [e for e in events if isinstance(e, ResponseHead)]
    assert [h.status for h in heads] == [201]
    assert _body(events) == b"ok"


def test_response_to_head_has_no_body() -> None:
    parser = ResponseParser(True)
    events = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    head = events[0]
    assert isinstance(head, ResponseHead)
    assert head.framing is Framing.NONE and head.content_length == 1000
    assert events[-1] is END and parser.done and not parser.extra


def test_body_bytes_after_a_head_response_mark_the_connection() -> None:
    parser = ResponseParser(True)
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
    assert parser.done and parser.extra


@pytest.mark.parametrize("status", [204, 304])
def test_response_without_body(status: int) -> None:
    events = _respond(b"HTTP/1.1 %d X\r\nContent-Length: 7\r\n\r\n" % status)
    assert isinstance(events[0], ResponseHead) and events[0].framing is Framing.NONE
    assert events[-1] is END


def test_response_http10_is_not_kept_alive_without_asking() -> None:
    events = _respond(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert isinstance(events[0], ResponseHead) and not events[0].keep_alive
    events = _respond(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok")
    assert isinstance(events[0], ResponseHead) and events[0].keep_alive


def test_response_connection_close() -> None:
    events = _respond(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    assert isinstance(events[0], ResponseHead) and not events[0].keep_alive


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n",
    ],
)
def test_malformed_responses_raise(raw: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        ResponseParser(False).feed(raw)


def test_protocol_errors_are_tiers_errors() -> None:
    assert issubclass(UpstreamProtocolError, ProxyError)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
    ],
)
def test_truncated_responses_raise_at_eof(raw: bytes) -> None:
    parser = ResponseParser(False)
    parser.feed(raw)
    with pytest.raises(UpstreamProtocolError):
        parser.feed_eof()


def test_response_head_size_is_bounded() -> None:
    parser = ResponseParser(False)
    parser.feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(UpstreamProtocolError):
        for _ in range(100):
            parser.feed(b"X-Filler: " + b"f" * 1000 + b"\r\n")


# ---- one response parser per connection ---------------------------------------

_KEPT_ALIVE = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
    b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
]
_OTHERS = [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\n\r\nclose-delimited",
]


def _without_body(raw: bytes) -> bytes:
    """The response as it comes to a HEAD request: up to the end of the final head."""
    return raw[: raw.index(b"\r\n\r\n", raw.rindex(b"HTTP/1.")) + 4]


def _described(events: list[ResponseEvent]) -> list[object]:
    """Events as comparable values, the body joined (pieces depend on the reads)."""
    heads = [e for e in events if isinstance(e, ResponseHead)]
    return [
        [(h.status, h.reason, h.version, h.headers, h.framing, h.content_length, h.keep_alive,
          h.connection) for h in heads],
        _body(events),
        [e for e in events if isinstance(e, MessageEnd)],
        events[-1] is END,
    ]


@pytest.mark.parametrize("first", _KEPT_ALIVE + _OTHERS)
@pytest.mark.parametrize("head_first", [False, True])
@pytest.mark.parametrize("mode", ["whole", "bytes"])
def test_a_reused_response_parser_reads_each_response_as_a_fresh_one(
    first: bytes, head_first: bool, mode: str
) -> None:
    parser = ResponseParser(head_first)
    parser.feed(_without_body(first) if head_first else first)
    for second in _KEPT_ALIVE:
        for head_request in (False, True):
            raw = _without_body(second) if head_request else second
            parser.begin(head_request)
            events: list[ResponseEvent] = []
            for piece in _pieces(raw, mode):
                events += parser.feed(piece)
            assert parser.done and parser.reusable
            assert _described(events) == _described(ResponseParser(head_request).feed(raw))


def test_after_a_head_response_the_next_response_is_not_taken_for_its_body() -> None:
    parser = ResponseParser(True)
    events = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n")
    assert events[-1] is END and parser.reusable
    parser.begin(False)
    events = parser.feed(b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nok")
    head = events[0]
    assert isinstance(head, ResponseHead) and head.status == 202
    assert _body(events) == b"ok" and events[-1] is END


def test_a_second_response_to_one_request_is_not_delivered() -> None:
    parser = ResponseParser(False)
    events = parser.feed(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"
    )
    assert [type(e) for e in events] == [ResponseHead, BodyData, MessageEnd]
    assert _body(events) == b"ok"
    assert parser.extra and not parser.reusable


def test_a_response_that_did_not_end_is_not_reused() -> None:
    parser = ResponseParser(False)
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert not parser.done and not parser.reusable
    parser.begin(False)
    events = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert isinstance(events[0], ResponseHead) and _body(events) == b"ok"


def test_response_parsers_leave_nothing_for_the_cycle_collector() -> None:
    gc.collect()
    gc.disable()
    try:
        for head_request in (False, True):
            parser = ResponseParser(head_request)
            parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nok")
            parser.begin(False)
            parser.feed(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
            )
            del parser
        assert gc.collect() == 0
    finally:
        gc.enable()
