"""Cron expressions: every field form, the Vixie day rule, time search, and clear errors."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from tiers.jobs.cron import CronExpression
from tiers.jobs.errors import CronError


def parse(text: str) -> CronExpression:
    return CronExpression.parse(text)


def test_fields_values_ranges_steps_and_lists() -> None:
    e = parse("*/15 9-17 1,15,31 */3 *")
    assert sorted(e.minutes) == [0, 15, 30, 45]
    assert sorted(e.hours) == list(range(9, 18))
    assert sorted(e.days) == [1, 15, 31]
    assert sorted(e.months) == [1, 4, 7, 10]
    assert sorted(e.weekdays) == list(range(7))
    assert sorted(parse("0-30/10 * * * *").minutes) == [0, 10, 20, 30]
    assert sorted(parse("10/20 * * * *").minutes) == [10, 30, 50]  # from 10 to the end
    assert sorted(parse("5,1-3,59 * * * *").minutes) == [1, 2, 3, 5, 59]


def test_names_of_months_and_days_any_case() -> None:
    e = parse("0 0 * JAN-mar,Dec Mon-FRI")
    assert sorted(e.months) == [1, 2, 3, 12]
    assert sorted(e.weekdays) == [1, 2, 3, 4, 5]
    assert sorted(parse("0 0 * * sun,7").weekdays) == [0]  # 7 is Sunday too
    assert sorted(parse("0 0 * * 5-7").weekdays) == [0, 5, 6]


@pytest.mark.parametrize(("macro", "same"), [
    ("@yearly", "0 0 1 1 *"), ("@annually", "0 0 1 1 *"), ("@monthly", "0 0 1 * *"),
    ("@weekly", "0 0 * * 0"), ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"),
    ("@hourly", "0 * * * *"), ("@HOURLY", "0 * * * *"),
])
def test_macros(macro: str, same: str) -> None:
    a, b = parse(macro), parse(same)
    assert (a.minutes, a.hours, a.days, a.months, a.weekdays) == (
        b.minutes, b.hours, b.days, b.months, b.weekdays)


@pytest.mark.parametrize(("text", "message"), [
    ("* * * *", "needs 5 fields (minute hour day-of-month month day-of-week), got 4"),
    ("* * * * * *", "got 6"),
    ("", "got 0"),
    ("60 * * * *", "minute 60 is outside 0-59"),
    ("* 24 * * *", "hour 24 is outside 0-23"),
    ("* * 0 * *", "day of month 0 is outside 1-31"),
    ("* * * 13 *", "month 13 is outside 1-12"),
    ("* * * * 8", "day of week 8 is outside 0-7"),
    ("5-1 * * * *", "minute range '5-1' runs backwards"),
    ("*/0 * * * *", "minute step '0' in '*/0' must be a whole number of at least 1"),
    ("*/x * * * *", "step 'x'"),
    ("1,,2 * * * *", "minute '1,,2' has an empty item"),
    ("* * * foo *", "month 'foo' is not a name (known: jan, feb"),
    ("* * * * funday", "day of week 'funday' is not a name"),
    ("mon * * * *", "names are only allowed for months and days of the week"),
    ("-5 * * * *", "minute '' is not a number"),
    ("1.5 * * * *", "minute '1.5' is not a number"),
    ("@reboot", "@reboot is not supported"),
    ("@often", "unknown macro"),
    ("0 0 30 2 *", "never matches: day 30 does not occur in feb"),
    ("0 0 31 4,6 *", "never matches: day 31 does not occur in apr, jun"),
])
def test_mistakes_quote_the_expression_and_name_the_field(text: str, message: str) -> None:
    with pytest.raises(CronError) as caught:
        parse(text)
    assert message in str(caught.value)
    assert repr(text) in str(caught.value)


def test_impossible_day_with_a_weekday_is_fine_by_the_or_rule() -> None:
    e = parse("0 0 30 2 mon")  # every Monday of February (and the 30th, never)
    assert e.next_after(datetime(2026, 1, 1, tzinfo=UTC)) == datetime(2026, 2, 2, tzinfo=UTC)


def test_next_after_is_strictly_later_and_whole_minutes() -> None:
    e = parse("* * * * *")
    assert e.next_after(datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)) == datetime(
        2026, 1, 1, 12, 1, tzinfo=UTC)
    assert e.next_after(datetime(2026, 1, 1, 12, 0, 59, 999, tzinfo=UTC)) == datetime(
        2026, 1, 1, 12, 1, tzinfo=UTC)


def test_next_after_crosses_hours_days_months_and_years() -> None:
    e = parse("30 2 1 * *")
    assert e.next_after(datetime(2026, 1, 31, 23, 59, tzinfo=UTC)) == datetime(
        2026, 2, 1, 2, 30, tzinfo=UTC)
    assert parse("@yearly").next_after(datetime(2026, 6, 1, tzinfo=UTC)) == datetime(
        2027, 1, 1, tzinfo=UTC)
    assert parse("0 0 29 2 *").next_after(datetime(2026, 3, 1, tzinfo=UTC)) == datetime(
        2028, 2, 29, tzinfo=UTC)


def test_weekdays_follow_cron_numbering() -> None:
    # 2026-01-05 is a Monday.
    assert parse("0 9 * * 1").next_after(datetime(2026, 1, 1, tzinfo=UTC)) == datetime(
        2026, 1, 5, 9, 0, tzinfo=UTC)
    assert parse("0 9 * * 0").next_after(datetime(2026, 1, 1, tzinfo=UTC)) == datetime(
        2026, 1, 4, 9, 0, tzinfo=UTC)


def test_both_day_fields_restricted_means_either() -> None:
    e = parse("0 0 13 * fri")
    # 2026-01-02 is a Friday, before the 13th.
    assert e.next_after(datetime(2026, 1, 1, tzinfo=UTC)) == datetime(2026, 1, 2, tzinfo=UTC)
    assert e.matches(datetime(2026, 1, 13))  # a Tuesday, but the 13th
    # With one day field a star (or a stepped star), both must hold.
    both = parse("0 0 */2 * fri")
    assert not both.matches(datetime(2026, 1, 2))  # Friday the 2nd: day 2 is not */2 (1,3,..)
    assert both.matches(datetime(2026, 1, 9))  # Friday the 9th


def test_ticks_lists_every_time_in_a_half_open_window() -> None:
    e = parse("*/20 * * * *")
    start = datetime(2026, 1, 1, 0, 0, tzinfo=UTC)
    got = list(e.ticks(start, datetime(2026, 1, 1, 1, 0, tzinfo=UTC)))
    assert got == [datetime(2026, 1, 1, 0, m, tzinfo=UTC) for m in (20, 40)] + [
        datetime(2026, 1, 1, 1, 0, tzinfo=UTC)]


def test_timezones_skip_missing_local_times_and_run_repeated_ones_once() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    e = parse("30 2 * * *")
    # 2026-03-29 02:30 does not exist in Berlin (clocks jump 02:00 -> 03:00).
    assert e.next_after(datetime(2026, 3, 29, 0, 0, tzinfo=berlin)) == datetime(
        2026, 3, 30, 2, 30, tzinfo=berlin)
    # 2026-10-25 02:30 happens twice; it runs at the first one only.
    first = e.next_after(datetime(2026, 10, 25, 0, 0, tzinfo=berlin))
    assert first.astimezone(UTC) == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    after = e.next_after(first.astimezone(UTC).astimezone(berlin).replace(fold=1))
    assert after.date() == datetime(2026, 10, 26).date()


def test_a_naive_moment_gives_a_naive_answer() -> None:
    assert parse("0 * * * *").next_after(datetime(2026, 1, 1, 5, 10)) == datetime(
        2026, 1, 1, 6, 0)
