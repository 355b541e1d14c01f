"""Ids that carry their virtual shard: 64-bit, time-ordered, made in Python or in PostgreSQL.

An id is a positive signed 64-bit integer (a PostgreSQL ``bigint``), laid out
as Instagram lays out its ids, most significant bits first::

    | 41 bits: milliseconds since EPOCH | 13 bits: virtual shard | 10 bits: sequence |

``EPOCH`` is 2026-01-01T00:00:00Z. The top bit of the time field would make
the id negative, so ids stay positive only while the time fits in 40 bits:
until 2060-11-03T19:53:47.775Z (:data:`LAST_TIME`). Making an id for a time
outside that span raises OverflowError rather than wrapping around.

Because the virtual shard is inside the id, a row records its own shard: a
row found by its id is routed without a lookup table, and when resharding
moves a virtual shard the rows to copy are selected by the id alone (see
:func:`shard_expression`). Ids sort by creation time across shards to the
millisecond; within one shard and one generator they strictly increase.

Uniqueness: within one millisecond and one shard, the 1024 sequence values
tell ids apart. Every producer of ids for the same shards (each process's
:class:`IdGenerator`, and the database function from :func:`next_id_ddl`)
must therefore use its own *slot*: the sequence space split into ``slots``
equal ranges, one per producer. Two producers sharing a slot can make the
same id. A generator copied into forked children (made before gunicorn forks)
is two producers sharing a slot: make one per process after the fork.

The database function keeps Instagram's trade-off: it takes the sequence
value from one PostgreSQL sequence, modulo its slot's size, so more than that
many ids for one shard in one millisecond on one database would repeat.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
EPOCH_MS = 1_767_225_600_000  # EPOCH in milliseconds since the Unix epoch

TIME_BITS = 41
SHARD_BITS = 13
SEQUENCE_BITS = 10

MAX_SHARDS = 1 << SHARD_BITS
SEQUENCES_PER_MS = 1 << SEQUENCE_BITS
# One bit less than the field: the top bit of the id is the sign bit of a bigint.
MAX_MILLIS = (1 << (TIME_BITS - 1)) - 1
LAST_TIME = EPOCH + timedelta(milliseconds=MAX_MILLIS)

SEQUENCE_NAME = "tiers_id_seq"
FUNCTION_NAME = "tiers_next_id"

_SHARD_SHIFT = SEQUENCE_BITS
_TIME_SHIFT = SEQUENCE_BITS + SHARD_BITS
_SHARD_MASK = MAX_SHARDS - 1
_SEQUENCE_MASK = SEQUENCES_PER_MS - 1
_MAX_ID = (1 << 63) - 1

_IDENTIFIER = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?\Z")


class DecodedId(NamedTuple):
    """The three fields of an id; ``timestamp`` is timezone-aware UTC, to the millisecond."""

    timestamp: datetime
    shard: int
    sequence: int


def compose_id(millis: int, shard: int, sequence: int) -> int:
    """The id for ``millis`` milliseconds after EPOCH, virtual ``shard`` and ``sequence``.

    Raises OverflowError if the time is before EPOCH or after LAST_TIME, and
    ValueError if the shard or sequence does not fit its field.
    """
    if not 0 <= millis <= MAX_MILLIS:
        raise OverflowError(
            f"{millis} ms after {EPOCH.isoformat()} is outside the id time range "
            f"(0-{MAX_MILLIS}, until {LAST_TIME.isoformat()})")
    if not 0 <= shard < MAX_SHARDS:
        raise ValueError(f"shard {shard} does not fit in {SHARD_BITS} bits (0-{MAX_SHARDS - 1})")
    if not 0 <= sequence < SEQUENCES_PER_MS:
        raise ValueError(f"sequence {sequence} does not fit in {SEQUENCE_BITS} bits")
    return (millis << _TIME_SHIFT) | (shard << _SHARD_SHIFT) | sequence


def decode_id(value: int) -> DecodedId:
    """Split an id into its creation time, virtual shard and sequence.

    Raises ValueError for a value that is not a positive 64-bit signed integer.
    """
    _check_id(value)
    millis = value >> _TIME_SHIFT
    return DecodedId(
        timestamp=EPOCH + timedelta(milliseconds=millis),
        shard=(value >> _SHARD_SHIFT) & _SHARD_MASK,
        sequence=value & _SEQUENCE_MASK,
    )


def shard_of_id(value: int) -> int:
    """The virtual shard an id carries; ValueError as for :func:`decode_id`."""
    _check_id(value)
    return (value >> _SHARD_SHIFT) & _SHARD_MASK


def first_id_at(when: datetime) -> int:
    """The smallest id made at or after ``when`` (aware datetime): ``id >= first_id_at(t)``
    selects rows created since ``t`` on any shard. OverflowError outside the id time range."""
    if when.tzinfo is None:
        raise ValueError("a naive datetime is ambiguous; give one with a timezone")
    delta = when - EPOCH
    millis = -((-delta // timedelta(microseconds=1)) // 1000)  # ceiling to whole milliseconds
    return compose_id(millis, 0, 0)


def _check_id(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"an id is an int, got {type(value).__name__}")
    if not 0 <= value <= _MAX_ID:
        raise ValueError(f"{value} is not an id: ids are positive 64-bit signed integers")


def sequence_range(slot: int, slots: int) -> range:
    """The sequence values producer ``slot`` of ``slots`` may use (equal, disjoint ranges).

    Raises ValueError unless ``1 <= slots <= 1024`` and ``0 <= slot < slots``.
    """
    if isinstance(slots, bool) or not 1 <= slots <= SEQUENCES_PER_MS:
        raise ValueError(f"slots must be between 1 and {SEQUENCES_PER_MS}, got {slots}")
    if isinstance(slot, bool) or not 0 <= slot < slots:
        raise ValueError(f"slot must be between 0 and {slots - 1}, got {slot}")
    size = SEQUENCES_PER_MS // slots
    return range(slot * size, (slot + 1) * size)


def _check_shard_count(virtual_shards: int) -> None:
    if isinstance(virtual_shards, bool) or not 1 <= virtual_shards <= MAX_SHARDS:
        raise ValueError(
            f"virtual_shards must be between 1 and {MAX_SHARDS} (it must fit in "
            f"{SHARD_BITS} bits), got {virtual_shards}")


def shard_expression(column: str = "id") -> str:
    """SQL for the virtual shard of the id in ``column``, e.g. to select the rows of
    moving shards: ``WHERE <expression> = ANY(%s)``. ValueError for a non-identifier."""
    if not _IDENTIFIER.match(column):
        raise ValueError(f"not a plain SQL column name: {column!r}")
    return f"(({column} >> {_SHARD_SHIFT}) & {_SHARD_MASK})"


def next_id_ddl(*, virtual_shards: int = MAX_SHARDS, slot: int = 0, slots: int = 1) -> str:
    """SQL that installs ``tiers_next_id(shard int) RETURNS bigint`` and its sequence.

    The function makes the same ids as :class:`IdGenerator`, from the
    database's clock (``clock_timestamp()``, not the transaction's start, so
    a long transaction still gets fresh milliseconds), using sequence values
    of ``slot`` of ``slots``. It raises ``numeric_value_out_of_range`` for a
    shard outside ``0..virtual_shards-1`` or a clock outside the id range.
    Running the SQL again is harmless (IF NOT EXISTS, CREATE OR REPLACE), and
    running it with other arguments replaces the function. Several statements:
    run it without query parameters. ValueError for arguments that do not fit.
    """
    _check_shard_count(virtual_shards)
    lanes = sequence_range(slot, slots)
    return f"""\
CREATE SEQUENCE IF NOT EXISTS {SEQUENCE_NAME} AS bigint;

CREATE OR REPLACE FUNCTION {FUNCTION_NAME}(shard int) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $tiers$
DECLARE
    millis bigint;
    seq bigint;
BEGIN
    IF shard IS NULL OR shard < 0 OR shard >= {virtual_shards} THEN
        RAISE EXCEPTION '{FUNCTION_NAME}: shard % is outside 0..{virtual_shards - 1}', shard
            USING ERRCODE = 'numeric_value_out_of_range';
    END IF;
    millis := floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint - {EPOCH_MS};
    IF millis < 0 OR millis > {MAX_MILLIS} THEN
        RAISE EXCEPTION '{FUNCTION_NAME}: clock is outside the id time range'
            USING ERRCODE = 'numeric_value_out_of_range';
    END IF;
    seq := {lanes.start} + nextval('{SEQUENCE_NAME}') % {len(lanes)};
    RETURN (millis << {_TIME_SHIFT}) | (shard::bigint << {_SHARD_SHIFT}) | seq;
END
$tiers$;
"""


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch by the system clock."""
    return time.time_ns() // 1_000_000


class IdGenerator:
    """Makes ids in this process for any virtual shard; safe to share between threads.

    ``next_id(shard)`` returns ids that strictly increase for each shard.
    The generator remembers the last millisecond it used and takes
    ``max(last, clock)``, so a clock set back never yields a repeated id; the
    timestamps then stay at the last millisecond until the clock catches up.

    When its slot's sequence values for one shard are used up in one
    millisecond, ``next_id`` sleeps until the clock reaches the next
    millisecond. If the clock is behind the last millisecond (it was set
    back), waiting could take as long as the step back, so the generator
    moves its own millisecond one on instead: ids stay unique and ordered,
    and their time runs ahead of the clock by about the step back at most.

    ``slot``/``slots`` choose this producer's sequence range (see the module
    docstring); ``virtual_shards`` bounds the shards accepted. ``clock``
    (milliseconds since the Unix epoch) and ``sleep`` are for tests. Raises
    ValueError for a shard out of range and OverflowError when the clock is
    outside the id time range.
    """

    def __init__(
        self,
        *,
        slot: int = 0,
        slots: int = 1,
        virtual_shards: int = MAX_SHARDS,
        clock: Callable[[], int] = wall_clock_ms,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        _check_shard_count(virtual_shards)
        lanes = sequence_range(slot, slots)
        self.slot = slot
        self.slots = slots
        self.virtual_shards = virtual_shards
        self._base = lanes.start
        self._size = len(lanes)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._last = -1  # milliseconds after EPOCH of the last id made
        # Sequence values used per shard in the millisecond ``_last``.
        self._used: dict[int, int] = {}

    def next_id(self, shard: int) -> int:
        """A new id on virtual ``shard``, larger than every earlier one for that shard."""
        if isinstance(shard, bool) or not isinstance(shard, int):
            raise ValueError(f"a shard is an int, got {type(shard).__name__}")
        if not 0 <= shard < self.virtual_shards:
            raise ValueError(f"shard {shard} is outside 0-{self.virtual_shards - 1}")
        with self._lock:
            while True:
                now = self._clock() - EPOCH_MS
                if now < 0 and self._last < 0:
                    raise OverflowError(
                        f"the clock reads {now} ms from {EPOCH.isoformat()}, before the id "
                        "time range begins")
                if now > self._last:
                    self._last = now
                    self._used.clear()
                used = self._used.get(shard, 0)
                if used < self._size:
                    self._used[shard] = used + 1
                    return compose_id(self._last, shard, self._base + used)
                if now < self._last:
                    self._last += 1
                    self._used.clear()
                else:
                    # Asleep under the lock: callers for this shard need the same
                    # millisecond anyway, and others are delayed by one at most.
                    self._sleep(0.001)
