"""Pipelined rounds over several nodes: ``exchange_all`` and the cluster reads and writes on it.

Against real memcached processes, and against scripted listeners in this
process for what a healthy node never does (stay silent, answer garbage,
close mid-reply). A round sends every node's request before it reads any
reply: a scripted node here answers only once all of them hold their
request, which a client asking one node after another could never see. One
node's failure is a miss for that node's keys only, counts towards its
ejection, and its connection, with whatever half reply it held, is never
used again.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import require
from tests.integration.cachekit import Node, ScriptedServer, memcached_binary, node_state
from tiers.cache.client import Client
from tiers.cache.cluster import CacheCluster, memcached_factory, replicated
from tiers.cache.errors import CacheKeyError, NodeError, ProtocolError, ServerError
from tiers.cache.policy import FailureSettings
from tiers.cache.ring import KetamaRing, NodeSpec
from tiers.cache.rounds import exchange_all

FAILURE = FailureSettings(failure_limit=2, dead_timeout=60.0, connect_timeout=0.5, timeout=0.5)


@pytest.fixture
def memcacheds() -> Iterator[list[Node]]:
    require(memcached_binary() is not None, "memcached is not installed")
    nodes = [Node("memcached") for _ in range(3)]
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.kill()  # memcached takes a second to stop on SIGTERM
            node.cleanup()


def spec_of(port: int) -> NodeSpec:
    return NodeSpec("127.0.0.1", port)


def spread(specs: list[NodeSpec], per_node: int) -> dict[NodeSpec, list[str]]:
    """``per_node`` keys owned by each node of ``specs``."""
    ring = KetamaRing(specs)
    owned: dict[NodeSpec, list[str]] = {spec: [] for spec in specs}
    for i in range(100000):
        key = f"item:{i}"
        keys = owned[ring.node_for(key)]
        if len(keys) < per_node:
            keys.append(key)
        if all(len(keys) == per_node for keys in owned.values()):
            return owned
    raise AssertionError("the ring gave some node too few keys")


def serve_gets(data: bytes) -> bytes:
    """What memcached answers to get lines when every key holds its own name."""
    out = b""
    for line in data.split(b"\r\n"):
        if line.startswith(b"get "):
            for key in line.split()[1:]:
                out += b"VALUE %b 0 %d\r\n%b\r\n" % (key, len(key), key)
            out += b"END\r\n"
    return out


# ---- exchange_all on one-node clients ---------------------------------------------------


def test_one_round_runs_every_kind_of_exchange(memcacheds: list[Node]) -> None:
    a, b, c = (Client(n.host, n.port) for n in memcacheds)
    try:
        a.set("n", 5)
        b.set("gone", "x")
        round_ = [
            a.prepare("incr", "n", 2),
            b.prepare("delete", "gone"),
            c.prepare("set", "s", {"json": True}, 60),
        ]
        exchange_all(round_)
        assert [x.error for x in round_] == [None, None, None]
        assert [x.result for x in round_] == [7, True, True]
        round_ = [
            a.prepare("get_many", ["n", "absent"]),
            b.prepare("add", "gone", "back"),
            c.prepare("touch", "s", 30),
        ]
        exchange_all(round_)
        assert [x.result for x in round_] == [{"n": 7}, True, True]
        assert b.get("gone") == "back"
        assert c.get("s") == {"json": True}
    finally:
        for client in (a, b, c):
            client.close()


def test_bad_arguments_raise_before_anything_is_sent(memcacheds: list[Node]) -> None:
    a, b = (Client(n.host, n.port) for n in memcacheds[:2])
    try:
        with pytest.raises(CacheKeyError):
            a.prepare("get_many", ["fine", "not fine"])
        with pytest.raises(ValueError, match="cannot prepare 'gets'"):
            a.prepare("gets", "k")
        with pytest.raises(TypeError, match="prepare\\('touch'"):
            a.prepare("touch", "k")
        assert not a.connected
        with pytest.raises(ValueError, match="one exchange per client"):
            exchange_all([a.prepare("get_many", ["x"]), a.prepare("set", "x", 1)])
        assert not a.connected
        # An empty multi-get asks nothing and finds nothing.
        empty = b.prepare("get_many", [])
        exchange_all([empty])
        assert (empty.result, empty.error, b.connected) == ({}, None, False)
    finally:
        a.close()
        b.close()


def test_requests_to_every_node_are_sent_before_any_reply_is_read(scripted: Any) -> None:
    # Each node answers only once all three hold their request: asked one after
    # another, the first would wait for the others and its client would time out.
    all_asked = threading.Barrier(3, timeout=10)

    def answer(data: bytes) -> object:
        all_asked.wait()
        return serve_gets(data)

    servers = [scripted(answer) for _ in range(3)]
    clients = [Client("127.0.0.1", s.port, timeout=2.0) for s in servers]
    try:
        round_ = [c.prepare("get_many", [f"k{i}", f"j{i}"]) for i, c in enumerate(clients)]
        exchange_all(round_)
        assert [x.error for x in round_] == [None, None, None]
        assert [x.result for x in round_] == [{f"k{i}": f"k{i}".encode(), f"j{i}": f"j{i}".encode()}
                                              for i in range(3)]  # fmt: skip
    finally:
        for client in clients:
            client.close()


def test_a_failing_node_fails_its_exchange_only(memcacheds: list[Node], scripted: Any) -> None:
    silent = scripted(lambda data: None)
    garbage = scripted(lambda data: b"HELLO\r\n")
    erring = scripted(lambda data: b"SERVER_ERROR out of memory\r\n")
    good = Client(memcacheds[0].host, memcacheds[0].port)
    dead = memcacheds[1]
    dead.kill()
    clients = {
        "good": good,
        "silent": Client("127.0.0.1", silent.port, timeout=0.3),
        "garbage": Client("127.0.0.1", garbage.port),
        "erring": Client("127.0.0.1", erring.port),
        "dead": Client(dead.host, dead.port),
    }
    try:
        good.set("k", "v")
        round_ = {name: c.prepare("get_many", ["k"]) for name, c in clients.items()}
        exchange_all(list(round_.values()))
        assert round_["good"].result == {"k": "v"} and round_["good"].error is None
        assert isinstance(round_["silent"].error, NodeError)
        assert "within 0.3s" in str(round_["silent"].error)
        assert isinstance(round_["garbage"].error, ProtocolError)
        assert isinstance(round_["erring"].error, ServerError)
        dead_error = round_["dead"].error
        assert isinstance(dead_error, NodeError) and dead_error.sent is False
        # A connection whose reply is in doubt is gone; an error answer keeps it.
        assert [name for name, c in clients.items() if c.connected] == ["good", "erring"]
    finally:
        for client in clients.values():
            client.close()


# ---- the cluster's multi-node reads -------------------------------------------------------


def test_keys_spread_over_three_nodes_come_back_in_one_call(memcacheds: list[Node]) -> None:
    specs = [spec_of(n.port) for n in memcacheds]
    owned = spread(specs, 5)
    keys = [key for spec in specs for key in owned[spec]]
    with CacheCluster(specs, memcached_factory, failure=FAILURE) as cluster:
        for key in keys:
            assert cluster.set(key, key.upper(), confirm=True)
        before = {spec: node_state(cluster, spec)["latency"]["count"] for spec in specs}
        assert cluster.get_many([*keys, "item:absent"]) == {key: key.upper() for key in keys}
        for spec in specs:
            # One request each, five hits each (and the absent key's miss somewhere).
            assert node_state(cluster, spec)["latency"]["count"] == before[spec] + 1
            assert node_state(cluster, spec)["hits"] == 5
        assert sum(node_state(cluster, spec)["misses"] for spec in specs) == 1


def test_an_invalid_key_raises_before_any_node_is_asked(memcacheds: list[Node]) -> None:
    specs = [spec_of(n.port) for n in memcacheds]
    keys = [key for spec in specs for key in spread(specs, 3)[spec]]
    with CacheCluster(specs, memcached_factory, failure=FAILURE) as cluster:
        for key in keys:
            cluster.set(key, key)
        before = [node_state(cluster, spec)["latency"]["count"] for spec in specs]
        with pytest.raises(CacheKeyError):
            cluster.get_many([*keys, "has space"])
        with pytest.raises(CacheKeyError):
            cluster.set("x" * 251, 1, copies=replicated(3))
        assert [node_state(cluster, spec)["latency"]["count"] for spec in specs] == before
        assert cluster.get_many(keys) == {key: key for key in keys}


def test_a_killed_node_is_a_miss_for_its_keys_only_and_is_ejected(memcacheds: list[Node]) -> None:
    specs = [spec_of(n.port) for n in memcacheds]
    owned = spread(specs, 5)
    keys = [key for spec in specs for key in owned[spec]]
    victim = specs[1]
    others = {key: key for key in keys if key not in owned[victim]}
    with CacheCluster(specs, memcached_factory, failure=FAILURE) as cluster:
        for key in keys:
            assert cluster.set(key, key, confirm=True)
        memcacheds[1].kill()
        for attempt in range(1, FAILURE.failure_limit + 1):
            assert cluster.get_many(keys) == others
            assert node_state(cluster, victim)["errors"] == attempt
        assert node_state(cluster, victim)["state"] == "ejected"
        assert node_state(cluster, victim)["ejections"] == 1
        # Ejected: its keys go to the next node (absent there), with no error.
        assert cluster.get_many(keys) == others
        assert node_state(cluster, victim)["errors"] == FAILURE.failure_limit
        for spec in specs:
            if spec != victim:
                assert node_state(cluster, spec)["errors"] == 0
    with CacheCluster(specs, memcached_factory, failure=FAILURE,
                      read_errors_as_misses=False) as strict:  # fmt: skip
        with pytest.raises(NodeError) as info:
            strict.get_many(keys)
        assert info.value.node == victim.address


def test_a_silent_node_times_out_and_the_others_answer(
    memcacheds: list[Node], scripted: Any
) -> None:
    silent = scripted(lambda data: None)
    specs = [spec_of(memcacheds[0].port), spec_of(memcacheds[1].port), spec_of(silent.port)]
    owned = spread(specs, 5)
    keys = [key for spec in specs for key in owned[spec]]
    answering = [key for spec in specs[:2] for key in owned[spec]]
    with CacheCluster(specs, memcached_factory, failure=FAILURE) as cluster:
        for key in answering:
            assert cluster.set(key, key, confirm=True)
        assert cluster.get_many(keys) == {key: key for key in answering}
        assert node_state(cluster, specs[2])["errors"] == 1
        assert node_state(cluster, specs[2])["failures"] == 1
        # The request still unanswered went with its connection: a new one is made.
        assert cluster.get_many(keys) == {key: key for key in answering}
        assert silent.accepted == 2
        assert node_state(cluster, specs[2])["state"] == "ejected"
        assert [node_state(cluster, spec)["errors"] for spec in specs[:2]] == [0, 0]


@pytest.mark.parametrize(
    "first",
    [
        b"HELLO\r\n",  # garbage
        (b"VALUE item:0 0 5\r\nab", ScriptedServer.CLOSE),  # closed mid-reply
        b"VALUE stranger 0 1\r\nx\r\nEND\r\n",  # a key that was not asked for
        b"VALUE k 0 2\r\nab\r\n",  # half a reply, then silence until the timeout
        b"END\r\nEND\r\nEND\r\n",  # more than the reply
    ],
    ids=["garbage", "closed", "stranger", "half", "extra"],
)
def test_a_bad_reply_does_not_poison_the_next_call(
    memcacheds: list[Node], scripted: Any, first: object
) -> None:
    replies = 0

    def answer(data: bytes) -> object:
        nonlocal replies
        replies += 1
        return first if replies == 1 else serve_gets(data)

    odd = scripted(answer)
    specs = [spec_of(memcacheds[0].port), spec_of(memcacheds[1].port), spec_of(odd.port)]
    owned = spread(specs, 5)
    keys = [key for spec in specs for key in owned[spec]]
    healthy = {key: key for spec in specs[:2] for key in owned[spec]}
    with CacheCluster(specs, memcached_factory, failure=FAILURE) as cluster:
        for key in healthy:
            assert cluster.set(key, key, confirm=True)
        assert cluster.get_many(keys) == healthy
        assert node_state(cluster, specs[2])["errors"] == 1
        # The odd node now answers well, on a new connection: its values are its own.
        assert cluster.get_many(keys) == {**healthy, **{k: k.encode() for k in owned[specs[2]]}}
        assert odd.accepted == 2
        assert node_state(cluster, specs[2])["state"] == "up"
        assert node_state(cluster, specs[2])["failures"] == 0


def test_replicated_reads_and_writes_and_the_gutter_in_rounds(memcacheds: list[Node]) -> None:
    main = [spec_of(n.port) for n in memcacheds[:2]]
    gutter = [spec_of(memcacheds[2].port)]
    rules = [("profile:", replicated(2, read="first"))]
    with CacheCluster(main, memcached_factory, failure=FAILURE, rules=rules, gutter=gutter,
                      gutter_ttl=30) as cluster:  # fmt: skip
        profiles = [f"profile:{i}" for i in range(10)]
        for i, key in enumerate(profiles):
            assert cluster.set(key, i, confirm=True)  # both copies answered
        for spec in main:
            with Client(spec.host, spec.port) as direct:
                assert direct.get_many(profiles) == {k: i for i, k in enumerate(profiles)}
        owned = spread(main, 5)
        plain = [key for spec in main for key in owned[spec]]
        for key in plain:
            assert cluster.set(key, key)
        memcacheds[0].kill()
        for _ in range(FAILURE.failure_limit):
            cluster.get_many(plain)
        assert node_state(cluster, main[0])["state"] == "ejected"
        # The dead node's keys now live in the gutter; the others stay where they are.
        for key in owned[main[0]]:
            assert cluster.set(key, "in-gutter", ttl=3600)
        with Client(gutter[0].host, gutter[0].port) as direct:
            assert direct.get_many(owned[main[0]]) == dict.fromkeys(owned[main[0]], "in-gutter")
        found = cluster.get_many([*plain, *profiles])
        assert found == {**dict.fromkeys(owned[main[0]], "in-gutter"),
                         **{k: k for k in owned[main[1]]},
                         **{k: i for i, k in enumerate(profiles)}}  # fmt: skip
