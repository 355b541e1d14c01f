"""The router's pure parts: LSN tokens, the request scope, and the choice of replicas."""

from __future__ import annotations

import threading

import pytest

from tiers.db.consistency import (
    MAX_POLL_DELAY,
    DownMark,
    ReadPlan,
    ReplicaView,
    plan_read,
    poll_delay,
    replica_qualifies,
    rotation,
    usable,
    within_staleness,
)
from tiers.db.tokens import (
    causal_scope,
    current_scope,
    current_token,
    format_lsn,
    is_token,
    later,
    note_write,
    parse_lsn,
)

# -- LSNs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0/0", 0),
        ("0/1D744C8", 0x1D744C8),
        ("16/B374D848", (0x16 << 32) | 0xB374D848),
        ("ffffffff/ffffffff", 2**64 - 1),
    ],
)
def test_parse_and_format_lsn(text: str, value: int) -> None:
    assert parse_lsn(text) == value
    assert format_lsn(value) == text.upper()


def test_lsn_order_is_numeric_not_textual() -> None:
    # As text "9/0" > "10/0"; as positions it is the other way round.
    assert parse_lsn("9/FFFFFFFF") < parse_lsn("10/0")
    assert parse_lsn("0/A") > parse_lsn("0/9")
    assert later("9/FFFFFFFF", "10/0") == "10/0"
    assert later(None, "0/1") == "0/1" and later("0/1", None) == "0/1"
    assert later(None, None) is None


@pytest.mark.parametrize(
    "text", ["", "0", "0/", "/0", "1/2/3", "g/0", "0/123456789", " 0/1", "0x1/0"]
)
def test_parse_lsn_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_lsn(text)
    assert not is_token(text)


def test_format_lsn_range() -> None:
    with pytest.raises(ValueError):
        format_lsn(-1)
    with pytest.raises(ValueError):
        format_lsn(2**64)


def test_is_token() -> None:
    assert is_token("0/16B3748")
    assert not is_token(None)


# -- the request scope -------------------------------------------------------------------------


def test_outside_a_scope_there_is_no_token_and_writes_are_not_kept() -> None:
    assert current_scope() is None and current_token() is None
    note_write("0/10")
    assert current_token() is None


def test_a_scope_carries_its_token_and_takes_the_latest_write() -> None:
    with causal_scope("0/20") as scope:
        assert current_token() == "0/20"
        assert not scope.wrote
        note_write("0/30")
        # The latest commit wins, even below the received token (after a failover).
        note_write("0/10")
        assert current_token() == "0/10"
        assert (scope.received, scope.token, scope.wrote) == ("0/20", "0/10", True)
    assert current_token() is None


def test_scopes_nest_and_are_per_thread() -> None:
    seen: list[str | None] = []
    with causal_scope("0/1"):
        with causal_scope(None):
            assert current_token() is None
        assert current_token() == "0/1"
        thread = threading.Thread(target=lambda: seen.append(current_token()))
        thread.start()
        thread.join()
    assert seen == [None]


def test_a_scope_refuses_a_malformed_token() -> None:
    with pytest.raises(ValueError), causal_scope("yesterday"):
        pass
    with causal_scope(None), pytest.raises(ValueError):
        note_write("soon")


# -- choosing replicas -------------------------------------------------------------------------


def test_replica_qualifies() -> None:
    assert replica_qualifies(None, None)
    assert replica_qualifies(5, None)
    assert replica_qualifies(5, 5)
    assert replica_qualifies(6, 5)
    assert not replica_qualifies(4, 5)
    assert not replica_qualifies(None, 5)


def test_rotation() -> None:
    assert rotation(3, 0) == [0, 1, 2]
    assert rotation(3, 1) == [1, 2, 0]
    assert rotation(3, 5) == [2, 0, 1]
    assert rotation(0, 7) == []


def test_usable_until_the_mark_expires_or_the_monitor_sees_the_node_again() -> None:
    mark = DownMark(since=10.0, until=15.0)
    assert usable(None, None, 0.0)
    assert not usable(mark, None, 12.0)
    assert not usable(mark, 9.0, 12.0)  # seen before it failed
    assert usable(mark, 11.0, 12.0)  # seen answering since
    assert usable(mark, None, 15.0)


def test_within_staleness_adds_the_age_of_the_measurement() -> None:
    assert within_staleness(ReplicaView("r", lag_seconds=0.2, observed_at=10.0), 0.5, 10.1)
    assert not within_staleness(ReplicaView("r", lag_seconds=0.2, observed_at=10.0), 0.5, 10.4)
    assert not within_staleness(ReplicaView("r", lag_seconds=0.5, observed_at=10.0), 0.5, 10.0)
    assert not within_staleness(ReplicaView("r"), 100.0, 10.0)


POOL = [
    ReplicaView("a", position=100, lag_seconds=0.0, observed_at=10.0),
    ReplicaView("b", position=50, lag_seconds=3.0, observed_at=10.0),
    ReplicaView("c"),
]


def test_without_a_token_every_usable_replica_is_ready_in_rotation() -> None:
    plan = plan_read(POOL, token=None, max_staleness=None, start=1, now=10.0, down={})
    assert plan == ReadPlan(ready=("b", "c", "a"))
    # Failed after the monitor's last look at it.
    down = {"b": DownMark(10.5, 20.0)}
    plan = plan_read(POOL, token=None, max_staleness=None, start=1, now=11.0, down=down)
    assert plan.ready == ("c", "a")


def test_a_token_splits_the_pool_into_known_good_and_to_be_asked() -> None:
    plan = plan_read(POOL, token=80, max_staleness=None, start=0, now=10.0, down={})
    assert plan == ReadPlan(ready=("a",), poll=("b", "c"))
    plan = plan_read(POOL, token=200, max_staleness=None, start=0, now=10.0, down={})
    assert plan == ReadPlan(ready=(), poll=("a", "b", "c"))


def test_bounded_staleness_keeps_only_measured_fresh_replicas() -> None:
    plan = plan_read(POOL, token=None, max_staleness=1.0, start=0, now=10.0, down={})
    assert plan == ReadPlan(ready=("a",))
    plan = plan_read(POOL, token=200, max_staleness=5.0, start=0, now=10.0, down={})
    assert plan == ReadPlan(poll=("a", "b"))


def test_nothing_usable_means_the_primary() -> None:
    assert plan_read([], token=None, max_staleness=None, start=0, now=0.0, down={}).primary_only
    down = {v.name: DownMark(10.5, 20.0) for v in POOL}
    assert plan_read(POOL, token=None, max_staleness=None, start=0, now=11.0,
                     down=down).primary_only


def test_poll_delay_backs_off_to_a_cap() -> None:
    delays = [poll_delay(n) for n in range(12)]
    assert delays[0] > 0
    assert delays == sorted(delays)
    assert delays[-1] == MAX_POLL_DELAY
    assert poll_delay(10_000) == MAX_POLL_DELAY
