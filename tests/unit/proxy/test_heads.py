"""The C heads module (``tiers.proxy._heads``): its scanners against llhttp,
its head writer against the Python one.

The scanners may only read what llhttp would read the same way, and must
decline the rest. So every request of the corpus, and thousands of mutants
of plain requests and responses, go through each parser twice, with the
scanner and without, and the events must be the same; separate tests show
that the scanner does take the plain heads (or the comparison would prove
nothing) and declines what it should.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.conftest import require
from tiers.errors import ProxyError
from tiers.proxy.heads import JOIN_HEAD, SCAN_REQUEST, SCAN_RESPONSE, join_head
from tiers.proxy.http1 import END, BodyData, Framing, MessageEnd
from tiers.proxy.requestparser import RequestError, RequestEvent, RequestHead, RequestParser
from tiers.proxy.responseparser import ResponseEvent, ResponseHead, ResponseParser

CORPUS = Path(__file__).parent / "requests"
ALL_REQUESTS = sorted(CORPUS.glob("*/*.http"))

PLAIN_REQUEST = (b"GET /index.html?q=1&r=%41 HTTP/1.1\r\nHost: example.com:8080\r\n"
                 b"User-Agent: Mozilla/5.0 (X11)\r\nAccept: */*\r\nX-Forwarded-For: 10.0.0.1\r\n"
                 b"Connection: keep-alive\r\nReferer: http://a.test/\r\n\r\n")
PLAIN_RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: app\r\nContent-Type: text/html\r\n"
                  b"Content-Length: 5\r\nConnection: keep-alive\r\n\r\nhello")
# Bytes that break a plain head in interesting ways where they land.
_MUTANT_BYTES = [b"\r", b"\n", b" ", b"\t", b":", b"\x00", b"\x7f", b"\x80", b"#", b"\r\n",
                 b"\r\n ", b"\r\n\r\n", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 3\r\n",
                 b"Host: b\r\n", b"\xff", b"\"", b"{", b"HTTP/1.1", b"0", b"9",
                 b"Expect: 100-continue\r\n", b"Connection: close\r\n", b"Referer: r\r\n",
                 b"X-Forwarded-For: 10.9.9.9\r\n", b"User-Agent: u\r\n"]


@pytest.fixture(autouse=True)
def _scanner_built() -> None:
    require(SCAN_REQUEST is not None and SCAN_RESPONSE is not None and JOIN_HEAD is not join_head,
            "the C module tiers.proxy._heads is not built (pip install -e . needs a C compiler)")


def _request_events(data: bytes, use_scanner: bool) -> list[object]:
    return _described(RequestParser(use_scanner=use_scanner).feed(data))


def _described(events: list[RequestEvent]) -> list[object]:
    """Events as comparable values, each body joined (its pieces depend on the reads)."""
    out: list[object] = []
    for event in events:
        if isinstance(event, RequestHead):
            out.append(("head", event.method, event.target, event.path, event.version,
                        event.headers, list(event.names), event.host, event.keep_alive,
                        event.framing, event.content_length, event.expect_continue,
                        event.connection, event.user_agent, event.forwarded_for,
                        event.referer))
        elif isinstance(event, RequestError):
            out.append(("error", event.status, event.reason))
        elif isinstance(event, MessageEnd):
            out.append("end")
        elif out and isinstance(out[-1], tuple) and out[-1][0] == "body":
            out[-1] = ("body", out[-1][1] + event.data)
        else:
            out.append(("body", event.data))
    return out


def _mutants(base: bytes, count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        data = bytearray(base)
        for _ in range(rng.randint(1, 2)):
            at = rng.randrange(len(data) + 1)
            if rng.random() < 0.3 and at < len(data):
                del data[at : at + rng.randint(1, 3)]
            else:
                data[at:at] = rng.choice(_MUTANT_BYTES)
        out.append(bytes(data))
    return out


@pytest.mark.parametrize("path", ALL_REQUESTS,
                         ids=[f"{p.parent.name}/{p.stem}" for p in ALL_REQUESTS])
def test_corpus_requests_parse_the_same_with_and_without_the_scanner(path: Path) -> None:
    data = path.read_bytes()
    assert _request_events(data, True) == _request_events(data, False)


def _fed_in_pieces(data: bytes, use_scanner: bool, rng: random.Random) -> list[object]:
    parser = RequestParser(use_scanner=use_scanner)
    events: list[RequestEvent] = []
    pos = 0
    while pos < len(data):
        step = rng.choice([1, 7, 64, 200, 4096])
        events += parser.feed(data[pos : pos + step])
        pos += step
    return _described(events)


def test_requests_pipelined_in_any_order_parse_the_same_with_and_without_the_scanner() -> None:
    # Heads the scanner reads and heads llhttp reads (bodies, upgrades, odd
    # forms) alternate on one connection, whole or split across reads.
    valid = [p.read_bytes() for p in sorted(CORPUS.glob("valid/*.http"))
             if b"close" not in p.read_bytes().lower() and b"HTTP/1.0" not in p.read_bytes()]
    rng = random.Random(5)
    for _ in range(400):
        data = b"".join(rng.choice(valid) for _ in range(rng.randrange(2, 6)))
        assert _request_events(data, True) == _request_events(data, False)
        seed = rng.randrange(1 << 30)
        assert _fed_in_pieces(data, True, random.Random(seed)) == \
            _fed_in_pieces(data, False, random.Random(seed))


def test_mutated_requests_parse_the_same_with_and_without_the_scanner() -> None:
    scanned = 0
    for data in _mutants(PLAIN_REQUEST, 4000, seed=1):
        assert _request_events(data, True) == _request_events(data, False), data
        if SCAN_REQUEST is not None and isinstance(SCAN_REQUEST(data, 0, 8192, 8190, 100), tuple):
            scanned += 1
    # Mutants the scanner read itself were compared too, not only its refusals.
    assert scanned > 100


def test_plain_requests_are_read_by_the_scanner() -> None:
    assert SCAN_REQUEST is not None
    scanned = SCAN_REQUEST(PLAIN_REQUEST, 0, 8192, 8190, 100)
    assert isinstance(scanned, tuple), scanned
    method, target, version, headers, names, stop, *fields = scanned
    assert stop == len(PLAIN_REQUEST)
    assert (method, target, version) == (b"GET", b"/index.html?q=1&r=%41", b"1.1")
    assert headers[0] == (b"Host", b"example.com:8080")
    assert names == [b"host", b"user-agent", b"accept", b"x-forwarded-for", b"connection",
                     b"referer"]
    # Host, Connection, User-Agent, X-Forwarded-For, Referer, Expect
    assert fields == [b"example.com:8080", b"keep-alive", b"Mozilla/5.0 (X11)", b"10.0.0.1",
                      b"http://a.test/", None]
    # At an offset, followed by more, HTTP/1.0 too; names met again are the same objects.
    data = b"xx" + PLAIN_REQUEST.replace(b"HTTP/1.1", b"HTTP/1.0") + b"GET / HTTP/1.1\r\n"
    again = SCAN_REQUEST(data, 2, 8192, 8190, 100)
    assert isinstance(again, tuple) and again[2] == b"1.0"
    assert again[5] == 2 + len(PLAIN_REQUEST)
    assert again[4][0] is names[0] and again[3][0][0] is headers[0][0]


@pytest.mark.parametrize("head", [
    b"GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a \r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: caf\xc3\xa9\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: a\r\nConnection: close\r\n\r\n",
], ids=lambda h: repr(h[:40]))
def test_the_request_scanner_declines_what_is_not_plain(head: bytes) -> None:
    assert SCAN_REQUEST is not None
    # Declined, it says where the head ends, for llhttp to read it.
    assert SCAN_REQUEST(head + b"GET", 0, 8192, 8190, 100) == len(head)


def test_the_request_scanner_finds_the_head_within_the_limits_or_says_minus_one() -> None:
    assert SCAN_REQUEST is not None
    size = len(PLAIN_REQUEST)
    line = PLAIN_REQUEST.index(b"\r\n")
    assert isinstance(SCAN_REQUEST(PLAIN_REQUEST, 0, size, line, 100), tuple)
    assert SCAN_REQUEST(PLAIN_REQUEST, 0, size - 1, line, 100) == -1  # head too large
    assert SCAN_REQUEST(PLAIN_REQUEST, 0, size, line - 1, 100) == -1  # line too long
    assert SCAN_REQUEST(PLAIN_REQUEST[:-1], 0, 8192, 8190, 100) == -1  # not all there
    assert SCAN_REQUEST(PLAIN_REQUEST, size, 8192, 8190, 100) == -1  # nothing at start
    with pytest.raises(ValueError, match="start outside"):
        SCAN_REQUEST(PLAIN_REQUEST, size + 1, 8192, 8190, 100)


def _whole_or_feed(parser: ResponseParser, data: bytes) -> list[ResponseEvent]:
    """``feed_whole``'s head and body as the events ``feed`` gives; ``feed`` if it declines."""
    head = parser.feed_whole(data)
    if head is None:
        return parser.feed(data)
    length = head.content_length
    if head.framing is Framing.LENGTH and length:
        return [head, BodyData(data[len(data) - length:]), END]
    return [head, END]


def _response_run(data: bytes, head_request: bool, use_scanner: bool,
                  whole: bool = False) -> list[object]:
    parser = ResponseParser(head_request, use_scanner=use_scanner)
    try:
        events: list[ResponseEvent] = (_whole_or_feed(parser, data) if whole
                                       else parser.feed(data))
    except ProxyError as exc:
        return ["error", str(exc)]
    out: list[object] = []
    for event in events:
        if isinstance(event, ResponseHead):
            out.append((event.status, event.reason, event.version, event.headers,
                        list(event.names), event.framing, event.content_length,
                        event.keep_alive, event.connection))
        elif isinstance(event, MessageEnd):
            out.append("end")
        else:
            out.append(event.data)
    out.append((parser.done, parser.extra, parser.reusable))
    # The parser reads the next response on the connection alike either way.
    if parser.reusable:
        parser.begin(False)
        out.append([type(e).__name__ for e in parser.feed(PLAIN_RESPONSE)])
    return out


@pytest.mark.parametrize("head_request", [False, True])
def test_mutated_responses_parse_the_same_with_and_without_the_scanner(
    head_request: bool,
) -> None:
    base = PLAIN_RESPONSE[: PLAIN_RESPONSE.index(b"\r\n\r\n") + 4] if head_request \
        else PLAIN_RESPONSE
    scanned = 0
    for data in [base, *_mutants(base, 3000, seed=2 + head_request)]:
        by_llhttp = _response_run(data, head_request, False)
        assert _response_run(data, head_request, True) == by_llhttp, data
        assert _response_run(data, head_request, True, whole=True) == by_llhttp, data
        if SCAN_RESPONSE is not None and SCAN_RESPONSE(data, 200) is not None:
            scanned += 1
    assert scanned > 100


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 204 No Content\r\nServer: a\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\nETag: \"x\"\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nuntil close",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nConnection: x-a, Keep-Alive\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nConnection: x-a\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
], ids=lambda r: repr(r[:30]))
@pytest.mark.parametrize("head_request", [False, True])
def test_responses_parse_the_same_with_and_without_the_scanner(
    raw: bytes, head_request: bool,
) -> None:
    by_llhttp = _response_run(raw, head_request, False)
    assert _response_run(raw, head_request, True) == by_llhttp
    assert _response_run(raw, head_request, True, whole=True) == by_llhttp


def test_plain_responses_are_read_by_the_scanner() -> None:
    assert SCAN_RESPONSE is not None
    assert SCAN_RESPONSE(PLAIN_RESPONSE, 200) == (
        200, b"OK", b"1.1",
        [(b"Server", b"app"), (b"Content-Type", b"text/html"), (b"Content-Length", b"5"),
         (b"Connection", b"keep-alive")],
        [b"server", b"content-type", b"content-length", b"connection"],
        len(PLAIN_RESPONSE) - 5, 5, b"keep-alive")
    assert SCAN_RESPONSE(b"HTTP/1.0 404 Not Found\r\n\r\n", 200) == (
        404, b"Not Found", b"1.0", [], [], 26, -1, None)
    # Incomplete, interim, chunked, repeated Connection, too many fields: llhttp's.
    assert SCAN_RESPONSE(
        b"HTTP/1.1 200 OK\r\nConnection: a\r\nConnection: close\r\n\r\n", 200) is None
    assert SCAN_RESPONSE(PLAIN_RESPONSE[:30], 200) is None
    assert SCAN_RESPONSE(b"HTTP/1.1 103 Early Hints\r\n\r\n", 200) is None
    assert SCAN_RESPONSE(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 200) is None
    assert SCAN_RESPONSE(PLAIN_RESPONSE, 3) is None


def test_recurring_header_fields_are_shared_and_long_ones_are_not() -> None:
    require(SCAN_RESPONSE is not None, "the C helpers are not built")
    long_value = b"v" * 200
    data = b"HTTP/1.1 200 OK\r\nServer: app\r\nX-Long: %s\r\n\r\n" % long_value
    first, second = SCAN_RESPONSE(data, 10), SCAN_RESPONSE(data, 10)
    assert first is not None and second is not None
    assert first[3] == second[3] == [(b"Server", b"app"), (b"X-Long", long_value)]
    assert first[3][0] is second[3][0]  # one tuple for a field that recurs
    assert first[3][1] is not second[3][1]  # the cache keeps no long value alive


def test_feed_whole_takes_a_whole_plain_response_or_leaves_the_parser_as_it_was() -> None:
    require(SCAN_RESPONSE is not None, "the C helpers are not built")
    parser = ResponseParser()
    # Part of it, or more than it: declined, and feed still reads it all.
    assert parser.feed_whole(PLAIN_RESPONSE[:-1]) is None
    assert parser.feed_whole(PLAIN_RESPONSE + b"x") is None
    assert not parser.done
    head = parser.feed_whole(PLAIN_RESPONSE)
    assert head is not None and head.status == 200 and head.content_length == 5
    assert parser.done and parser.reusable and parser.head is head
    # Once a response has ended, more bytes are feed's to judge (extra).
    assert parser.feed_whole(PLAIN_RESPONSE) is None
    assert parser.feed(b"x") == [] and parser.extra
    # Without the scanner, there is nothing it could take.
    assert ResponseParser(use_scanner=False).feed_whole(PLAIN_RESPONSE) is None


def test_the_c_head_writer_writes_what_the_python_one_does() -> None:
    rng = random.Random(3)
    pool = [b"Host", b"Accept", b"X-A", b"Connection", b"Keep-Alive", b"Cookie", b"", b"te"]
    for _ in range(2000):
        headers = [(rng.choice(pool),
                    bytes(rng.randrange(32, 127) for _ in range(rng.randrange(6))))
                   for _ in range(rng.randrange(8))]
        names = [name.lower() for name, _ in headers]
        drop = frozenset(rng.sample([b"host", b"connection", b"keep-alive", b"te", b"x-a"],
                                    rng.randrange(4)))
        first = [b"GET / HTTP/1.1"][: rng.randrange(2)]
        last = [b"X-Forwarded-For: 10.0.0.%d" % i for i in range(rng.randrange(3))]
        head = JOIN_HEAD(first, names, headers, drop, last)
        assert head == join_head(first, names, headers, drop, last)
        assert head.endswith(b"\r\n\r\n") or head == b"\r\n"
    assert JOIN_HEAD([b"HTTP/1.1 200 OK"], [b"a", b"b"], [(b"A", b"1"), (b"B", b"2")],
                     frozenset({b"b"}), [b"Content-Length: 0"]) == (
        b"HTTP/1.1 200 OK\r\nA: 1\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize(("args", "error"), [
    (([], [b"a"], [], frozenset(), []), ValueError),
    (([], [b"a"], [(b"A", "1")], frozenset(), []), TypeError),
    (([], [b"a"], [(b"A",)], frozenset(), []), TypeError),
    (([], ["a"], [(b"A", b"1")], frozenset(), []), TypeError),
    ((["GET"], [], [], frozenset(), []), TypeError),
    (([], [], [], [b"a"], []), TypeError),
], ids=["lengths", "str-value", "short-field", "str-name", "str-line", "list-drop"])
def test_the_c_head_writer_refuses_what_is_not_a_head(args: tuple[object, ...],
                                                      error: type[Exception]) -> None:
    with pytest.raises(error):
        JOIN_HEAD(*args)  # type: ignore[arg-type]
