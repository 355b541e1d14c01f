"""The embedded server's store: LRU under a memory limit, expiry, cas, statistics.

Driven through ``Conversation`` (the same path network requests take) with an
injected clock, so expiry is tested without sleeping.
"""

from __future__ import annotations

import re

import pytest

from tiers.cache.server import THIRTY_DAYS, Store
from tiers.cache.serverproto import Conversation, item_size

NOW = 1_700_000_000.0


class Node:
    """A Store, a Conversation on it, and a clock the test moves."""

    def __init__(self, memory_limit: int = 64 << 20, max_item_size: int = 1 << 20) -> None:
        self.now = NOW
        self.store = Store(memory_limit, max_item_size=max_item_size, clock=lambda: self.now)
        self.conversation = Conversation(self.store)

    def send(self, data: bytes) -> bytes:
        answer, _ = self.conversation.receive(data)
        return answer

    def set(
        self, key: str, value: bytes, exptime: int = 0, flags: int = 0, cmd: str = "set"
    ) -> bytes:
        return self.send(
            b"%s %s %d %d %d\r\n%s\r\n"
            % (cmd.encode(), key.encode(), flags, exptime, len(value), value)
        )

    def get(self, key: str) -> bytes | None:
        answer = self.send(b"get %s\r\n" % key.encode())
        if answer == b"END\r\n":
            return None
        match = re.match(rb"VALUE \S+ \d+ (\d+)\r\n", answer)
        assert match, answer
        start = match.end()
        return answer[start : start + int(match.group(1))]

    def gets(self, key: str) -> int:
        answer = self.send(b"gets %s\r\n" % key.encode())
        match = re.match(rb"VALUE \S+ \d+ \d+ (\d+)\r\n", answer)
        assert match, answer
        return int(match.group(1))

    def stats(self) -> dict[str, str]:
        answer = self.send(b"stats\r\n").decode()
        assert answer.endswith("END\r\n")
        return dict(line.split(" ", 2)[1:] for line in answer.splitlines()[:-1])


# --- LRU and memory ---------------------------------------------------------


def test_lru_evicts_least_recently_used_under_the_limit() -> None:
    size = item_size(2, 0, 100)
    node = Node(memory_limit=size * 3)
    for key in ("k1", "k2", "k3"):
        assert node.set(key, b"x" * 100) == b"STORED\r\n"
    assert node.get("k1") is not None  # k1 is now most recently used; k2 is the oldest
    assert node.set("k4", b"x" * 100) == b"STORED\r\n"
    assert node.get("k2") is None
    assert [k for k in ("k1", "k3", "k4") if node.get(k) is not None] == ["k1", "k3", "k4"]
    stats = node.stats()
    assert stats["evictions"] == "1"
    assert stats["curr_items"] == "3"
    assert stats["bytes"] == str(size * 3)
    assert int(stats["bytes"]) <= int(stats["limit_maxbytes"])


def test_a_big_item_evicts_as_many_as_it_needs() -> None:
    small = item_size(2, 0, 10)
    node = Node(memory_limit=small * 10)
    for i in range(10):
        node.set(f"s{i}", b"y" * 10)
    big_value = b"z" * (small * 4 - 56 - 4 - 2)
    assert item_size(3, 0, len(big_value)) <= small * 4
    assert node.set("big", big_value) == b"STORED\r\n"
    assert node.stats()["evictions"] == "4"
    assert node.get("s3") is None and node.get("s4") is not None
    assert int(node.stats()["bytes"]) <= small * 10


def test_writes_also_count_as_use() -> None:
    size = item_size(1, 0, 1)
    node = Node(memory_limit=size * 2)
    node.set("a", b"1")
    node.set("b", b"1")
    node.set("a", b"2")  # rewriting a makes b the oldest
    node.set("c", b"1")
    assert node.get("a") == b"2" and node.get("b") is None


def test_expired_items_pushed_out_count_as_reclaimed() -> None:
    size = item_size(1, 0, 1)
    node = Node(memory_limit=size * 2)
    node.set("a", b"1", exptime=5)
    node.set("b", b"1")
    node.now += 10
    node.set("c", b"1")
    stats = node.stats()
    assert (stats["evictions"], stats["reclaimed"]) == ("0", "1")


def test_item_larger_than_memory_is_refused() -> None:
    node = Node(memory_limit=1000, max_item_size=1 << 20)
    node.set("a", b"old")
    assert node.set("a", b"x" * 2000) == b"SERVER_ERROR out of memory storing object\r\n"
    assert node.get("a") is None  # a failed set does not leave the old value behind
    node.set("b", b"old")
    assert node.set("b", b"x" * 2000, cmd="replace") == (
        b"SERVER_ERROR out of memory storing object\r\n"
    )
    assert node.get("b") == b"old"
    assert node.stats()["store_no_memory"] == "2"


def test_too_large_item() -> None:
    node = Node(max_item_size=1000)
    node.set("a", b"old")
    assert node.set("a", b"x" * 1000) == b"SERVER_ERROR object too large for cache\r\n"
    assert node.get("a") is None
    node.set("b", b"x" * 900)
    # growing past the limit by append is refused the way memcached refuses it
    assert node.send(b"append b 0 0 100\r\n" + b"y" * 100 + b"\r\n") == b"NOT_STORED\r\n"
    assert node.get("b") == b"x" * 900
    assert node.stats()["store_too_large"] == "1"


# --- expiry -----------------------------------------------------------------


def test_relative_expiry() -> None:
    node = Node()
    node.set("a", b"v", exptime=10)
    node.now += 9.5
    assert node.get("a") == b"v"
    node.now += 0.5
    assert node.get("a") is None
    assert node.stats()["curr_items"] == "0"


def test_absolute_expiry_beyond_thirty_days() -> None:
    node = Node()
    node.set("future", b"v", exptime=int(NOW) + 100)
    node.set("past", b"v", exptime=int(NOW) - 100)
    node.set("thirty_days", b"v", exptime=THIRTY_DAYS)  # still relative
    assert node.get("past") is None
    assert node.get("future") == b"v"
    node.now += 100
    assert node.get("future") is None
    assert node.get("thirty_days") == b"v"
    node.now = NOW + THIRTY_DAYS
    assert node.get("thirty_days") is None


def test_negative_expiry_expires_at_once_and_zero_never() -> None:
    node = Node()
    assert node.set("neg", b"v", exptime=-1) == b"STORED\r\n"
    assert node.get("neg") is None
    node.set("zero", b"v", exptime=0)
    node.now += 10 * THIRTY_DAYS
    assert node.get("zero") == b"v"


def test_touch_and_gat_set_a_new_expiry() -> None:
    node = Node()
    node.set("a", b"v", exptime=10)
    node.set("b", b"v", exptime=10)
    assert node.send(b"touch a 100\r\n") == b"TOUCHED\r\n"
    assert node.send(b"gat 100 b\r\n") == b"VALUE b 0 1\r\nv\r\nEND\r\n"
    node.now += 50
    assert node.get("a") == b"v" and node.get("b") == b"v"
    assert node.send(b"touch a -1\r\n") == b"TOUCHED\r\n"
    assert node.get("a") is None
    assert node.send(b"touch a 10\r\n") == b"NOT_FOUND\r\n"


def test_expired_items_are_misses_for_every_command() -> None:
    node = Node()
    for key in ("a", "b", "c", "d", "e"):
        node.set(key, b"1", exptime=1)
    node.now += 2
    assert node.send(b"delete a\r\n") == b"NOT_FOUND\r\n"
    assert node.send(b"incr b 1\r\n") == b"NOT_FOUND\r\n"
    assert node.send(b"touch c 10\r\n") == b"NOT_FOUND\r\n"
    assert node.set("d", b"2", cmd="replace") == b"NOT_STORED\r\n"
    assert node.set("e", b"2", cmd="add") == b"STORED\r\n"


def test_flush_all_with_delay() -> None:
    node = Node()
    node.set("old", b"v")
    assert node.send(b"flush_all 10\r\n") == b"OK\r\n"
    node.now += 5
    node.set("newer", b"v")
    assert node.get("old") == b"v"
    node.now += 5
    assert node.get("old") is None and node.get("newer") is None
    node.set("after", b"v")
    node.now += 100
    assert node.get("after") == b"v"
    assert node.stats()["cmd_flush"] == "1"


def test_append_and_prepend_keep_flags_and_expiry() -> None:
    node = Node()
    node.set("a", b"mid", exptime=10, flags=7)
    node.send(b"append a 99 1000 1\r\n>\r\n")
    node.send(b"prepend a 99 1000 1\r\n<\r\n")
    assert node.send(b"get a\r\n") == b"VALUE a 7 5\r\n<mid>\r\nEND\r\n"
    node.now += 10
    assert node.get("a") is None


# --- cas --------------------------------------------------------------------


def test_cas_semantics() -> None:
    node = Node()
    node.set("k", b"v1")
    unique = node.gets("k")
    assert node.send(b"cas k 0 0 2 %d\r\nv2\r\n" % unique) == b"STORED\r\n"
    assert node.send(b"cas k 0 0 2 %d\r\nv3\r\n" % unique) == b"EXISTS\r\n"
    assert node.get("k") == b"v2"
    assert node.send(b"cas gone 0 0 1 1\r\nx\r\n") == b"NOT_FOUND\r\n"
    stats = node.stats()
    assert (stats["cas_hits"], stats["cas_badval"], stats["cas_misses"]) == ("1", "1", "1")


def test_every_modification_changes_the_cas_unique() -> None:
    node = Node()
    node.set("n", b"10")
    seen = [node.gets("n")]
    for command in (
        b"incr n 1\r\n",
        b"decr n 1\r\n",
        b"append n 0 0 1\r\n0\r\n",
        b"prepend n 0 0 1\r\n1\r\n",
        b"replace n 0 0 1\r\n5\r\n",
        b"set n 0 0 1\r\n6\r\n",
    ):
        node.send(command)
        seen.append(node.gets("n"))
    assert len(set(seen)) == len(seen)
    assert seen == sorted(seen)
    before = node.gets("n")
    node.send(b"touch n 100\r\n")
    assert node.gets("n") == before


def test_growing_incr_replaces_the_item() -> None:
    node = Node()
    node.set("n", b"99", flags=3, exptime=10)
    assert node.send(b"incr n 1\r\n") == b"100\r\n"
    assert node.send(b"get n\r\n") == b"VALUE n 3 3\r\n100\r\nEND\r\n"
    assert node.stats()["bytes"] == str(item_size(1, 3, 3))
    node.now += 10
    assert node.get("n") is None


# --- statistics -------------------------------------------------------------


def test_stats_counters() -> None:
    node = Node()
    node.set("a", b"1")
    node.set("b", b"22")
    node.set("a", b"1", cmd="add")  # NOT_STORED still counts as a set
    node.send(b"get a b missing\r\n")
    node.send(b"gets a\r\n")
    node.send(b"gat 10 a nope\r\n")
    node.send(b"touch b 10\r\ntouch nope 10\r\n")
    node.send(b"incr a 1\r\nincr nope 1\r\ndecr a 1\r\ndecr nope 1\r\n")
    node.send(b"delete b\r\ndelete b\r\n")
    node.send(b"set x 0 0 1\r\nxx\r\n")  # bad data chunk: counted as a set, not stored
    stats = node.stats()
    expected = {
        "cmd_get": "4", "get_hits": "3", "get_misses": "1",
        "cmd_set": "4", "total_items": "2",
        "cmd_touch": "4", "touch_hits": "2", "touch_misses": "2",
        "incr_hits": "1", "incr_misses": "1", "decr_hits": "1", "decr_misses": "1",
        "delete_hits": "1", "delete_misses": "1",
        "curr_items": "1", "bytes": str(item_size(1, 0, 1)),
        "limit_maxbytes": str(64 << 20), "evictions": "0",
    }  # fmt: skip
    assert {name: stats[name] for name in expected} == expected
    assert stats["time"] == str(int(NOW))
    assert node.send(b"stats reset\r\n") == b"RESET\r\n"
    after = node.stats()
    assert after["cmd_get"] == "0" and after["curr_items"] == "1"


def test_stats_settings_and_empty_groups() -> None:
    node = Node(memory_limit=1 << 20)
    settings = node.send(b"stats settings\r\n")
    assert b"STAT maxbytes 1048576\r\n" in settings and settings.endswith(b"END\r\n")
    assert node.send(b"stats items\r\n") == b"END\r\n"


@pytest.mark.parametrize("delay", [b"", b" 0", b" -5"])
def test_flush_all_now(delay: bytes) -> None:
    node = Node()
    node.set("a", b"v")
    assert node.send(b"flush_all%s\r\n" % delay) == b"OK\r\n"
    assert node.get("a") is None
    assert node.stats()["bytes"] == "0"


def test_incr_that_cannot_grow_in_memory() -> None:
    size = item_size(1, 0, 2)
    node = Node(memory_limit=size)
    node.set("n", b"99")
    assert node.send(b"incr n 1\r\n") == b"SERVER_ERROR out of memory\r\n"
    assert node.get("n") == b"99"
