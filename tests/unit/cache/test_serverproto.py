"""The server-side codec: requests in, answers out, against a real Store, no sockets.

``CONVERSATIONS`` maps what a client sends on a fresh connection to the exact
bytes answered and whether the connection is then closed. The answers are
memcached 1.6.18's (the integration tests compare the two servers on the
same inputs when memcached is installed). Each conversation is also fed split
at every byte offset: the answer must not depend on how bytes arrive.
"""

from __future__ import annotations

import pytest

from tiers.cache.server import Store
from tiers.cache.serverproto import (
    VERSION,
    Conversation,
    RequestParser,
    Retrieve,
    Storage,
    item_size,
    strtol32,
    strtoul32,
    strtoull,
)

V = f"VERSION {VERSION}\r\n".encode()
NOW = 1_700_000_000.0

CONVERSATIONS: dict[str, tuple[bytes, bytes, bool]] = {
    "set_get": (
        b"set a 0 0 3\r\nabc\r\nget a\r\n",
        b"STORED\r\nVALUE a 0 3\r\nabc\r\nEND\r\n",
        False,
    ),
    "bare_lf_lines": (
        b"set a 0 0 3\nabc\r\nget a\n",
        b"STORED\r\nVALUE a 0 3\r\nabc\r\nEND\r\n",
        False,
    ),
    "data_one_too_long": (
        b"set a 0 0 3\r\nabcd\r\nget a\r\n",
        b"CLIENT_ERROR bad data chunk\r\nERROR\r\nEND\r\n",
        False,
    ),
    "data_two_too_long": (
        b"set a 0 0 3\r\nabcde\r\nget a\r\n",
        b"CLIENT_ERROR bad data chunk\r\nERROR\r\nEND\r\n",
        False,
    ),
    "set_missing_length": (b"set a 0 0\r\nabc\r\nget a\r\n", b"ERROR\r\nERROR\r\nEND\r\n", False),
    "set_negative_length": (
        b"set a 0 0 -1\r\nabc\r\n",
        b"CLIENT_ERROR bad command line format\r\nERROR\r\n",
        False,
    ),
    "set_bad_flags": (
        b"set a x 0 3\r\nabc\r\n",
        b"CLIENT_ERROR bad command line format\r\nERROR\r\n",
        False,
    ),
    "set_negative_flags": (
        b"set a -1 0 1\r\nx\r\n",
        b"CLIENT_ERROR bad command line format\r\nERROR\r\n",
        False,
    ),
    "noreply_bad_chunk_is_silent": (
        b"set a 0 0 3 noreply\r\nabcd\r\nget a\r\n",
        b"ERROR\r\nEND\r\n",
        False,
    ),
    "key_too_long_for_set": (
        b"set " + b"k" * 251 + b" 0 0 3\r\nabc\r\n",
        b"CLIENT_ERROR bad command line format\r\nERROR\r\n",
        False,
    ),
    "key_too_long_for_get": (
        b"get " + b"k" * 251 + b"\r\n",
        b"CLIENT_ERROR bad command line format\r\n",
        False,
    ),
    "key_250_is_fine": (b"get " + b"k" * 250 + b"\r\n", b"END\r\n", False),
    "get_without_key": (b"get\r\n", b"ERROR\r\n", False),
    "unknown_command": (b"bogus\r\n", b"ERROR\r\n", False),
    "uppercase_command": (b"GET a\r\n", b"ERROR\r\n", False),
    "empty_line": (b"\r\n", b"ERROR\r\n", False),
    "leading_and_double_spaces": (b"   get a\r\nget a  b\r\n", b"END\r\nEND\r\n", False),
    "too_large": (
        b"set big 0 0 2000000\r\n" + b"x" * 2000000 + b"\r\nget big\r\n",
        b"SERVER_ERROR object too large for cache\r\nEND\r\n",
        False,
    ),
    "too_large_noreply": (
        b"set big 0 0 2000000 noreply\r\n" + b"x" * 2000000 + b"\r\nversion\r\n",
        V,
        False,
    ),
    "largest_item": (
        b"set k 0 0 1048516\r\n" + b"x" * 1048516 + b"\r\nget nope\r\n",
        b"STORED\r\nEND\r\n",
        False,
    ),
    "one_byte_over": (
        b"set k 0 0 1048517\r\n" + b"x" * 1048517 + b"\r\nget nope\r\n",
        b"SERVER_ERROR object too large for cache\r\nEND\r\n",
        False,
    ),
    "append_past_the_item_limit": (
        b"set a 0 0 1048000\r\n"
        + b"x" * 1048000
        + b"\r\nappend a 0 0 1000\r\n"
        + b"y" * 1000
        + b"\r\nget nope\r\n",
        b"STORED\r\nNOT_STORED\r\nEND\r\n",
        False,
    ),
    "incr_missing": (b"incr a 1\r\n", b"NOT_FOUND\r\n", False),
    "decr_pads_incr_grows": (
        b"set n 0 0 3\r\n100\r\ndecr n 1\r\nget n\r\nincr n 5\r\nget n\r\n",
        b"STORED\r\n99\r\nVALUE n 0 3\r\n99 \r\nEND\r\n104\r\nVALUE n 0 3\r\n104\r\nEND\r\n",
        False,
    ),
    "incr_wraps": (
        b"set n 0 0 2\r\n99\r\nincr n 18446744073709551600\r\nget n\r\n",
        b"STORED\r\n83\r\nVALUE n 0 2\r\n83\r\nEND\r\n",
        False,
    ),
    "decr_stops_at_zero": (b"set n 0 0 1\r\n5\r\ndecr n 9\r\n", b"STORED\r\n0\r\n", False),
    "incr_bad_delta": (b"incr n x\r\n", b"CLIENT_ERROR invalid numeric delta argument\r\n", False),
    "incr_negative_delta": (
        b"incr n -1\r\n",
        b"CLIENT_ERROR invalid numeric delta argument\r\n",
        False,
    ),
    "incr_delta_over_u64": (
        b"incr n 18446744073709551616\r\n",
        b"CLIENT_ERROR invalid numeric delta argument\r\n",
        False,
    ),
    "incr_non_numeric": (
        b"set t 0 0 2\r\nab\r\nincr t 1\r\n",
        b"STORED\r\nCLIENT_ERROR cannot increment or decrement non-numeric value\r\n",
        False,
    ),
    "incr_non_numeric_noreply": (
        b"set t 0 0 2\r\nab\r\nincr t 1 noreply\r\nversion\r\n",
        b"STORED\r\n" + V,
        False,
    ),
    "incr_leading_space": (b"set n 0 0 2\r\n 5\r\nincr n 1\r\n", b"STORED\r\n6\r\n", False),
    "incr_stops_at_space": (b"set n 0 0 3\r\n5 6\r\nincr n 1\r\n", b"STORED\r\n6\r\n", False),
    "incr_plus_sign": (b"set n 0 0 2\r\n+5\r\nincr n 1\r\n", b"STORED\r\n6\r\n", False),
    "incr_minus_sign": (
        b"set n 0 0 2\r\n-5\r\nincr n 1\r\n",
        b"STORED\r\nCLIENT_ERROR cannot increment or decrement non-numeric value\r\n",
        False,
    ),
    "incr_empty": (
        b"set n 0 0 0\r\n\r\nincr n 1\r\n",
        b"STORED\r\nCLIENT_ERROR cannot increment or decrement non-numeric value\r\n",
        False,
    ),
    "incr_value_over_u64": (
        b"set n 0 0 20\r\n18446744073709551616\r\nincr n 1\r\n",
        b"STORED\r\nCLIENT_ERROR cannot increment or decrement non-numeric value\r\n",
        False,
    ),
    "incr_without_delta": (b"decr a\r\n", b"ERROR\r\n", False),
    "delete_zero_hold": (b"set a 0 0 1\r\nx\r\ndelete a 0\r\n", b"STORED\r\nDELETED\r\n", False),
    "delete_bad_hold": (
        b"delete a 1\r\n",
        b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n",
        False,
    ),
    "delete_noreply": (b"delete a noreply\r\ndelete a 0 noreply\r\nversion\r\n", V, False),
    "delete_too_many_tokens": (b"delete a b c d\r\n", b"ERROR\r\n", False),
    "delete_missing": (b"delete a\r\n", b"NOT_FOUND\r\n", False),
    "touch_without_exptime": (b"touch a\r\n", b"ERROR\r\n", False),
    "touch_bad_exptime": (b"touch a x\r\n", b"CLIENT_ERROR invalid exptime argument\r\n", False),
    "touch_missing": (b"touch nope 10\r\n", b"NOT_FOUND\r\n", False),
    "touch_noreply": (b"touch a 10 noreply\r\nversion\r\n", V, False),
    "gat_without_keys": (b"gat 10\r\n", b"END\r\n", False),
    "gat_bad_exptime": (b"gat x a\r\n", b"CLIENT_ERROR invalid exptime argument\r\n", False),
    "gat_and_gats": (
        b"set q 0 0 1\r\nx\r\ngat 100 q\r\ngats 100 q\r\n",
        b"STORED\r\nVALUE q 0 1\r\nx\r\nEND\r\nVALUE q 0 1 1\r\nx\r\nEND\r\n",
        False,
    ),
    "flush_all_forms": (b"flush_all\r\nflush_all 0\r\n", b"OK\r\nOK\r\n", False),
    "flush_all_bad_delay": (
        b"flush_all x\r\n",
        b"CLIENT_ERROR invalid exptime argument\r\n",
        False,
    ),
    "flush_all_noreply": (b"flush_all noreply\r\nversion\r\n", V, False),
    "flush_all_too_many": (b"flush_all 1 2 3\r\n", b"ERROR\r\n", False),
    "flush_then_get": (
        b"set a 0 0 1\r\nx\r\nflush_all 0\r\nget a\r\n",
        b"STORED\r\nOK\r\nEND\r\n",
        False,
    ),
    "cas_without_unique": (b"cas a 0 0 1\r\nx\r\n", b"ERROR\r\nERROR\r\n", False),
    "cas_bad_unique": (
        b"cas a 0 0 1 x\r\nx\r\n",
        b"CLIENT_ERROR bad command line format\r\nERROR\r\n",
        False,
    ),
    "cas_missing": (b"cas nope 0 0 1 5\r\nx\r\n", b"NOT_FOUND\r\n", False),
    "stats_unknown": (b"stats foo\r\n", b"ERROR\r\n", False),
    "stats_reset": (b"stats reset\r\n", b"RESET\r\n", False),
    "quit_closes": (b"version\r\nquit\r\nversion\r\n", V, True),
    "flags_wrap_to_32_bits": (
        b"set a 4294967296 0 1\r\nx\r\nget a\r\n",
        b"STORED\r\nVALUE a 0 1\r\nx\r\nEND\r\n",
        False,
    ),
    "max_flags_and_cas": (
        b"set a 4294967295 0 1\r\nx\r\ngets a\r\n",
        b"STORED\r\nVALUE a 4294967295 1 1\r\nx\r\nEND\r\n",
        False,
    ),
    "signed_and_padded_length": (
        b"set a 0 0 01\r\nx\r\nset a 0 0 +1\r\nx\r\n",
        b"STORED\r\nSTORED\r\n",
        False,
    ),
    "unknown_seventh_token_ignored": (b"set a 0 0 1 garbage\r\nx\r\n", b"STORED\r\n", False),
    "noreply_not_last": (b"set a 0 0 1 noreply extra\r\nx\r\n", b"ERROR\r\nERROR\r\n", False),
    "control_bytes_in_keys": (
        b"set a\x01b 0 0 1\r\nx\r\nget a\x01b\r\nset a\tb 0 0 1\r\ny\r\nget a\tb\r\n",
        b"STORED\r\nVALUE a\x01b 0 1\r\nx\r\nEND\r\nSTORED\r\nVALUE a\tb 0 1\r\ny\r\nEND\r\n",
        False,
    ),
    "append_prepend": (
        b"set ab 0 0 1\r\nx\r\nappend ab 0 0 2\r\nyz\r\nprepend ab 0 0 1\r\nw\r\nget ab\r\n"
        b"append zz 0 0 1\r\nx\r\n",
        b"STORED\r\nSTORED\r\nSTORED\r\nVALUE ab 0 4\r\nwxyz\r\nEND\r\nNOT_STORED\r\n",
        False,
    ),
    "negative_exptime": (b"set a 0 -1 1\r\nx\r\nget a\r\n", b"STORED\r\nEND\r\n", False),
    "verbosity": (
        b"verbosity\r\nverbosity 1\r\nverbosity 1 noreply\r\n",
        b"ERROR\r\nOK\r\n",
        False,
    ),
    "nul_ends_the_line": (
        b"set a 0 0 1\r\nx\r\nget a\x00b\r\n",
        b"STORED\r\nVALUE a 0 1\r\nx\r\nEND\r\n",
        False,
    ),
    "meta_noop": (b"mn\r\n", b"MN\r\n", False),
    "line_too_long_closes": (b"x" * 3000, b"", True),
    "long_get_line_waits": (b"get " + b"x" * 3000, b"", False),
    "long_get_line_works": (b"get " + b" ".join([b"k" * 200] * 20) + b"\r\n", b"END\r\n", False),
    "answers_before_a_long_line_are_kept": (b"version\r\n" + b"y" * 3000 + b"\r\n", V, True),
}


def _conversation(clock: list[float] | None = None) -> Conversation:
    now = clock if clock is not None else [NOW]
    return Conversation(Store(64 << 20, clock=lambda: now[0]))


def _run(chunks: list[bytes]) -> tuple[bytes, bool]:
    conversation = _conversation()
    out = []
    closed = False
    for chunk in chunks:
        answer, close = conversation.receive(chunk)
        out.append(answer)
        if close:
            closed = True
            break
    return b"".join(out), closed


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_conversation(name: str) -> None:
    request, answer, closed = CONVERSATIONS[name]
    assert _run([request]) == (answer, closed)


@pytest.mark.parametrize("name", sorted(n for n, c in CONVERSATIONS.items() if len(c[0]) < 4000))
def test_conversation_split_at_every_offset(name: str) -> None:
    request, answer, closed = CONVERSATIONS[name]
    for cut in range(1, len(request)):
        assert _run([request[:cut], request[cut:]]) == (answer, closed), cut


def test_big_conversation_in_small_chunks() -> None:
    request, answer, closed = CONVERSATIONS["too_large"]
    chunks = [request[i : i + 4093] for i in range(0, len(request), 4093)]
    assert _run(chunks) == (answer, closed)
    request, answer, closed = CONVERSATIONS["largest_item"]
    chunks = [request[i : i + 65536] for i in range(0, len(request), 65536)]
    assert _run(chunks) == (answer, closed)


def test_nothing_is_read_after_close() -> None:
    conversation = _conversation()
    assert conversation.receive(b"quit\r\n") == (b"", True)
    assert conversation.receive(b"version\r\n") == (b"", False)


def test_get_line_limit_is_bounded() -> None:
    conversation = Conversation(Store(), RequestParser(max_get_line=10_000))
    assert conversation.receive(b"get " + b"k " * 4000) == (b"", False)
    assert conversation.receive(b"k " * 2000) == (b"", True)


def test_parser_commands() -> None:
    parser = RequestParser()
    parser.feed(b"gets a b\r\nset k 5 10 2 noreply\r\nhi\r\ncas k 0 0 1 99\r\nx\r\n")
    assert parser.next_command() == Retrieve([b"a", b"b"], True, None)
    assert parser.next_command() == Storage("set", b"k", 5, 10, b"hi", 0, True)
    assert parser.next_command() == Storage("cas", b"k", 0, 0, b"x", 99, False)
    assert parser.next_command() is None


def test_item_size_matches_memcached() -> None:
    # memcached's "bytes" after set a=x (no flags), then "abcdefghij" with 100 bytes,
    # then the same key with 1000 bytes, then "f" with flags 5 and 10 bytes
    assert item_size(1, 0, 1) == 61
    assert item_size(1, 0, 1) + item_size(10, 0, 100) == 230
    assert item_size(1, 0, 1) + item_size(10, 0, 1000) == 1130
    assert item_size(1, 0, 1) + item_size(10, 0, 1000) + item_size(1, 5, 10) == 1204
    # the largest value memcached -I 1m takes under a 1-byte and a 100-byte key
    assert item_size(1, 0, 1048516) == 1 << 20
    assert item_size(100, 0, 1048417) == 1 << 20


@pytest.mark.parametrize(
    ("token", "ull", "ul32", "l32"),
    [
        (b"0", 0, 0, 0),
        (b"42", 42, 42, 42),
        (b"+7", 7, 7, 7),
        (b"-1", None, None, -1),
        (b"-0", 0, 0, 0),
        (b"007", 7, 7, 7),
        (b"\t5", 5, 5, 5),
        (b"5\tjunk", 5, 5, 5),
        (b"5x", None, None, None),
        (b"", None, None, None),
        (b"+", None, None, None),
        (b"x", None, None, None),
        (b"4294967296", 4294967296, 0, 0),
        (b"2147483648", 2147483648, 2147483648, -2147483648),
        (b"18446744073709551615", 2**64 - 1, 2**32 - 1, None),
        (b"18446744073709551616", None, None, None),
        (b"9223372036854775807", 2**63 - 1, 2**32 - 1, -1),
    ],
)
def test_numbers_read_like_memcached(
    token: bytes, ull: int | None, ul32: int | None, l32: int | None
) -> None:
    assert strtoull(token) == ull
    assert strtoul32(token) == ul32
    assert strtol32(token) == l32
