"""The demo's use of the cache tier, over in-memory cache nodes (tiers.cache.fake)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime

import pytest
from bookmarks.app import create_app
from bookmarks.caching import ENTRIES, HOT_KEY, covers, stars_key
from bookmarks.memory import MemoryStore
from bookmarks.store import Entry
from flask.testing import FlaskClient

from tiers.cache.cluster import CacheCluster
from tiers.cache.fake import FakeNodes
from tiers.cache.ring import NodeSpec
from tiers.cache.stampede import pack, unpack
from tiers.errors import ConfigError

KEY = "bookmarks test key, long enough.."
NODES = [NodeSpec("127.0.0.1", 1), NodeSpec("127.0.0.1", 2)]


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def nodes() -> FakeNodes:
    return FakeNodes()


@pytest.fixture
def cluster(nodes: FakeNodes) -> Iterator[CacheCluster]:
    with CacheCluster(NODES, nodes) as cluster:
        yield cluster


def client_for(store: MemoryStore, cluster: CacheCluster | None) -> FlaskClient:
    app = create_app(store, secret_key=KEY, cache=cluster)
    app.testing = True
    return app.test_client()


@pytest.fixture
def client(store: MemoryStore, cluster: CacheCluster) -> FlaskClient:
    return client_for(store, cluster)


def held(nodes: FakeNodes, key: str) -> object:
    """The value of ``key`` on whichever node holds it, or None."""
    for address in nodes.holders(key):
        return nodes.server(address).items()[key]
    return None


def bookmark(client: FlaskClient, url: str = "https://example.com/a", user: str = "alice",
             title: str = "Example A") -> str:
    response = client.post("/bookmarks", data={"url": url, "title": title, "user": user,
                                               "comment": ""})
    assert response.status_code == 303
    return response.headers["Location"]


def star(client: FlaskClient, user: str, entry_id: int) -> str:
    response = client.post("/stars", data={"user": user, "entry_id": str(entry_id)})
    assert response.status_code == 303
    return response.headers["Location"]


class CountingStore(MemoryStore):
    """Counts the stars pages read from the database."""

    def __init__(self) -> None:
        super().__init__()
        self.stars_reads = 0

    def stars_page(self, user: str):  # type: ignore[no-untyped-def]
        self.stars_reads += 1
        return super().stars_page(user)


# -- the per-user fragment ------------------------------------------------------------------


def test_a_users_stars_are_cached_after_a_visit(nodes: FakeNodes,
                                                cluster: CacheCluster) -> None:
    store = CountingStore()
    client = client_for(store, cluster)
    bookmark(client)
    store.catch_up()
    first = client.get("/users/bob/stars").get_data(as_text=True)
    assert "No stars yet." in first and store.stars_reads == 1
    cached = held(nodes, stars_key("bob"))
    assert isinstance(cached, dict) and "No stars yet." in cached["html"]
    again = client_for(store, cluster).get("/users/bob/stars").get_data(as_text=True)
    assert again == first
    assert store.stars_reads == 1  # served from the cache


def test_a_star_deletes_the_fragment_and_the_writer_sees_it_at_once(
        store: MemoryStore, nodes: FakeNodes, client: FlaskClient) -> None:
    bookmark(client)
    client.get("/users/alice/stars")
    assert held(nodes, stars_key("alice")) is not None
    location = star(client, "alice", 1)
    assert held(nodes, stars_key("alice")) is None  # deleted before the redirect
    assert any(op == "delete" and keys == (stars_key("alice"),)
               for server in nodes.servers.values() for op, keys in server.calls)
    page = client.get(location).get_data(as_text=True)
    assert "Example A" in page and "No stars yet." not in page
    assert store.read_tokens[-1] == "0/2"  # read with the star's token, not from the cache


def test_a_stale_refill_after_the_delete_never_reaches_the_writer(
        store: MemoryStore, nodes: FakeNodes, cluster: CacheCluster) -> None:
    writer = client_for(store, cluster)
    bookmark(writer)
    location = star(writer, "alice", 1)
    # Another visitor, without the writer's token, reads alice's stars from the
    # lagging replica right after the delete and stores the old list.
    other = client_for(store, cluster)
    stale = other.get("/users/alice/stars").get_data(as_text=True)
    assert "No stars yet." in stale
    assert "No stars yet." in held(nodes, stars_key("alice"))["html"]  # type: ignore[index]
    # The writer still sees the star: the stored list was read without its token.
    page = writer.get(location).get_data(as_text=True)
    assert "Example A" in page and "No stars yet." not in page
    # ...and its own read replaced the stale list for everybody.
    assert "No stars yet." not in other.get(location).get_data(as_text=True)
    assert held(nodes, stars_key("alice"))["tokens"] == {"main": "0/2"}  # type: ignore[index]


def test_copying_stars_deletes_the_targets_fragment(nodes: FakeNodes,
                                                    client: FlaskClient) -> None:
    bookmark(client)
    star(client, "alice", 1)
    client.get("/users/bob/stars")
    assert held(nodes, stars_key("bob")) is not None
    response = client.post("/users/alice/stars/copy", data={"to": "bob"})
    assert response.status_code == 303
    assert held(nodes, stars_key("bob")) is None
    assert "Example A" in client.get(response.headers["Location"]).get_data(as_text=True)


def test_the_json_stars_page_is_not_cached(nodes: FakeNodes, client: FlaskClient) -> None:
    response = client.get("/users/alice/stars", headers={"Accept": "application/json"})
    assert response.get_json()["stars"] == []
    assert held(nodes, stars_key("alice")) is None


@pytest.mark.parametrize(("tag", "needed", "expected"), [
    ({}, {}, True),
    ({"main": "0/5"}, {}, True),
    ({"main": "0/5"}, {"main": "0/5"}, True),
    ({"main": "1/0"}, {"main": "0/FFFFFFFF"}, True),
    ({"main": "0/4"}, {"main": "0/5"}, False),
    ({}, {"main": "0/1"}, False),
    ({"main": "0/9"}, {"main": "0/1", "social": "0/1"}, False),
    ({"main": "junk"}, {"main": "0/1"}, False),
    ({"main": 5}, {"main": "0/1"}, False),
])
def test_a_fragment_serves_a_reader_only_if_its_tag_covers_the_readers_tokens(
        tag: dict[str, str], needed: dict[str, str], expected: bool) -> None:
    assert covers(tag, needed) is expected


# -- the hot computation ----------------------------------------------------------------------


def test_the_hot_ranking_is_computed_once_and_stored(store: MemoryStore, nodes: FakeNodes,
                                                     client: FlaskClient) -> None:
    bookmark(client, "https://example.com/one", title="One")
    bookmark(client, "https://example.com/two", title="Two")
    bookmark(client, "https://example.com/two", user="bob", title="Two")
    store.catch_up()
    pages = [client.get("/").get_data(as_text=True) for _ in range(3)]
    assert store.hot_computations == 1
    assert pages[0] == pages[1] == pages[2]
    hot = pages[0].split("Recent entries")[0]
    assert hot.index("Two") < hot.index("One") and "2 users" in hot
    envelope = unpack(held(nodes, HOT_KEY))
    assert envelope is not None
    assert [e.title for e in ENTRIES.loads(envelope.value)] == ["Two", "One"]


class GatedStore(MemoryStore):
    """A store whose hot ranking waits for ``gate``, counting the computations."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def hot_entries(self) -> Sequence[Entry]:
        entries = super().hot_entries()
        assert self.gate.wait(30)
        return entries


def burst(store: GatedStore, cluster: CacheCluster, count: int) -> list[int]:
    """``count`` front-page requests at once; the status of each."""
    statuses: list[int] = []
    lock = threading.Lock()

    def visit() -> None:
        status = client_for(store, cluster).get("/").status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=visit) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return statuses


def lease_attempts(nodes: FakeNodes) -> int:
    return sum(1 for server in nodes.servers.values() for op, keys in server.calls
               if op == "add" and keys == (HOT_KEY + ":lease",))


def test_concurrent_requests_on_a_cold_cache_compute_the_ranking_once(
        nodes: FakeNodes, cluster: CacheCluster) -> None:
    store, count = GatedStore(), 8
    # The one computation finishes only once every request has asked for the
    # lease, so all of them miss at the same time.
    waiter = threading.Thread(target=lambda: (_until(lambda: lease_attempts(nodes) >= count),
                                              store.gate.set()))
    waiter.start()
    statuses = burst(store, cluster, count)
    waiter.join(60)
    assert statuses == [200] * count
    assert store.hot_computations == 1


def test_a_burst_after_expiry_recomputes_once_and_serves_the_old_ranking_meanwhile(
        nodes: FakeNodes, cluster: CacheCluster) -> None:
    store = GatedStore()
    old = [Entry(9, "https://example.com/old", "Old", datetime(2026, 1, 1, tzinfo=UTC), 1)]
    # An expired ranking, still held by the node (as for stale_ttl after expiry).
    cluster.set(HOT_KEY, pack(ENTRIES.dumps(old), 0.01, time.time() - 1), 60)
    store.gate.set()
    count = 8
    statuses = burst(store, cluster, count)
    assert statuses == [200] * count
    assert store.hot_computations == 1
    envelope = unpack(held(nodes, HOT_KEY))
    assert envelope is not None and envelope.expiry > time.time()


def _until(condition: Callable[[], bool], limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)


# -- without a cache, or with a broken one ----------------------------------------------------


def test_without_a_cache_nothing_changes(store: MemoryStore) -> None:
    client = client_for(store, None)
    bookmark(client)
    assert client.get("/").status_code == 200
    assert store.hot_computations == 0  # the front page is one read, as before


def test_dead_cache_nodes_cost_no_page(store: MemoryStore, nodes: FakeNodes,
                                       client: FlaskClient) -> None:
    for node in NODES:
        nodes.kill(node)
    location = bookmark(client)
    assert client.get(location).status_code == 200
    assert client.get("/").status_code == 200
    star(client, "alice", 1)
    assert "Example A" in client.get("/users/alice/stars").get_data(as_text=True)


def test_the_default_app_refuses_a_malformed_cache_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERS_CACHE_NODES", "127.0.0.1:11311,nowhere:port")
    with pytest.raises(ConfigError, match="TIERS_CACHE_NODES"):
        create_app(MemoryStore(), secret_key=KEY)
