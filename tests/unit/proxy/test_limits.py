"""Deny lists, token buckets, blocks and the memory bound, on a clock the tests drive."""

from __future__ import annotations

import math

import pytest

from tiers.config.proxy import AbuseConfig
from tiers.errors import ConfigError
from tiers.proxy.limits import (
    ALLOW,
    DEFAULT_MAX_CLIENTS,
    DENIED_NETWORK,
    DENIED_USER_AGENT,
    Abuse,
    Action,
    Verdict,
)

CLIENT = b"198.51.100.7"
UA = b"Mozilla/5.0"


def _abuse(**fields: object) -> Abuse:
    fields.setdefault("exempt_networks", ())
    return Abuse.compile(AbuseConfig(**fields))  # type: ignore[arg-type]


def _run(abuse: Abuse, times: list[float], client: bytes = CLIENT) -> str:
    """Check one request at each time; '+' allowed, '4' (429) or '3' (403) for each."""
    marks = {Action.ALLOW: "+", Action.LIMITED: "4", Action.DENY: "3"}
    return "".join(marks[abuse.check(client, UA, now).action] for now in times)


# ---- token bucket ------------------------------------------------------------------


def test_burst_then_steady_rate_without_blocks() -> None:
    abuse = _abuse(rate=2.0, burst=5, block_for=0.0)
    # The burst goes at once; the sixth request must wait for a token.
    assert _run(abuse, [0.0] * 6) == "+++++4"
    verdict = abuse.check(CLIENT, UA, 0.1)
    assert (verdict.status, verdict.retry_after) == (429, 1)
    # Two tokens a second: a request every half second is always served...
    assert _run(abuse, [0.5 * i for i in range(1, 41)]) == "+" * 40
    # ... but a request every 0.4 s runs dry after the tokens saved up run out.
    abuse = _abuse(rate=2.0, burst=5, block_for=0.0)
    marks = _run(abuse, [0.4 * i for i in range(60)])
    assert marks.startswith("+" * 20)
    assert "4" in marks
    # Served requests never exceed burst + rate * elapsed.
    assert marks.count("+") <= 5 + 2.0 * 0.4 * 59


def test_retry_after_without_blocks_is_the_time_to_the_next_token() -> None:
    abuse = _abuse(rate=0.25, burst=1, block_for=0.0)
    assert _run(abuse, [0.0]) == "+"
    assert abuse.check(CLIENT, UA, 0.0).retry_after == 4
    assert abuse.check(CLIENT, UA, 2.5).retry_after == 2
    assert _run(abuse, [4.0]) == "+"


def test_an_idle_client_saves_up_to_burst_only() -> None:
    abuse = _abuse(rate=1.0, burst=3, block_for=0.0)
    assert _run(abuse, [0.0, 0.0, 0.0]) == "+++"
    assert _run(abuse, [1000.0] * 4) == "+++4"


def test_time_going_back_gives_no_tokens() -> None:
    abuse = _abuse(rate=1.0, burst=2, block_for=0.0)
    assert _run(abuse, [100.0, 100.0]) == "++"
    assert _run(abuse, [50.0, 99.0, 100.0]) == "444"
    assert _run(abuse, [101.0]) == "+"


# ---- blocks ------------------------------------------------------------------------


def test_a_client_over_the_limit_is_blocked_for_block_for() -> None:
    abuse = _abuse(rate=1.0, burst=3, block_for=10.0)
    assert _run(abuse, [0.0, 0.0, 0.0]) == "+++"
    first = abuse.check(CLIENT, UA, 0.0)
    assert (first.action, first.status, first.retry_after) == (Action.LIMITED, 429, 10)
    assert first.reason == "rate limited"
    # Tokens came back long ago, but the block holds, and asking does not extend it.
    later = [abuse.check(CLIENT, UA, t) for t in (3.0, 5.0, 9.2, 9.99)]
    assert [v.retry_after for v in later] == [7, 5, 1, 1]
    assert all(v.action is Action.LIMITED and v.reason == "blocked" for v in later)
    # At the end of the block the client starts again with a full bucket.
    assert _run(abuse, [10.0, 10.0, 10.0, 10.0]) == "+++4"
    assert abuse.check(CLIENT, UA, 10.0).retry_after == 10


def test_a_client_that_never_stops_gets_burst_per_block() -> None:
    abuse = _abuse(rate=5.0, burst=4, block_for=20.0)
    marks = _run(abuse, [0.05 * i for i in range(2000)])  # 20 requests a second for 100 s
    # One run of served requests per block period: the burst, plus what refills
    # while it is spent (a quarter second at 5 tokens a second).
    runs = [run for run in marks.split("4") if run]
    assert len(runs) == math.ceil(100.0 / 20.0)
    assert all(len(run) <= 4 + 2 for run in runs)
    assert marks.startswith("+++++4")


def test_other_clients_are_not_affected_by_a_block() -> None:
    abuse = _abuse(rate=1.0, burst=1, block_for=60.0)
    assert _run(abuse, [0.0, 0.0], client=b"203.0.113.1") == "+4"
    assert _run(abuse, [0.0], client=b"203.0.113.2") == "+"


# ---- exempt and deny lists ---------------------------------------------------------


@pytest.mark.parametrize("client", [b"127.0.0.1", b"127.9.9.9", b"::1", b"::ffff:127.0.0.1"])
def test_default_exempt_networks_are_never_limited(client: bytes) -> None:
    abuse = Abuse.compile(AbuseConfig(rate=1.0, burst=1, block_for=60.0))
    assert _run(abuse, [0.0] * 50, client=client) == "+" * 50
    assert abuse.stats(0.0).tracked == 0


def test_exempt_networks_are_exempt_from_limits_only() -> None:
    abuse = Abuse.compile(
        AbuseConfig(
            rate=1.0,
            burst=1,
            exempt_networks=("10.0.0.0/8",),
            deny_networks=("10.6.6.0/24",),
            deny_user_agents=("evil",),
        )
    )
    assert _run(abuse, [0.0] * 5, client=b"10.1.1.1") == "+++++"
    assert abuse.check(b"10.6.6.6", UA, 0.0) is DENIED_NETWORK
    assert abuse.check(b"10.1.1.1", b"EvilBot", 0.0) is DENIED_USER_AGENT


@pytest.mark.parametrize(
    ("networks", "client", "denied"),
    [
        (("192.0.2.0/24",), b"192.0.2.99", True),
        (("192.0.2.0/24",), b"192.0.3.1", False),
        (("192.0.2.0/24",), b"::ffff:192.0.2.1", True),
        (("2001:db8::/32",), b"2001:db8:5::1", True),
        (("2001:db8::/32",), b"2001:db9::1", False),
        (("::ffff:192.0.2.0/120",), b"192.0.2.1", True),
        (("::/0",), b"192.0.2.1", False),
        (("192.0.2.0/24",), b"-", False),
    ],
)
def test_deny_networks(networks: tuple[str, ...], client: bytes, denied: bool) -> None:
    abuse = _abuse(deny_networks=networks)
    verdict = abuse.check(client, UA, 0.0)
    assert verdict is (DENIED_NETWORK if denied else ALLOW)
    if denied:
        assert (verdict.action, verdict.status, verdict.retry_after) == (Action.DENY, 403, 0)


@pytest.mark.parametrize(
    ("patterns", "agent", "denied"),
    [
        (("sqlmap", "nikto"), b"sqlmap/1.7", True),
        (("sqlmap", "nikto"), b"Mozilla/5.00 (Nikto/2.5.0)", True),
        (("sqlmap", "nikto"), UA, False),
        ((r"^python-requests/\d",), b"python-requests/2.31", True),
        ((r"^python-requests/\d",), b"x python-requests/2.31", False),
        (("^$",), None, True),
        (("^$",), b"", True),
        (("^$",), UA, False),
        (("bot",), None, False),
        (("(?i)MASSCAN|zgrab",), b"Mozilla/5.0 zgrab/0.x", True),
    ],
)
def test_deny_user_agents(patterns: tuple[str, ...], agent: bytes | None, denied: bool) -> None:
    abuse = _abuse(deny_user_agents=patterns)
    assert abuse.check(CLIENT, agent, 0.0) is (DENIED_USER_AGENT if denied else ALLOW)


def test_denied_requests_take_no_tokens() -> None:
    abuse = _abuse(rate=1.0, burst=2, block_for=60.0, deny_user_agents=("bad",))
    for _ in range(10):
        assert abuse.check(CLIENT, b"bad", 0.0) is DENIED_USER_AGENT
    assert _run(abuse, [0.0, 0.0]) == "++"


def test_rate_zero_allows_everything_and_tracks_nothing() -> None:
    abuse = _abuse(rate=0.0)
    assert not abuse.limiting
    assert _run(abuse, [0.0] * 1000) == "+" * 1000
    assert abuse.stats(0.0).tracked == 0


# ---- who is a client ---------------------------------------------------------------


def test_ipv6_clients_are_counted_by_their_64() -> None:
    abuse = _abuse(rate=1.0, burst=2, block_for=60.0)
    assert _run(abuse, [0.0], client=b"2001:db8:1:2::1") == "+"
    assert _run(abuse, [0.0], client=b"2001:db8:1:2:ffff::9") == "+"
    assert _run(abuse, [0.0], client=b"2001:db8:1:2::abcd") == "4"
    assert _run(abuse, [0.0], client=b"2001:db8:1:3::1") == "+"
    per_address = Abuse.compile(AbuseConfig(rate=1.0, burst=1, exempt_networks=()), ipv6_prefix=128)
    assert _run(per_address, [0.0], client=b"2001:db8::1") == "+"
    assert _run(per_address, [0.0], client=b"2001:db8::2") == "+"


def test_mapped_and_plain_ipv4_are_one_client() -> None:
    abuse = _abuse(rate=1.0, burst=2, block_for=60.0)
    assert _run(abuse, [0.0], client=b"192.0.2.5") == "+"
    assert _run(abuse, [0.0], client=b"::ffff:192.0.2.5") == "+"
    assert _run(abuse, [0.0], client=b"192.0.2.5") == "4"


def test_peers_without_an_address_share_one_bucket() -> None:
    abuse = _abuse(rate=1.0, burst=2, block_for=60.0)
    assert _run(abuse, [0.0, 0.0, 0.0], client=b"-") == "++4"
    assert _run(abuse, [0.0], client=CLIENT) == "+"


# ---- memory ------------------------------------------------------------------------


def test_memory_is_bounded_under_many_addresses() -> None:
    abuse = Abuse.compile(AbuseConfig(rate=1.0, burst=5, exempt_networks=()), max_clients=1000)
    for i in range(100_000):
        ip = b"10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255)
        assert abuse.check(ip, UA, i * 1e-5) is ALLOW
    stats = abuse.stats(1.0)
    assert stats.tracked == 1000
    assert stats.allowed == 100_000
    assert stats.evicted == 99_000


def test_the_default_bound_holds_with_100k_addresses() -> None:
    abuse = _abuse(rate=1.0, burst=5)
    for i in range(100_000):
        abuse.check(b"2001:db8:%x:%x::1" % (i >> 16, i & 0xFFFF), UA, 0.0)
    assert abuse.stats(0.0).tracked == DEFAULT_MAX_CLIENTS


def test_blocks_are_bounded_and_the_nearest_to_its_end_goes_first() -> None:
    abuse = Abuse.compile(
        AbuseConfig(rate=0.001, burst=1, block_for=600.0, exempt_networks=()), max_clients=500
    )
    for i in range(100_000):
        ip = b"172.16.%d.%d" % (i >> 8, i & 255)
        assert _run(abuse, [i * 1e-3, i * 1e-3], client=ip) == "+4"
    stats = abuse.stats(100.0)
    assert stats.blocked == 500
    assert stats.blocks == 100_000
    assert stats.limited == 100_000
    assert stats.tracked <= 500
    # The latest blocks are the ones kept; the earliest were released.
    assert _run(abuse, [100.0], client=b"172.16.%d.%d" % (99_999 >> 8, 99_999 & 255)) == "4"
    assert _run(abuse, [100.0], client=b"172.16.0.0") == "+"


def test_full_idle_buckets_are_dropped_by_sweep() -> None:
    abuse = _abuse(rate=1.0, burst=10, block_for=30.0)
    for i in range(100):
        assert _run(abuse, [0.0] * 10, client=b"192.0.2.%d" % i) == "+" * 10
    assert _run(abuse, [5.0] * 10, client=b"198.51.100.1") == "+" * 10
    assert _run(abuse, [5.0] * 11, client=b"198.51.100.2") == "+" * 10 + "4"  # until 35
    assert abuse.stats(5.0).tracked == 101
    # The first hundred buckets are full again at 10 s; the busy one at 15 s.
    assert abuse.sweep(9.5) == 0
    assert abuse.sweep(10.0) == 100
    assert abuse.stats(10.0).tracked == 1
    assert abuse.stats(10.0).blocked == 1
    assert abuse.sweep(35.0) == 2  # the block is over, the busy bucket full
    stats = abuse.stats(35.0)
    assert (stats.tracked, stats.blocked) == (0, 0)
    # Forgetting a full bucket changes nothing for its client.
    assert _run(abuse, [35.0] * 11, client=b"198.51.100.1") == "+" * 10 + "4"


def test_new_clients_drop_full_buckets_on_their_way() -> None:
    abuse = _abuse(rate=10.0, burst=1)
    for i in range(1000):
        # Each bucket is full again 0.1 s after its request; clients come every 0.2 s.
        abuse.check(b"10.0.%d.%d" % (i >> 8, i & 255), UA, i * 0.2)
    assert abuse.stats(200.0).tracked <= 2


def test_blocked_count_falls_when_blocks_end_without_a_sweep() -> None:
    abuse = _abuse(rate=1.0, burst=1, block_for=10.0)
    for i, t in enumerate((0.0, 4.0)):
        _run(abuse, [t, t], client=b"192.0.2.%d" % i)
    assert abuse.stats(5.0).blocked == 2
    assert abuse.stats(10.0).blocked == 1
    assert abuse.stats(14.0).blocked == 0


def test_counters() -> None:
    abuse = _abuse(rate=1.0, burst=2, block_for=5.0, deny_networks=("192.0.2.0/24",))
    _run(abuse, [0.0] * 4)
    abuse.check(b"192.0.2.1", UA, 0.0)
    stats = abuse.stats(0.0)
    assert (stats.allowed, stats.limited, stats.denied, stats.blocks, stats.blocked) == (
        2,
        2,
        1,
        1,
        1,
    )


# ---- config ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"rate": -1.0}, "rate"),
        ({"rate": math.nan}, "rate"),
        ({"rate": math.inf}, "rate"),
        ({"rate": 1.0, "burst": 0}, "burst"),
        ({"block_for": -1.0}, "block_for"),
        ({"block_for": math.inf}, "block_for"),
        ({"deny_networks": ("10.0.0.0/8", "10.0.0.300")}, "deny_networks[1]"),
        ({"exempt_networks": ("nope",)}, "exempt_networks[0]"),
        ({"deny_user_agents": ("fine", "(broken")}, "deny_user_agents[1]"),
    ],
)
def test_bad_config_names_the_key(fields: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Abuse.compile(AbuseConfig(**fields))  # type: ignore[arg-type]
    assert (caught.value.source, caught.value.key) == ("proxy.abuse", key)


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ConfigError):
        Abuse.compile(AbuseConfig(), max_clients=0)
    with pytest.raises(ConfigError):
        Abuse.compile(AbuseConfig(), ipv6_prefix=0)
    with pytest.raises(ConfigError):
        Abuse.compile(AbuseConfig(), ipv6_prefix=129)


def test_burst_zero_is_fine_without_a_rate() -> None:
    assert Abuse.compile(AbuseConfig(rate=0.0, burst=0)).check(CLIENT, UA, 0.0) is ALLOW


def test_verdicts_are_plain_values() -> None:
    assert Verdict(Action.ALLOW, 0, 0, "") == ALLOW
    assert DENIED_NETWORK.status == DENIED_USER_AGENT.status == 403
