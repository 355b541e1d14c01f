"""The head scanners and writer of the C module ``tiers.proxy._heads``, if built.

Each scanner reads a plain message head in one call and declines anything
else (the request scanner saying where the head ends, if it is all there),
which the parsers then hand to llhttp (see ``_heads.c``).
``join_head`` writes a head; ``JOIN_HEAD`` is its C twin. Without the C
module (no compiler at install time) the scanners are None, llhttp reads
every head and ``JOIN_HEAD`` is ``join_head``, with the same results.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["JOIN_HEAD", "SCAN_REQUEST", "SCAN_RESPONSE", "JoinHead", "ScanRequest",
           "ScanResponse", "join_head"]

# (data, start, max head size, max request line, max fields) ->
# (method, target, version, headers, lower-cased names, head end,
#  Host, Connection, User-Agent, X-Forwarded-For, Referer, Expect (each a value or None)),
# or the head end when llhttp must read it, or -1 when the head is not all there
ScanRequest = Callable[
    [bytes, int, int, int, int],
    tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]], list[bytes], int,
          bytes | None, bytes | None, bytes | None, bytes | None, bytes | None,
          bytes | None] | int,
]
# (status, reason, version, headers, lower-cased names, head end, content length or -1,
#  the Connection field's value or None)
ScanResponse = Callable[
    [bytes, int],
    tuple[int, bytes, bytes, list[tuple[bytes, bytes]], list[bytes], int, int,
          bytes | None] | None,
]

# (first lines, lower-cased names, headers, names to drop, last lines) -> head
JoinHead = Callable[
    [list[bytes], list[bytes], list[tuple[bytes, bytes]], frozenset[bytes], list[bytes]],
    bytes,
]


def join_head(first: list[bytes], names: list[bytes], headers: list[tuple[bytes, bytes]],
              drop: frozenset[bytes], last: list[bytes]) -> bytes:
    """A head: the ``first`` lines, each field of ``headers`` whose lower-cased
    name (``names``, parallel) is not in ``drop``, the ``last`` lines; each
    line ended by CRLF, then the blank line."""
    if len(names) != len(headers):
        raise ValueError("join_head: names and headers differ in length")
    lines = list(first)
    for lname, field in zip(names, headers, strict=True):
        if lname not in drop:
            lines.append(b": ".join(field))
    lines.extend(last)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def _load() -> tuple[ScanRequest | None, ScanResponse | None, JoinHead]:
    try:
        from tiers.proxy import _heads
    except ImportError:
        return None, None, join_head
    return _heads.scan_request, _heads.scan_response, _heads.join_head


SCAN_REQUEST, SCAN_RESPONSE, JOIN_HEAD = _load()
