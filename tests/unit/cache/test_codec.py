"""The client-side memcached codec: request bytes, key checks and the reply corpus.

The reply corpus is the tables below. ``UNITS`` are single replies with the
event each must yield; every ``VALID`` case is a sequence of them, fed whole,
split at every byte offset, and byte by byte. Every proper prefix of a unit is
a truncated reply, which ``close()`` must reject. ``MALFORMED`` cases must
raise ``ProtocolError`` however they are split.
"""

from __future__ import annotations

import pytest

from tiers.cache.codec import (
    DELETED,
    END,
    EXISTS,
    MAX_KEYS_PER_LINE,
    NOT_FOUND,
    NOT_STORED,
    OK,
    RESET,
    STORED,
    TOUCHED,
    ErrorReply,
    Event,
    Number,
    ReplyParser,
    Stat,
    Value,
    Version,
    cas_result,
    decr_request,
    delete_request,
    delete_result,
    encode_key,
    flush_all_request,
    gat_request,
    get_request,
    incr_request,
    line_count,
    number_result,
    ok_result,
    retrieval_request,
    stats_request,
    storage_result,
    store_request,
    touch_request,
    touch_result,
    version_request,
    version_result,
)
from tiers.cache.errors import CacheKeyError, CacheValueError, ProtocolError

MAX_VALUE = 1000  # parser limit used for the corpus

UNITS: dict[str, tuple[bytes, Event]] = {
    "end": (b"END\r\n", END),
    "stored": (b"STORED\r\n", STORED),
    "not_stored": (b"NOT_STORED\r\n", NOT_STORED),
    "exists": (b"EXISTS\r\n", EXISTS),
    "not_found": (b"NOT_FOUND\r\n", NOT_FOUND),
    "deleted": (b"DELETED\r\n", DELETED),
    "touched": (b"TOUCHED\r\n", TOUCHED),
    "ok": (b"OK\r\n", OK),
    "reset": (b"RESET\r\n", RESET),
    "number": (b"42\r\n", Number(42)),
    "number_zero": (b"0\r\n", Number(0)),
    "number_max": (b"18446744073709551615\r\n", Number(2**64 - 1)),
    "version": (b"VERSION 1.6.18\r\n", Version("1.6.18")),
    "stat": (b"STAT curr_items 3\r\n", Stat("curr_items", "3")),
    "stat_spaces": (b"STAT libevent 2.1 stable\r\n", Stat("libevent", "2.1 stable")),
    "error": (b"ERROR\r\n", ErrorReply("ERROR", "")),
    "client_error": (
        b"CLIENT_ERROR bad data chunk\r\n",
        ErrorReply("CLIENT_ERROR", "bad data chunk"),
    ),
    "server_error": (
        b"SERVER_ERROR object too large for cache\r\n",
        ErrorReply("SERVER_ERROR", "object too large for cache"),
    ),
    "value": (b"VALUE k 0 5\r\nhello\r\n", Value(b"k", 0, b"hello", None)),
    "value_cas": (b"VALUE k 7 2\r\nhi\r\n", Value(b"k", 7, b"hi", None)),
    "value_with_cas": (b"VALUE k 1 3 99\r\nabc\r\n", Value(b"k", 1, b"abc", 99)),
    "value_empty": (b"VALUE k 0 0\r\n\r\n", Value(b"k", 0, b"", None)),
    "value_crlf_inside": (b"VALUE k 0 6\r\na\r\nb\r\n\r\n", Value(b"k", 0, b"a\r\nb\r\n", None)),
    "value_binary": (b"VALUE k 0 4\r\n\x00\xff\r\x0a\r\n", Value(b"k", 0, b"\x00\xff\r\n", None)),
    "value_end_lookalike": (b"VALUE k 0 5\r\nEND\r\n\r\n", Value(b"k", 0, b"END\r\n", None)),
    "value_max_flags": (
        b"VALUE k 4294967295 1 18446744073709551615\r\nx\r\n",
        Value(b"k", 2**32 - 1, b"x", 2**64 - 1),
    ),
    "value_utf8_key": ("VALUE ключ 0 1\r\nx\r\n".encode(), Value("ключ".encode(), 0, b"x", None)),
    "value_at_limit": (
        b"VALUE big 0 1000\r\n" + b"z" * 1000 + b"\r\n",
        Value(b"big", 0, b"z" * 1000, None),
    ),
}

VALID: dict[str, list[str]] = {
    **{name: [name] for name in UNITS},
    "get_hit": ["value", "end"],
    "gets_hit": ["value_with_cas", "end"],
    "get_many": ["value", "value_cas", "value_empty", "value_binary", "end"],
    "get_two_lines": ["value", "end", "value_with_cas", "end"],
    "pipelined_mixed": ["stored", "deleted", "number", "value", "end", "touched", "ok"],
    "stats": ["stat", "stat_spaces", "end"],
    "big_then_small": ["value_at_limit", "value", "end"],
}

MALFORMED: dict[str, bytes] = {
    "value_too_few_fields": b"VALUE k 0\r\nx\r\n",
    "value_too_many_fields": b"VALUE k 0 1 2 3\r\nx\r\n",
    "value_bad_flags": b"VALUE k x 1\r\nx\r\n",
    "value_negative_flags": b"VALUE k -1 1\r\nx\r\n",
    "value_negative_length": b"VALUE k 0 -1\r\nx\r\n",
    "value_bad_length": b"VALUE k 0 1x\r\nx\r\n",
    "value_signed_length": b"VALUE k 0 +1\r\nx\r\n",
    "value_bad_cas": b"VALUE k 0 1 abc\r\nx\r\n",
    "value_cas_too_long": b"VALUE k 0 1 123456789012345678901\r\nx\r\n",
    "value_empty_key": b"VALUE  0 1\r\nx\r\n",
    "value_over_max": b"VALUE k 0 1001\r\n" + b"x" * 1001 + b"\r\n",
    "value_huge_length": b"VALUE k 0 99999999999999999999999\r\n",
    "data_shorter_than_header": b"VALUE k 0 5\r\nabc\r\nEND\r\n",
    "data_longer_than_header": b"VALUE k 0 2\r\nabcd\r\nEND\r\n",
    "data_without_crlf": b"VALUE k 0 1\r\nxEND\r\n",
    "data_with_bare_lf": b"VALUE k 0 1\r\nx\nEND\r\n",
    "unknown_word": b"HELLO\r\n",
    "lowercase_status": b"stored\r\n",
    "status_trailing_space": b"STORED \r\n",
    "version_without_text": b"VERSION\r\n",
    "stat_without_name": b"STAT\r\n",
    "error_prefix_only": b"ERRORS\r\n",
    "negative_number": b"-1\r\n",
    "number_over_u64": b"18446744073709551616\r\n",
    "empty_line": b"\r\n",
    "bare_lf": b"STORED\n",
    "cr_inside_line": b"STO\rRED\r\n",
    "line_too_long": b"SERVER_ERROR " + b"x" * 9000 + b"\r\n",
    "endless_line": b"x" * 9000,
    "garbage_after_valid": b"STORED\r\nEND\r\n\x00\x01\r\n",
}


def _drain(parser: ReplyParser) -> list[Event]:
    events: list[Event] = []
    while (event := parser.next_event()) is not None:
        events.append(event)
    return events


def _feed_chunks(chunks: list[bytes]) -> tuple[list[Event], ReplyParser]:
    parser = ReplyParser(max_value=MAX_VALUE)
    events: list[Event] = []
    for chunk in chunks:
        parser.feed(chunk)
        events.extend(_drain(parser))
    return events, parser


def _case(name: str) -> tuple[bytes, list[Event]]:
    units = [UNITS[unit] for unit in VALID[name]]
    return b"".join(data for data, _ in units), [event for _, event in units]


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_reply_whole_and_split_at_every_offset(name: str) -> None:
    data, expected = _case(name)
    splits = [[data]] + [[data[:i], data[i:]] for i in range(1, len(data))]
    for chunks in splits:
        events, parser = _feed_chunks(chunks)
        assert events == expected, chunks
        assert parser.pending == 0
        parser.close()


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_reply_byte_by_byte(name: str) -> None:
    data, expected = _case(name)
    events, parser = _feed_chunks([data[i : i + 1] for i in range(len(data))])
    assert events == expected
    parser.close()


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_reply_with_take_values(name: str) -> None:
    data, expected = _case(name)
    for i in range(len(data) + 1):
        parser = ReplyParser(max_value=MAX_VALUE)
        got: list[Event] = []
        for chunk in (data[:i], data[i:]):
            parser.feed(chunk)
            while True:
                values: list[Value] = []
                event = parser.take_values(values)
                got.extend(values)
                if event is None:
                    break
                got.append(event)
        assert got == expected


@pytest.mark.parametrize("name", sorted(UNITS))
def test_truncated_reply_is_rejected_at_close(name: str) -> None:
    data, _ = UNITS[name]
    for cut in range(1, len(data)):
        parser = ReplyParser(max_value=MAX_VALUE)
        parser.feed(data[:cut])
        assert _drain(parser) == []
        with pytest.raises(ProtocolError, match="truncated"):
            parser.close()


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_reply_is_rejected_however_split(name: str) -> None:
    data = MALFORMED[name]
    step = max(1, len(data) // 200)  # long cases: a sample of offsets keeps this quick
    for cut in [*range(0, len(data), step), len(data)]:
        parser = ReplyParser(max_value=MAX_VALUE)
        with pytest.raises(ProtocolError):
            for chunk in (data[:cut], data[cut:]):
                parser.feed(chunk)
                _drain(parser)
            parser.close()


def test_parser_stays_failed() -> None:
    parser = ReplyParser()
    parser.feed(b"BOGUS\r\n")
    with pytest.raises(ProtocolError):
        parser.next_event()
    parser.feed(b"STORED\r\n")
    with pytest.raises(ProtocolError, match="unknown reply line"):
        parser.next_event()
    with pytest.raises(ProtocolError):
        parser.close()


def test_error_messages_name_the_problem() -> None:
    cases = {
        b"VALUE k 0 5\r\nabc\r\nEND\r\n": "length does not match",
        b"STORED\n": "CRLF",
        b"VALUE k x 1\r\nx\r\n": "bad VALUE line",
        b"HELLO\r\n": "unknown reply line b'HELLO'",
        b"VALUE k 0 1001\r\n": "exceeds the maximum of 1000",
    }
    for data, message in cases.items():
        parser = ReplyParser(max_value=MAX_VALUE)
        parser.feed(data)
        with pytest.raises(ProtocolError, match=message):
            _drain(parser)


def test_wanted_hints_the_rest_of_a_data_block() -> None:
    parser = ReplyParser()
    parser.feed(b"VALUE k 0 100\r\n" + b"x" * 10)
    assert parser.next_event() is None
    assert parser.wanted == 90 + 2
    parser.feed(b"x" * 90 + b"\r\nEND\r\n")
    assert parser.next_event() == Value(b"k", 0, b"x" * 100, None)
    assert parser.next_event() is END


def test_large_value_in_many_chunks() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    data = b"VALUE big 3 %d 5\r\n" % len(body) + body + b"\r\nEND\r\n"
    parser = ReplyParser()
    events: list[Event] = []
    for i in range(0, len(data), 65536):
        parser.feed(memoryview(data)[i : i + 65536])
        events.extend(_drain(parser))
    assert events == [Value(b"big", 3, body, 5), END]


# --- requests ---------------------------------------------------------------


def test_retrieval_requests() -> None:
    assert get_request(["a"]) == b"get a\r\n"
    assert get_request(["a", b"b", "c"]) == b"get a b c\r\n"
    assert get_request(["a"], cas=True) == b"gets a\r\n"
    assert gat_request(300, ["a", "b"]) == b"gat 300 a b\r\n"
    assert gat_request(-1, ["a"], cas=True) == b"gats -1 a\r\n"
    with pytest.raises(CacheKeyError, match="no keys"):
        get_request([])


def test_many_keys_become_several_lines_in_one_request() -> None:
    keys = [b"k%d" % i for i in range(MAX_KEYS_PER_LINE * 2 + 1)]
    request = retrieval_request(b"get", keys)
    lines = request.split(b"\r\n")[:-1]
    assert len(lines) == 3 == line_count(len(keys))
    assert all(line.startswith(b"get ") for line in lines)
    assert b" ".join(line[4:] for line in lines).split(b" ") == keys
    assert line_count(1) == 1 and line_count(MAX_KEYS_PER_LINE) == 1


def test_storage_requests() -> None:
    assert store_request("set", "k", b"abc") == b"set k 0 0 3\r\nabc\r\n"
    assert (
        store_request("set", "k", b"abc", flags=5, exptime=60, noreply=True)
        == b"set k 5 60 3 noreply\r\nabc\r\n"
    )
    assert store_request("add", b"k", b"") == b"add k 0 0 0\r\n\r\n"
    assert store_request("replace", "k", bytearray(b"x")) == b"replace k 0 0 1\r\nx\r\n"
    assert store_request("append", "k", memoryview(b"xy")) == b"append k 0 0 2\r\nxy\r\n"
    assert store_request("prepend", "k", b"\r\n") == b"prepend k 0 0 2\r\n\r\n\r\n"
    assert store_request("cas", "k", b"v", exptime=-1, cas_unique=77) == b"cas k 0 -1 1 77\r\nv\r\n"
    assert (
        store_request("cas", "k", b"v", cas_unique=2**64 - 1, noreply=True)
        == b"cas k 0 0 1 18446744073709551615 noreply\r\nv\r\n"
    )
    assert store_request("set", "k", b"v", flags=2**32 - 1).startswith(b"set k 4294967295 0 1")


def test_storage_request_checks() -> None:
    with pytest.raises(ValueError, match="unknown storage command"):
        store_request("put", "k", b"v")
    with pytest.raises(ValueError, match="needs cas_unique"):
        store_request("cas", "k", b"v")
    with pytest.raises(ValueError, match="takes no cas_unique"):
        store_request("set", "k", b"v", cas_unique=1)
    with pytest.raises(CacheValueError, match="flags"):
        store_request("set", "k", b"v", flags=2**32)
    with pytest.raises(CacheValueError, match="flags"):
        store_request("set", "k", b"v", flags=-1)
    with pytest.raises(CacheValueError, match="exptime"):
        store_request("set", "k", b"v", exptime=2**31)
    with pytest.raises(CacheValueError, match="cas unique"):
        store_request("cas", "k", b"v", cas_unique=-1)
    with pytest.raises(CacheValueError, match="exceeds the maximum of 10"):
        store_request("set", "k", b"x" * 11, max_value=10)
    assert store_request("set", "k", b"x" * 10, max_value=10).endswith(b"x" * 10 + b"\r\n")
    big = b"x" * (1 << 20)
    assert store_request("set", "k", big).endswith(big + b"\r\n")
    with pytest.raises(CacheValueError):
        store_request("set", "k", big + b"x")


def test_other_requests() -> None:
    assert delete_request("k") == b"delete k\r\n"
    assert delete_request("k", noreply=True) == b"delete k noreply\r\n"
    assert incr_request("n") == b"incr n 1\r\n"
    assert incr_request("n", 2**64 - 1, noreply=True) == b"incr n 18446744073709551615 noreply\r\n"
    assert decr_request("n", 5) == b"decr n 5\r\n"
    assert touch_request("k", 10) == b"touch k 10\r\n"
    assert touch_request("k", 0, noreply=True) == b"touch k 0 noreply\r\n"
    assert version_request() == b"version\r\n"
    assert flush_all_request() == b"flush_all\r\n"
    assert flush_all_request(10) == b"flush_all 10\r\n"
    assert flush_all_request(noreply=True) == b"flush_all noreply\r\n"
    assert stats_request() == b"stats\r\n"
    assert stats_request("settings") == b"stats settings\r\n"
    with pytest.raises(CacheValueError):
        incr_request("n", -1)
    with pytest.raises(CacheValueError):
        decr_request("n", 2**64)
    with pytest.raises(ValueError):
        stats_request("two words")


# --- keys -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "encoded"),
    [
        ("a", b"a"),
        ("user:42:profile", b"user:42:profile"),
        (b"bytes-key", b"bytes-key"),
        ("k" * 250, b"k" * 250),
        ("é" * 125, "é".encode() * 125),
        (bytearray(b"ba"), b"ba"),
        ("~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./", b"~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./"),
        (b"\x80\xff", b"\x80\xff"),
    ],
)
def test_valid_keys(key: str | bytes, encoded: bytes) -> None:
    assert encode_key(key) == encoded


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "empty"),
        (b"", "empty"),
        ("k" * 251, "251 bytes long, the limit is 250"),
        ("é" * 126, "252 bytes long"),
        ("a b", r"whitespace \(0x20\)"),
        ("a\tb", r"whitespace \(0x09\)"),
        ("a\r\nb", "whitespace"),
        ("line\n", r"whitespace \(0x0a\)"),
        ("a\x00b", r"control byte \(0x00\)"),
        ("a\x1bb", r"control byte \(0x1b\)"),
        ("a\x7fb", r"control byte \(0x7f\)"),
        (b"a\x01", "control byte"),
        ("\ud800", "not encodable as UTF-8"),
        (42, "must be str or bytes, not int"),
        (None, "must be str or bytes, not NoneType"),
    ],
)
def test_invalid_keys(key: object, reason: str) -> None:
    with pytest.raises(CacheKeyError, match=reason) as info:
        encode_key(key)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert not isinstance(info.value, KeyError)
    assert info.value.key == key


def test_requests_validate_their_keys() -> None:
    for build in (
        lambda: get_request(["ok", "not ok"]),
        lambda: store_request("set", "bad key", b"v"),
        lambda: delete_request(""),
        lambda: incr_request("x" * 300),
        lambda: touch_request("a\nb", 1),
    ):
        with pytest.raises(CacheKeyError):
            build()


# --- results ----------------------------------------------------------------


def test_result_mapping() -> None:
    assert storage_result(STORED) is True
    assert storage_result(NOT_STORED) is False
    assert cas_result(STORED) is True
    assert cas_result(EXISTS) is False
    assert cas_result(NOT_FOUND) is None
    assert delete_result(DELETED) is True
    assert delete_result(NOT_FOUND) is False
    assert touch_result(TOUCHED) is True
    assert touch_result(NOT_FOUND) is False
    assert number_result(Number(7)) == 7
    assert number_result(NOT_FOUND) is None
    assert version_result(Version("1.6")) == "1.6"
    ok_result(OK)
    for check, wrong in [
        (storage_result, END),
        (storage_result, EXISTS),
        (cas_result, DELETED),
        (delete_result, STORED),
        (touch_result, Number(1)),
        (number_result, STORED),
        (version_result, OK),
        (ok_result, END),
    ]:
        with pytest.raises(ProtocolError, match="unexpected reply"):
            check(wrong)  # type: ignore[operator]
