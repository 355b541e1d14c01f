"""HTTP dates (RFC 9110 5.6.7): written for Date and Last-Modified, read from any sender.

``http_date`` writes the one form a sender may use, IMF-fixdate
(``Sun, 06 Nov 1994 08:49:37 GMT``), with fixed English names whatever the
locale. ``parse_http_date`` reads all three forms a recipient must accept
(IMF-fixdate, the obsolete RFC 850 and asctime forms) and returns None for
anything else: callers decide what an invalid date means to them (the
static files ignore such a precondition, the page cache takes it as the most
restrictive reading). ``DateField`` renders the ``Date`` field line once per
second rather than once per response.
"""

from __future__ import annotations

import datetime
import email.utils
import re
import time
from typing import Final

__all__ = ["DateField", "http_date", "parse_http_date"]

_WEEKDAYS: Final = (b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun")
_MONTHS: Final = (
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun",
    b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
)  # fmt: skip
_MONTH_NUMBERS: Final = {name: number for number, name in enumerate(_MONTHS, start=1)}
_IMF_FIXDATE: Final = re.compile(
    rb"[A-Z][a-z]{2}, (\d{2}) ([A-Z][a-z]{2}) (\d{4}) (\d{2}):(\d{2}):(\d{2}) GMT"
)


def http_date(seconds: int) -> bytes:
    """``seconds`` since the epoch as an IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``)."""
    t = time.gmtime(seconds)
    return b"%s, %02d %s %04d %02d:%02d:%02d GMT" % (
        _WEEKDAYS[t.tm_wday],
        t.tm_mday,
        _MONTHS[t.tm_mon - 1],
        t.tm_year,
        t.tm_hour,
        t.tm_min,
        t.tm_sec,
    )


def parse_http_date(value: bytes) -> int | None:
    """Seconds since the epoch of an HTTP-date in any of its three forms; None if invalid.

    Surrounding white space is ignored. A date without a zone (asctime) is
    GMT, never local time, and a field out of range (day 32, hour 24) makes
    the date invalid rather than rolling over into the next month or day.
    """
    value = value.strip()
    # IMF-fixdate, what every current sender writes, without the general parser.
    match = _IMF_FIXDATE.fullmatch(value)
    if match is not None:
        day, month_name, year, hour, minute, second = match.groups()
        month = _MONTH_NUMBERS.get(month_name)
        if month is not None:
            try:
                moment = datetime.datetime(
                    int(year), month, int(day), int(hour), int(minute), int(second),
                    tzinfo=datetime.UTC,
                )  # fmt: skip
            except ValueError:
                return None
            return int(moment.timestamp())
    try:
        parsed = email.utils.parsedate_tz(value.decode("ascii"))
        if parsed is None:
            return None
        # datetime refuses a day or hour out of range, which timegm would roll over.
        moment = datetime.datetime(*parsed[:6], tzinfo=datetime.UTC)
        return int(moment.timestamp()) - (parsed[9] or 0)
    except (UnicodeDecodeError, ValueError, IndexError, TypeError, OverflowError):
        return None


class DateField:
    """The ``Date`` field line, formatted once per second rather than per response."""

    __slots__ = ("line", "second")

    def __init__(self) -> None:
        self.second = -1
        self.line = b""

    def at(self, now: float) -> bytes:
        """``Date: <now as an IMF-fixdate>\\r\\n``; ``now`` in seconds since the epoch."""
        second = int(now)
        if second != self.second:
            self.line = b"Date: " + http_date(second) + b"\r\n"
            self.second = second
        return self.line
