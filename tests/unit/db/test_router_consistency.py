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
from tiers.db.postgres import format_lsn, parse_lsn
from tiers.db.tokens import (
    causal_scope,
    check_cluster_name,
    current_scope,
    current_token,
    current_tokens,
    is_cluster_name,
    is_token,
    later,
    note_write,
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
    note_write("0/10", "social")
    assert current_token() is None and current_token("social") is None
    assert current_tokens() == {}


def test_a_scope_carries_its_token_and_takes_the_latest_write() -> None:
    with causal_scope("0/20") as scope:  # a bare token: main's
        assert current_token() == "0/20" and current_token("main") == "0/20"
        assert not scope.wrote
        note_write("0/30")
        # The latest commit wins, even below the received token (after a failover).
        note_write("0/10")
        assert current_token() == "0/10"
        assert (scope.received, scope.tokens, scope.wrote) == (
            {"main": "0/20"}, {"main": "0/10"}, True)
        assert scope.written == {"main"}
    assert current_token() is None


def test_a_scope_keeps_one_token_per_cluster() -> None:
    with causal_scope({"main": "0/20", "social": "5/0"}) as scope:
        assert current_token("main") == "0/20" and current_token("social") == "5/0"
        assert current_token("archive") is None
        note_write("0/8", "social")  # below the received one: still the latest commit
        assert current_tokens() == {"main": "0/20", "social": "0/8"}
        note_write("0/30", "archive")
        note_write("0/31")
        assert current_tokens() == {"main": "0/31", "social": "0/8", "archive": "0/30"}
        assert scope.received == {"main": "0/20", "social": "5/0"}
        assert scope.written == {"main", "social", "archive"} and scope.wrote
    with causal_scope({}) as empty:
        assert current_tokens() == {} and empty.received == {} and not empty.wrote


def test_what_a_scope_received_cannot_change() -> None:
    given = {"main": "0/1"}
    with causal_scope(given) as scope:
        given["main"] = "0/99"
        note_write("0/2")
        assert scope.received == {"main": "0/1"}
        with pytest.raises(TypeError):
            scope.received["main"] = "0/3"  # type: ignore[index]


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


@pytest.mark.parametrize(
    "tokens",
    ["yesterday", {"main": "yesterday"}, {"Main": "0/1"}, {"so-cial": "0/1"}, {"": "0/1"},
     {"x" * 64: "0/1"}, {"\u00e9t\u00e9": "0/1"}],
)
def test_a_scope_refuses_a_malformed_token_or_cluster_name(tokens: dict[str, str] | str) -> None:
    with pytest.raises(ValueError), causal_scope(tokens):
        pass


def test_note_write_refuses_a_malformed_token_or_cluster_name() -> None:
    with causal_scope(None) as scope:
        with pytest.raises(ValueError):
            note_write("soon")
        with pytest.raises(ValueError):
            note_write("0/1", "So cial")
        assert scope.tokens == {} and not scope.wrote


def test_cluster_names() -> None:
    for good in ("main", "social", "shard_07", "_x", "a" * 63):
        assert is_cluster_name(good)
        assert check_cluster_name(good) == good
    for bad in ("", "Main", "7th", "so-cial", "a.b", "a:b", "a b", "\u00e9", "a" * 64,
                "main\n", None, 7):
        assert not is_cluster_name(bad)
    with pytest.raises(ValueError, match="lower-case ASCII identifier"):
        check_cluster_name("So-cial")


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


def test_a_replica_lagging_beyond_the_wait_is_asked_last_and_alone_not_waited_for() -> None:
    # b lags 3 s: a wait of 0.05 s for it would be in vain; c has no lag measured.
    plan = plan_read(POOL, token=200, max_staleness=None, start=0, now=10.0, down={},
                     wait_lag=0.05)
    assert plan == ReadPlan(poll=("a", "c", "b"), wait=True)
    plan = plan_read(POOL, token=200, max_staleness=None, start=0, now=10.0, down={},
                     wait_lag=5.0)
    assert plan == ReadPlan(poll=("a", "b", "c"), wait=True)
    # Only lagging replicas to ask: each is asked once, nobody waits.
    plan = plan_read(POOL[1:2], token=200, max_staleness=None, start=0, now=10.0, down={},
                     wait_lag=0.05)
    assert plan == ReadPlan(poll=("b",), wait=False)
    # Lag does not matter to a replica the monitor saw past the token, nor without a wait bound.
    plan = plan_read(POOL, token=40, max_staleness=None, start=0, now=10.0, down={},
                     wait_lag=0.05)
    assert plan == ReadPlan(ready=("a", "b"), poll=("c",))
    plan = plan_read(POOL[1:2], token=200, max_staleness=None, start=0, now=10.0, down={})
    assert plan == ReadPlan(poll=("b",), wait=True)


def test_replicas_remembered_past_the_token_are_polled_first_and_waited_for() -> None:
    remembered = {"b": 90, "c": 70}
    plan = plan_read(POOL, token=80, max_staleness=None, start=0, now=10.0, down={},
                     wait_lag=0.05, remembered=remembered)
    assert plan == ReadPlan(ready=("a",), poll=("b", "c"))
    plan = plan_read(POOL, token=200, max_staleness=None, start=0, now=10.0, down={},
                     wait_lag=0.05, remembered=remembered)
    assert plan == ReadPlan(poll=("a", "c", "b"))  # remembered below the token: b lags
    plan = plan_read(POOL[1:2], token=85, max_staleness=None, start=0, now=10.0, down={},
                     wait_lag=0.05, remembered={"b": 90})
    assert plan == ReadPlan(poll=("b",), wait=True)
    plan = plan_read(POOL, token=85, max_staleness=None, start=1, now=10.0, down={},
                     wait_lag=0.05, remembered={"c": 90})
    assert plan == ReadPlan(ready=("a",), poll=("c", "b"))
    # A mark or a staleness bound still leaves a remembered replica out.
    plan = plan_read(POOL, token=80, max_staleness=None, start=0, now=11.0,
                     down={"b": DownMark(10.5, 20.0)}, remembered=remembered)
    assert plan == ReadPlan(ready=("a",), poll=("c",))
    plan = plan_read(POOL, token=80, max_staleness=1.0, start=0, now=10.0, down={},
                     remembered=remembered)
    assert plan == ReadPlan(ready=("a",))


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
