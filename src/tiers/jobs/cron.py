"""Cron expressions: parse the classic five fields and find the times they name.

    ┌───────────── minute        0-59
    │ ┌─────────── hour          0-23
    │ │ ┌───────── day of month  1-31
    │ │ │ ┌─────── month         1-12 or jan-dec
    │ │ │ │ ┌───── day of week   0-7 or sun-sat (0 and 7 are Sunday)
    * * * * *

Each field is ``*`` or a comma-separated list of items; an item is a value
(``5``, ``mon``), a range (``1-5``, ``mon-fri``), either of those or ``*``
with a step (``*/15``, ``0-30/10``, ``10/20`` meaning ``10-59/20``). Names are
case-insensitive and allowed only in the month and day-of-week fields.
``@yearly`` (``@annually``), ``@monthly``, ``@weekly``, ``@daily``
(``@midnight``) and ``@hourly`` stand for their usual expressions.

Days follow Vixie cron: when both day fields are restricted (neither starts
with ``*``), a day matches if *either* matches (``0 0 13 * fri`` runs on every
13th and every Friday); otherwise both must.

Times are wall-clock minutes in the timezone of the datetime given (UTC when
the scheduler is not told otherwise). A local time skipped by a daylight-saving
change does not run; a repeated one runs once, at its first occurrence.

Every mistake raises :class:`~tiers.jobs.errors.CronError` quoting the
expression and naming the field, e.g. ``cron expression '61 * * * *': minute
61 is outside 0-59``; so does an expression that can never match
(``0 0 30 2 *``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from tiers.jobs.errors import CronError

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov",
               "dec")
DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
# The longest each month can be (February in a leap year).
_MONTH_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_MINUTE = timedelta(minutes=1)
# How far ahead a search may look before the expression is declared never matching:
# every valid expression matches within 8 years (a day-of-month and weekday pair
# recurs within 28 years only when both are restricted, and then either suffices).
_SEARCH_YEARS = 8


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()
    name_base: int = 0


_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day of month", 1, 31),
    _Field("month", 1, 12, MONTH_NAMES, 1),
    _Field("day of week", 0, 7, DAY_NAMES, 0),
)


@dataclass(frozen=True)
class CronExpression:
    """A parsed expression: the allowed values of each field (Sunday is 0)."""

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    any_day: bool  # the day-of-month field starts with '*'
    any_weekday: bool  # the day-of-week field starts with '*'

    @classmethod
    def parse(cls, text: str) -> CronExpression:
        """Parse ``text``; CronError naming the field and the reason if it is not valid."""
        if not isinstance(text, str):
            raise CronError(f"a cron expression is a string, got {text!r}")
        source = text.strip()
        expanded = source
        if source.startswith("@"):
            macro = source.lower()
            if macro == "@reboot":
                raise CronError(f"cron expression {text!r}: @reboot is not supported "
                                f"(schedules here follow the clock only)")
            if macro not in MACROS:
                raise CronError(f"cron expression {text!r}: unknown macro (known: "
                                f"{', '.join(MACROS)})")
            expanded = MACROS[macro]
        parts = expanded.split()
        if len(parts) != len(_FIELDS):
            raise CronError(f"cron expression {text!r}: needs 5 fields (minute hour "
                            f"day-of-month month day-of-week), got {len(parts)}")
        values = [_parse_field(text, part, spec) for part, spec in zip(parts, _FIELDS,
                                                                        strict=True)]
        weekdays = frozenset(0 if day == 7 else day for day in values[4])
        expression = cls(text=source, minutes=values[0], hours=values[1], days=values[2],
                         months=values[3], weekdays=weekdays, any_day=parts[2].startswith("*"),
                         any_weekday=parts[4].startswith("*"))
        expression._check_possible()
        return expression

    def __str__(self) -> str:
        return self.text

    def _check_possible(self) -> None:
        if not self.any_weekday and not self.any_day:
            return  # either field alone suffices, and every weekday occurs in every month
        longest = max(_MONTH_DAYS[month - 1] for month in self.months)
        if min(self.days) > longest:
            months = ", ".join(MONTH_NAMES[m - 1] for m in sorted(self.months))
            raise CronError(f"cron expression {self.text!r} never matches: day "
                            f"{min(self.days)} does not occur in {months}")

    # ---- matching ---------------------------------------------------------------

    def day_matches(self, moment: datetime) -> bool:
        """Whether the date of ``moment`` (its wall clock) is one of the expression's days."""
        in_month = moment.day in self.days
        in_week = (moment.weekday() + 1) % 7 in self.weekdays
        if self.any_day or self.any_weekday:
            return in_month and in_week
        return in_month or in_week

    def matches(self, moment: datetime) -> bool:
        """Whether the wall-clock minute of ``moment`` is one the expression names."""
        return (moment.minute in self.minutes and moment.hour in self.hours
                and moment.month in self.months and self.day_matches(moment))

    def next_after(self, moment: datetime) -> datetime:
        """The first time the expression names strictly after ``moment``, in its timezone.

        A naive ``moment`` is taken as UTC and the answer is naive too.
        Seconds are zero: cron names whole minutes.
        """
        tz = moment.tzinfo
        wall = moment.replace(tzinfo=None)
        candidate = wall.replace(second=0, microsecond=0) + _MINUTE
        while True:
            found = self._next_wall(candidate)
            if tz is None:
                return found
            aware = found.replace(tzinfo=tz, fold=0)
            # A wall time that a daylight-saving change skips does not exist: it does
            # not round-trip through UTC.
            exists = aware.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == found
            if exists and aware > moment:
                return aware
            candidate = found + _MINUTE

    def ticks(self, after: datetime, until: datetime) -> Iterator[datetime]:
        """Every time the expression names in ``(after, until]``, in order."""
        moment = after
        while True:
            moment = self.next_after(moment)
            if moment > until:
                return
            yield moment

    def _next_wall(self, moment: datetime) -> datetime:
        """The first matching wall-clock minute at or after ``moment`` (naive, whole minute)."""
        limit = moment.year + _SEARCH_YEARS
        while moment.year <= limit:
            if moment.month not in self.months:
                moment = _next_month(moment)
            elif not self.day_matches(moment):
                moment = datetime(moment.year, moment.month, moment.day) + timedelta(days=1)
            elif moment.hour not in self.hours:
                moment = moment.replace(minute=0) + timedelta(hours=1)
            elif moment.minute not in self.minutes:
                later = [m for m in self.minutes if m > moment.minute]
                if later:
                    moment = moment.replace(minute=min(later))
                else:
                    moment = moment.replace(minute=0) + timedelta(hours=1)
            else:
                return moment
        raise CronError(f"cron expression {self.text!r} names no time within "
                        f"{_SEARCH_YEARS} years of {moment:%Y-%m-%d}")


def _next_month(moment: datetime) -> datetime:
    if moment.month == 12:
        return datetime(moment.year + 1, 1, 1)
    return datetime(moment.year, moment.month + 1, 1)


def _parse_field(text: str, part: str, spec: _Field) -> frozenset[int]:
    def fail(reason: str) -> CronError:
        return CronError(f"cron expression {text!r}: {spec.name} {reason}")

    found: set[int] = set()
    for item in part.split(","):
        if not item:
            raise fail(f"{part!r} has an empty item")
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not (step_text.isascii() and step_text.isdigit()) or int(step_text) < 1:
                raise fail(f"step {step_text!r} in {item!r} must be a whole number of at least 1")
            step = int(step_text)
        # The weekday field's full range is Sunday to Saturday (7 is an alias).
        top = 6 if spec.high == 7 else spec.high
        if base == "*":
            first, last = spec.low, top
        elif "-" in base:
            left, _, right = base.partition("-")
            first, last = _value(left, spec, fail), _value(right, spec, fail)
            if first > last:
                raise fail(f"range {base!r} runs backwards (write {right}-{left}, or a list)")
        else:
            first = _value(base, spec, fail)
            last = top if slash else first
        found.update(range(first, last + 1, step))
    return frozenset(found)


def _value(token: str, spec: _Field, fail: Callable[[str], CronError]) -> int:
    lowered = token.lower()
    if lowered in spec.names:
        return spec.names.index(lowered) + spec.name_base
    if not (token.isascii() and token.isdigit()):
        if token.isalpha() and spec.names:
            raise fail(f"{token!r} is not a name (known: {', '.join(spec.names)})")
        if token.isalpha():
            raise fail(f"{token!r}: names are only allowed for months and days of the week")
        raise fail(f"{token!r} is not a number")
    value = int(token)
    if not spec.low <= value <= spec.high:
        raise fail(f"{value} is outside {spec.low}-{spec.high}")
    return value
