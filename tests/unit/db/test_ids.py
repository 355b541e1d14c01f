from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from tiers.db.ids import (
    EPOCH,
    EPOCH_MS,
    FUNCTION_NAME,
    LAST_TIME,
    MAX_MILLIS,
    MAX_SHARDS,
    SEQUENCE_NAME,
    SEQUENCES_PER_MS,
    DecodedId,
    IdGenerator,
    compose_id,
    decode_id,
    first_id_at,
    next_id_ddl,
    sequence_range,
    shard_expression,
    shard_of_id,
)

T0 = EPOCH_MS + 1_000_000  # some moment after the epoch, in Unix milliseconds


class FakeClock:
    """A settable clock whose ``sleep`` moves time on by whole milliseconds."""

    def __init__(self, now: int = T0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> int:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(1, round(seconds * 1000))


def generator(clock: FakeClock, **kwargs: int) -> IdGenerator:
    return IdGenerator(clock=clock, sleep=clock.sleep, **kwargs)


# -- layout ----------------------------------------------------------------


def test_epoch_constants_agree() -> None:
    assert datetime(2026, 1, 1, tzinfo=UTC) == EPOCH
    assert int(EPOCH.timestamp() * 1000) == EPOCH_MS
    assert MAX_SHARDS == 8192
    assert SEQUENCES_PER_MS == 1024
    assert datetime(2060, 11, 3, 19, 53, 47, 775000, tzinfo=UTC) == LAST_TIME


def test_fields_sit_where_the_layout_says() -> None:
    assert compose_id(0, 0, 1) == 1
    assert compose_id(0, 1, 0) == 1 << 10
    assert compose_id(1, 0, 0) == 1 << 23
    assert compose_id(5, 8191, 1023) == (5 << 23) | (8191 << 10) | 1023


def test_the_largest_id_is_a_positive_signed_64_bit_integer() -> None:
    largest = compose_id(MAX_MILLIS, MAX_SHARDS - 1, SEQUENCES_PER_MS - 1)
    assert largest == 2**63 - 1
    assert decode_id(largest) == DecodedId(LAST_TIME, MAX_SHARDS - 1, SEQUENCES_PER_MS - 1)


def test_decode_round_trips_compose() -> None:
    value = compose_id(123_456_789, 700, 42)
    timestamp, shard, sequence = decode_id(value)
    assert timestamp == EPOCH + timedelta(milliseconds=123_456_789)
    assert timestamp.tzinfo is UTC
    assert (shard, sequence) == (700, 42)
    assert shard_of_id(value) == 700


@pytest.mark.parametrize(
    ("millis", "shard", "sequence", "error"),
    [
        (-1, 0, 0, OverflowError),
        (MAX_MILLIS + 1, 0, 0, OverflowError),
        (0, -1, 0, ValueError),
        (0, MAX_SHARDS, 0, ValueError),
        (0, 0, -1, ValueError),
        (0, 0, SEQUENCES_PER_MS, ValueError),
    ],
)
def test_compose_refuses_fields_that_do_not_fit(
    millis: int, shard: int, sequence: int, error: type[Exception]
) -> None:
    with pytest.raises(error):
        compose_id(millis, shard, sequence)


@pytest.mark.parametrize("value", [-1, 2**63, True, "12"])
def test_decode_refuses_what_is_not_an_id(value: object) -> None:
    with pytest.raises(ValueError):
        decode_id(value)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        shard_of_id(value)  # type: ignore[arg-type]


def test_first_id_at_bounds_ids_made_from_that_moment() -> None:
    when = EPOCH + timedelta(milliseconds=500, microseconds=1)
    floor = first_id_at(when)
    assert decode_id(floor).timestamp == EPOCH + timedelta(milliseconds=501)
    assert compose_id(500, MAX_SHARDS - 1, SEQUENCES_PER_MS - 1) < floor
    assert compose_id(501, 0, 0) == floor
    assert first_id_at(EPOCH) == 0
    with pytest.raises(ValueError, match="naive"):
        first_id_at(datetime(2026, 2, 1))
    with pytest.raises(OverflowError):
        first_id_at(EPOCH - timedelta(days=1))


def test_shard_expression_names_the_shard_bits() -> None:
    assert shard_expression() == "((id >> 10) & 8191)"
    assert shard_expression("t.owner_id") == "((t.owner_id >> 10) & 8191)"
    value = compose_id(99, 321, 7)
    assert (value >> 10) & 8191 == 321
    with pytest.raises(ValueError):
        shard_expression("id; DROP TABLE users")


# -- slots -------------------------------------------------------------------


def test_slots_split_the_sequence_space_without_overlap() -> None:
    assert sequence_range(0, 1) == range(0, 1024)
    parts = [sequence_range(slot, 4) for slot in range(4)]
    assert parts == [range(0, 256), range(256, 512), range(512, 768), range(768, 1024)]
    assert sequence_range(2, 3) == range(682, 1023)


@pytest.mark.parametrize(("slot", "slots"), [(0, 0), (0, 1025), (1, 1), (-1, 2), (True, 2)])
def test_bad_slots_are_refused(slot: int, slots: int) -> None:
    with pytest.raises(ValueError):
        sequence_range(slot, slots)
    with pytest.raises(ValueError):
        IdGenerator(slot=slot, slots=slots)


# -- the generator -------------------------------------------------------------


def test_generated_ids_decode_to_their_shard_and_time() -> None:
    clock = FakeClock()
    ids = generator(clock)
    value = ids.next_id(777)
    assert decode_id(value) == DecodedId(EPOCH + timedelta(milliseconds=T0 - EPOCH_MS), 777, 0)


def test_ids_of_one_generator_strictly_increase_with_the_real_clock() -> None:
    ids = IdGenerator()
    made = [ids.next_id(5) for _ in range(20_000)]
    assert all(a < b for a, b in itertools.pairwise(made))
    assert {shard_of_id(value) for value in made} == {5}


def test_each_shard_has_its_own_sequence_within_a_millisecond() -> None:
    clock = FakeClock()
    ids = generator(clock)
    assert [decode_id(ids.next_id(s)).sequence for s in (1, 2, 1, 2, 1)] == [0, 0, 1, 1, 2]
    clock.now += 1
    assert decode_id(ids.next_id(1)).sequence == 0


def test_a_used_up_millisecond_waits_for_the_next() -> None:
    clock = FakeClock()
    ids = generator(clock)
    first = [ids.next_id(3) for _ in range(SEQUENCES_PER_MS)]
    assert clock.sleeps == []
    assert [decode_id(v).sequence for v in first] == list(range(SEQUENCES_PER_MS))
    after = ids.next_id(3)
    assert clock.sleeps != []
    assert clock.now == T0 + 1
    assert decode_id(after) == DecodedId(
        EPOCH + timedelta(milliseconds=T0 + 1 - EPOCH_MS), 3, 0)
    assert after > first[-1]


def test_a_slot_uses_only_its_own_sequence_values() -> None:
    clock = FakeClock()
    ids = generator(clock, slot=1, slots=4)
    made = [ids.next_id(0) for _ in range(256)]
    assert [decode_id(v).sequence for v in made] == list(range(256, 512))
    assert clock.sleeps == []
    assert decode_id(ids.next_id(0)).sequence == 256  # the next millisecond, after a wait
    assert clock.sleeps != []


def test_a_clock_set_back_never_repeats_an_id() -> None:
    clock = FakeClock()
    ids = generator(clock)
    made = [ids.next_id(9) for _ in range(10)]
    clock.now -= 50
    made += [ids.next_id(9) for _ in range(10)]
    assert all(decode_id(v).timestamp == decode_id(made[0]).timestamp for v in made)
    clock.now += 51  # one past the time already used
    made.append(ids.next_id(9))
    assert len(set(made)) == len(made)
    assert made == sorted(made)
    assert decode_id(made[-1]).sequence == 0


def test_a_clock_set_back_does_not_stall_a_used_up_millisecond() -> None:
    clock = FakeClock()
    ids = generator(clock)
    ids.next_id(1)
    clock.now -= 3_600_000  # an hour back
    made = [ids.next_id(1) for _ in range(3 * SEQUENCES_PER_MS)]
    assert clock.sleeps == []
    assert len(set(made)) == len(made)
    assert made == sorted(made)
    last = decode_id(made[-1]).timestamp
    assert last == EPOCH + timedelta(milliseconds=T0 + 3 - EPOCH_MS)


def test_clock_outside_the_id_range_is_an_error() -> None:
    with pytest.raises(OverflowError, match="before"):
        IdGenerator(clock=lambda: EPOCH_MS - 1).next_id(0)
    with pytest.raises(OverflowError):
        IdGenerator(clock=lambda: EPOCH_MS + MAX_MILLIS + 1).next_id(0)


def test_a_clock_back_before_the_epoch_after_a_good_reading_is_absorbed() -> None:
    clock = FakeClock(EPOCH_MS + 10)
    ids = generator(clock)
    ids.next_id(0)
    clock.now = 0
    assert decode_id(ids.next_id(0)).timestamp == EPOCH + timedelta(milliseconds=10)


@pytest.mark.parametrize("shard", [-1, 1024, True])
def test_shards_beyond_the_configured_count_are_refused(shard: int) -> None:
    with pytest.raises(ValueError):
        IdGenerator(virtual_shards=1024).next_id(shard)


@pytest.mark.parametrize("count", [0, MAX_SHARDS + 1])
def test_the_shard_count_must_fit_in_13_bits(count: int) -> None:
    with pytest.raises(ValueError, match="13 bits"):
        IdGenerator(virtual_shards=count)
    with pytest.raises(ValueError, match="13 bits"):
        next_id_ddl(virtual_shards=count)


def test_threads_sharing_a_generator_get_distinct_ids() -> None:
    ids = IdGenerator()
    results: list[list[int]] = [[] for _ in range(8)]

    def work(out: list[int]) -> Callable[[], None]:
        return lambda: out.extend(ids.next_id(11) for _ in range(3000))

    threads = [threading.Thread(target=work(out)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [value for out in results for value in out]
    assert len(set(everything)) == len(everything) == 8 * 3000
    for out in results:
        assert out == sorted(out)


# -- the database function -------------------------------------------------------


def test_ddl_is_idempotent_sql_with_the_same_layout() -> None:
    ddl = next_id_ddl(virtual_shards=1024, slot=1, slots=2)
    assert f"CREATE SEQUENCE IF NOT EXISTS {SEQUENCE_NAME}" in ddl
    assert f"CREATE OR REPLACE FUNCTION {FUNCTION_NAME}(shard int) RETURNS bigint" in ddl
    assert f"- {EPOCH_MS};" in ddl
    assert "shard >= 1024" in ddl
    assert f"seq := 512 + nextval('{SEQUENCE_NAME}') % 512;" in ddl
    assert "(millis << 23) | (shard::bigint << 10) | seq" in ddl
    assert "clock_timestamp()" in ddl
