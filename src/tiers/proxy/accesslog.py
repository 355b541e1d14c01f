"""The access log: one LTSV line per request (http://ltsv.org/).

Labels, in order: time, host (client address), forwardedfor (the
X-Forwarded-For the client sent, or ``-``), method, uri, protocol, status,
size (response body bytes sent), reqsize (request body bytes received),
referer, reqtime (seconds from the first byte of the request to the last byte
of the response), apptime (seconds from sending the request to the backend to
receiving its response head, or ``-``), upstream (the backend's host:port, or
``-``), cache (HIT, MISS, STALE or ``-``), route (the name of the routing rule,
or ``-``), reqid (the X-Request-Id sent to the backend, or ``-``), ua. The
labels are those alp and other LTSV tools understand.

A value may hold any byte a client sent; tab, newline, carriage return and
backslash are written as ``\\t``, ``\\n``, ``\\r`` and ``\\\\`` so a record
always stays one line of tab-separated fields (``unescape`` undoes it).

Lines are buffered and written at least every second, when the buffer grows
past 64 KiB, and on ``close``. Writes are blocking appends of whole lines:
small, and what nginx does too.

``RequestIds`` makes the reqid values (also sent to backends as X-Request-Id),
with ``request_id`` or its C twin.

Each line is made by ``format_line``, or by the same function in C
(``_ltsv.c``) when that was built, which makes it several times faster.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import BinaryIO, Final

log = logging.getLogger("tiers.proxy")

_NEEDS_ESCAPE: Final = re.compile(rb"[\t\n\r\\]")
_ESCAPES: Final = {b"\t": b"\\t", b"\n": b"\\n", b"\r": b"\\r", b"\\": b"\\\\"}
_ESCAPED: Final = re.compile(rb"\\([tnr\\])")
_UNESCAPES: Final = {b"t": b"\t", b"n": b"\n", b"r": b"\r", b"\\": b"\\"}

_LINE: Final = (
    b"time:%s\thost:%s\tforwardedfor:%s\tmethod:%s\turi:%s\tprotocol:%s\tstatus:%d\tsize:%d"
    b"\treqsize:%d\treferer:%s\treqtime:%.3f\tapptime:%s\tupstream:%s\tcache:%s\troute:%s"
    b"\treqid:%s\tua:%s\n"
)
_ESCAPABLE: Final = b"\t\n\r\\"
_SEPARATORS: Final = _LINE.count(b"\t") + _LINE.count(b"\n")
_DASH: Final = b"-"

FLUSH_INTERVAL: Final = 1.0
_FLUSH_SIZE: Final = 64 * 1024


def escape(value: bytes) -> bytes:
    """``value`` made safe for one LTSV field."""
    if _NEEDS_ESCAPE.search(value) is None:
        return value
    return _NEEDS_ESCAPE.sub(lambda m: _ESCAPES[m.group()], value)


def format_line(  # noqa: PLR0917
    when: bytes,
    host: bytes,
    forwardedfor: bytes | None,
    method: bytes,
    uri: bytes,
    protocol: bytes,
    status: int,
    size: int,
    reqsize: int,
    referer: bytes | None,
    reqtime: float,
    apptime: float | None,
    upstream: bytes | None,
    cache: bytes | None,
    route: bytes | None,
    reqid: bytes | None,
    ua: bytes | None,
) -> bytes:
    """One access log line: the values of the labels in order, None written as ``-``."""
    values = (
        when,
        host,
        _DASH if forwardedfor is None else forwardedfor,
        method,
        uri,
        protocol,
        status,
        size,
        reqsize,
        _DASH if referer is None else referer,
        reqtime,
        _DASH if apptime is None else b"%.3f" % apptime,
        _DASH if upstream is None else upstream,
        _DASH if cache is None else cache,
        _DASH if route is None else route,
        _DASH if reqid is None else reqid,
        _DASH if ua is None else ua,
    )
    line = _LINE % values
    # Values rarely hold a byte to escape: find out with one pass over the
    # line (its own tabs and newline are all it may lose) rather than one per
    # value.
    if len(line) - len(line.translate(None, _ESCAPABLE)) == _SEPARATORS:
        return line
    return _LINE % tuple(escape(v) if isinstance(v, bytes) else v for v in values)


LineFormat = Callable[
    [bytes, bytes, bytes | None, bytes, bytes, bytes, int, int, int, bytes | None, float,
     float | None, bytes | None, bytes | None, bytes | None, bytes | None, bytes | None],
    bytes,
]


def request_id(prefix: bytes, count: int) -> bytes:
    """``prefix``, a dash and ``count`` in lower-case hex (0 <= count < 2**64)."""
    if not 0 <= count < 1 << 64:
        raise OverflowError(f"request id count out of range: {count}")
    return b"%s-%x" % (prefix, count)


RequestIdFormat = Callable[[bytes, int], bytes]


def _load() -> tuple[LineFormat, RequestIdFormat]:
    """``format_line`` and ``request_id``, or their C twins in ``_ltsv`` where it was built."""
    try:
        from tiers.proxy import _ltsv
    except ImportError:
        return format_line, request_id
    return _ltsv.format_line, _ltsv.request_id


_FORMATS: Final = _load()
FORMAT_LINE: Final = _FORMATS[0]
REQUEST_ID: Final = _FORMATS[1]


def unescape(value: bytes) -> bytes:
    """The inverse of ``escape``."""
    return _ESCAPED.sub(lambda m: _UNESCAPES[m.group(1)], value)


def parse_line(line: bytes) -> dict[str, bytes]:
    """The labels and values of one LTSV line (values unescaped)."""
    record: dict[str, bytes] = {}
    for field in line.rstrip(b"\n").split(b"\t"):
        label, _, value = field.partition(b":")
        record[label.decode()] = unescape(value)
    return record


class _Clock:
    """ISO 8601 local time with offset, formatted once per second.

    Given the loop's monotonic time, the wall clock is read only once the
    second it last read has passed: a request costs one comparison.
    """

    def __init__(self) -> None:
        self._second = -1
        self._text = b""
        self._until = -1.0  # monotonic time when the second of _text ends

    def now(self, monotonic: float = -1.0) -> bytes:
        if 0.0 <= monotonic < self._until:
            return self._text
        wall = time.time()
        second = int(wall)
        if monotonic >= 0.0:
            self._until = monotonic + (second + 1 - wall)
        if second != self._second:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))
            # strftime gives +0900; ISO 8601 extended form wants +09:00.
            self._text = (stamp[:-2] + ":" + stamp[-2:]).encode()
            self._second = second
        return self._text


class AccessLog:
    """Buffered LTSV writer to a file path, or to stdout for ``-``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: BinaryIO
        self._owned = path != "-"
        if self._owned:
            self._file = open(path, "ab")  # noqa: SIM115 - kept open for the process's life
        else:
            self._file = sys.stdout.buffer
        self._buffer: list[bytes] = []
        self._size = 0
        self._clock = _Clock()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush every second on ``loop`` from now on."""
        self._loop = loop
        self._timer = loop.call_later(FLUSH_INTERVAL, self._tick)

    def _tick(self) -> None:
        self.flush()
        if self._loop is not None:
            self._timer = self._loop.call_later(FLUSH_INTERVAL, self._tick)

    # One call per request, from the proxy: passing the fields by position is cheaper.
    def record(  # noqa: PLR0917
        self,
        host: bytes,
        forwardedfor: bytes | None,
        method: bytes,
        uri: bytes,
        protocol: bytes,
        status: int,
        size: int,
        reqtime: float,
        apptime: float | None,
        upstream: bytes | None,
        ua: bytes | None,
        reqsize: int = 0,
        referer: bytes | None = None,
        cache: bytes | None = None,
        route: bytes | None = None,
        reqid: bytes | None = None,
        monotonic: float = -1.0,
    ) -> None:
        """Buffer one request's line (arguments in the order of the labels but for ua).

        ``monotonic``, the event loop's time if the caller has it, spares
        reading the wall clock for the time field more than once a second.
        """
        line = FORMAT_LINE(self._clock.now(monotonic), host, forwardedfor, method, uri,
                           protocol, status, size, reqsize, referer, reqtime, apptime, upstream,
                           cache, route, reqid, ua)
        self._buffer.append(line)
        self._size += len(line)
        if self._size >= _FLUSH_SIZE:
            self.flush()

    def flush(self) -> None:
        """Write out the buffered lines."""
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._size = 0
        try:
            self._file.write(data)
            self._file.flush()
        except (OSError, ValueError) as exc:
            # A full disk must not take the proxy down; the lines are lost.
            log.warning("access log %s: write failed: %s", self.path, exc)

    def close(self) -> None:
        """Flush and stop the timer; closes the file unless it is stdout."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None
        self.flush()
        if self._owned:
            self._file.close()


class RequestIds:
    """Request ids unique across restarts and processes: a random prefix and a counter."""

    __slots__ = ("_count", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex().encode()
        self._count = 0

    def next(self) -> bytes:
        self._count += 1
        return REQUEST_ID(self._prefix, self._count)
