from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator

import psycopg
import pytest
from bookmarks.app import TOKEN_COOKIE, create_app
from bookmarks.forms import NewBookmark
from bookmarks.memory import MemoryStore
from bookmarks.store import Copied, EntryPage, FrontPage, Saved, Starred, StarsPage
from flask.testing import FlaskClient

from tiers.app.causal import sign, verify
from tiers.db.ids import decode_id
from tiers.db.sharding import CrossShardError, ShardMap
from tiers.errors import DatabaseError

KEY = "bookmarks test key, long enough.."


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def client(store: MemoryStore) -> Iterator[FlaskClient]:
    app = create_app(store, secret_key=KEY)
    app.testing = True
    with app.test_client() as client:
        yield client


def post(client: FlaskClient, **fields: str) -> tuple[int, str]:
    data = {"url": "https://example.com/a", "title": "Example A", "user": "alice", "comment": "hi"}
    data.update(fields)
    response = client.post("/bookmarks", data=data)
    return response.status_code, response.headers.get("Location", "")


def test_home_page_lists_nothing_yet(client: FlaskClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    page = response.get_data(as_text=True)
    assert "Hot entries" in page and "Recent entries" in page
    assert 'action="/bookmarks"' in page


def test_post_redirects_to_the_entry_and_sets_the_token(
    client: FlaskClient, store: MemoryStore
) -> None:
    status, location = post(client)
    assert (status, location) == (303, "/entry/1")
    cookie = client.get_cookie(TOKEN_COOKIE)
    assert cookie is not None
    assert verify(cookie.value, KEY) == {"main": "0/1"}  # signed
    assert cookie.http_only
    assert cookie.same_site == "Lax"


def test_the_redirect_shows_the_new_bookmark_although_the_replica_lags(
    client: FlaskClient, store: MemoryStore
) -> None:
    _, location = post(client, comment="first look")
    page = client.get(location)
    assert page.status_code == 200
    text = page.get_data(as_text=True)
    assert "alice" in text and "first look" in text
    assert store.read_tokens[-1] == "0/1"
    # The home page too: every page reads with the reader's token.
    assert "Example A" in client.get("/").get_data(as_text=True)


def test_without_the_token_a_lagging_replica_is_read(store: MemoryStore) -> None:
    # The same store seen by another visitor, who has no token: the replica
    # has not replayed the write yet, so the entry is not there for them.
    writer = create_app(store, secret_key=KEY).test_client()
    _, location = post(writer)
    stranger = create_app(store, secret_key=KEY).test_client()
    assert stranger.get(location).status_code == 404
    store.catch_up()
    assert stranger.get(location).status_code == 200


def test_saving_again_replaces_the_comment(client: FlaskClient, store: MemoryStore) -> None:
    post(client, comment="old words")
    _, location = post(client, comment="new words")
    assert location == "/entry/1"
    text = client.get(location).get_data(as_text=True)
    assert "new words" in text and "old words" not in text
    assert "1 user" in text
    assert verify(client.get_cookie(TOKEN_COOKIE).value,  # type: ignore[union-attr]
                  KEY) == {"main": "0/2"}


def test_other_users_add_to_the_entry(client: FlaskClient, store: MemoryStore) -> None:
    post(client, user="alice")
    _, location = post(client, user="bob", comment="me too")
    text = client.get(location).get_data(as_text=True)
    assert "2 users" in text
    assert text.index("bob") < text.index("alice")  # newest first


def test_home_page_lists_recent_and_hot(client: FlaskClient, store: MemoryStore) -> None:
    post(client, url="https://example.com/one", title="One", user="alice")
    post(client, url="https://example.com/two", title="Two", user="alice")
    post(client, url="https://example.com/two", title="Two", user="bob")
    text = client.get("/").get_data(as_text=True)
    hot, recent = text.split("Recent entries")
    assert hot.index("Two") < hot.index("One")  # more users first
    assert recent.index("Two") < recent.index("One")  # newest first
    assert "2 users" in hot


def test_everything_is_escaped(client: FlaskClient) -> None:
    _, location = post(
        client,
        url="https://example.com/?q=<script>",
        title="<script>alert('t')</script>",
        comment='<img src=x onerror="alert(1)">',
    )
    for path in (location, "/"):
        text = client.get(path).get_data(as_text=True)
        assert "<script>" not in text
        assert "<img" not in text
        assert "&lt;script&gt;alert(&#39;t&#39;)&lt;/script&gt;" in text
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in client.get(location).get_data(
        as_text=True
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"url": "javascript:alert(1)"}, "Only http:// and https://"),
        ({"url": ""}, "Enter the URL"),
        ({"user": "x"}, "user name"),
        ({"user": "<b>bad</b>"}, "user name"),
        ({"comment": "c" * 101}, "comment is too long"),
        ({"title": "t" * 201}, "title is too long"),
    ],
)
def test_bad_input_is_400_with_a_message(
    client: FlaskClient, store: MemoryStore, fields: dict[str, str], message: str
) -> None:
    response = client.post(
        "/bookmarks", data={"url": "https://example.com/", "user": "alice"} | fields
    )
    assert response.status_code == 400
    assert message in response.get_data(as_text=True)
    assert store.position == 0
    assert client.get_cookie(TOKEN_COOKIE) is None


def test_oversized_form_is_refused(client: FlaskClient, store: MemoryStore) -> None:
    response = client.post(
        "/bookmarks", data={"url": "https://example.com/", "comment": "x" * 20000}
    )
    assert response.status_code == 413
    assert store.position == 0


def test_missing_entry_is_404(client: FlaskClient) -> None:
    assert client.get("/entry/42").status_code == 404
    assert client.get("/entry/notanumber").status_code == 404
    assert "No such entry" in client.get("/entry/42").get_data(as_text=True)


def test_get_on_the_form_target_is_405(client: FlaskClient) -> None:
    assert client.get("/bookmarks").status_code == 405


def test_malformed_or_unsigned_token_cookie_is_ignored(
        client: FlaskClient, store: MemoryStore) -> None:
    client.set_cookie(TOKEN_COOKIE, "'; DROP TABLE entries; --")
    assert client.get("/").status_code == 200
    client.set_cookie(TOKEN_COOKIE, "0/2A")  # well-formed but unsigned: not trusted
    assert client.get("/").status_code == 200
    client.set_cookie(TOKEN_COOKIE, sign("0/2A", "some other key, long enough....."))
    assert client.get("/").status_code == 200
    client.set_cookie(TOKEN_COOKIE, sign("0/2A", KEY))
    assert client.get("/").status_code == 200
    assert store.read_tokens == [None, None, None, "0/2A"]


def test_the_cookie_from_one_app_server_works_on_another(store: MemoryStore) -> None:
    # Two app servers over one database, as behind the proxy: the redirect
    # after the POST reaches the other one.
    first = create_app(store, secret_key=KEY).test_client()
    _, location = post(first, comment="seen anywhere")
    cookie = first.get_cookie(TOKEN_COOKIE)
    assert cookie is not None
    second = create_app(store, secret_key=KEY).test_client()
    second.set_cookie(TOKEN_COOKIE, cookie.value)
    assert "seen anywhere" in second.get(location).get_data(as_text=True)
    # A server with another key does not trust the cookie: the replica lags.
    other = create_app(store, secret_key="another key, long enough........").test_client()
    other.set_cookie(TOKEN_COOKIE, cookie.value)
    assert other.get(location).status_code == 404


class DownStore:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def front_page(self) -> FrontPage:
        raise self.error

    def entry_page(self, entry_id: int) -> EntryPage | None:
        raise self.error

    def save_bookmark(self, bookmark: NewBookmark) -> Saved:
        raise self.error

    def star(self, user: str, entry_id: int) -> Starred | None:
        raise self.error

    def stars_page(self, user: str) -> StarsPage:
        raise self.error

    def copy_stars(self, source: str, target: str) -> Copied:
        raise self.error


@pytest.mark.parametrize(
    "error", [DatabaseError("cannot connect to primary"), psycopg.OperationalError("gone")]
)
def test_database_outage_is_503(error: Exception) -> None:
    client = create_app(DownStore(error), secret_key=KEY).test_client()
    for response in (
        client.get("/"),
        client.get("/entry/1"),
        client.post("/bookmarks", data={"url": "https://example.com/", "user": "alice"}),
    ):
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert "database is unavailable" in response.get_data(as_text=True)


def test_entry_links_point_at_entry_pages(client: FlaskClient) -> None:
    post(client)
    text = client.get("/").get_data(as_text=True)
    assert re.search(r'href="/entry/1"', text)
    assert 'href="https://example.com/a"' in text


# -- stars: sharded by user name ----------------------------------------------------------

SPLIT = ShardMap.from_ranges({"main": ["0-511"], "social": ["512-1023"]})


def users_on(cluster: str, count: int = 2) -> list[str]:
    names = (f"user{n}" for n in range(200))
    return [name for name in names if SPLIT.cluster_for(name) == cluster][:count]


@pytest.fixture
def sharded() -> MemoryStore:
    return MemoryStore(shards=SPLIT)


@pytest.fixture
def sharded_client(sharded: MemoryStore) -> Iterator[FlaskClient]:
    app = create_app(sharded, secret_key=KEY)
    app.testing = True
    with app.test_client() as client:
        yield client


def star(client: FlaskClient, user: str, entry_id: str = "1") -> tuple[int, str]:
    response = client.post("/stars", data={"user": user, "entry_id": entry_id})
    return response.status_code, response.headers.get("Location", "")


def test_a_star_lands_on_the_users_cluster_and_shows_on_their_page(
        sharded_client: FlaskClient, sharded: MemoryStore) -> None:
    post(sharded_client)
    (main_user,), (social_user,) = users_on("main", 1), users_on("social", 1)
    for user in (main_user, social_user):
        assert star(sharded_client, user) == (303, f"/users/{user}/stars")
    assert [u for u, _ in sharded.stars_by_cluster["main"]] == [main_user]
    assert [u for u, _ in sharded.stars_by_cluster["social"]] == [social_user]
    page = sharded_client.get(f"/users/{social_user}/stars")
    assert page.status_code == 200
    text = page.get_data(as_text=True)
    assert "Example A" in text and f"virtual shard {SPLIT.shard_for(social_user)}" in text


def test_the_stars_page_in_json_has_ids_that_carry_the_users_shard(
        sharded_client: FlaskClient, sharded: MemoryStore) -> None:
    post(sharded_client, url="https://example.com/one")
    post(sharded_client, url="https://example.com/two")
    star(sharded_client, "alice", "1")
    star(sharded_client, "alice", "2")
    star(sharded_client, "alice", "2")  # again: still one star
    response = sharded_client.get("/users/alice/stars",
                                  headers={"Accept": "application/json"})
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["user"] == "alice" and body["shard"] == SPLIT.shard_for("alice")
    assert [s["entry_id"] for s in body["stars"]] == [2, 1]  # newest first
    assert {decode_id(s["id"]).shard for s in body["stars"]} == {SPLIT.shard_for("alice")}
    assert body["stars"][0]["url"] == "https://example.com/two"


def test_a_browser_gets_the_stars_page_as_html(sharded_client: FlaskClient) -> None:
    accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    response = sharded_client.get("/users/alice/stars", headers={"Accept": accept})
    assert response.mimetype == "text/html"
    assert "No stars yet." in response.get_data(as_text=True)


def test_the_entry_page_has_a_star_form(sharded_client: FlaskClient) -> None:
    post(sharded_client)
    text = sharded_client.get("/entry/1").get_data(as_text=True)
    assert 'action="/stars"' in text and 'name="entry_id" value="1"' in text


@pytest.mark.parametrize(("fields", "status", "message"), [
    ({"user": "alice", "entry_id": "99"}, 404, "No such entry"),
    ({"user": "x", "entry_id": "1"}, 400, "user name"),
    ({"user": "alice", "entry_id": "one"}, 400, "Choose an entry"),
    ({"user": "alice", "entry_id": "0"}, 400, "Choose an entry"),
    ({"user": "alice"}, 400, "Choose an entry"),
])
def test_a_bad_star_is_refused(sharded_client: FlaskClient, sharded: MemoryStore,
                               fields: dict[str, str], status: int, message: str) -> None:
    post(sharded_client)
    response = sharded_client.post("/stars", data=fields)
    assert response.status_code == status
    assert message in response.get_data(as_text=True)
    assert all(not table for table in sharded.stars_by_cluster.values())


def test_no_page_for_a_name_that_is_no_user(sharded_client: FlaskClient) -> None:
    assert sharded_client.get("/users/x/stars").status_code == 404
    assert sharded_client.post("/users/x/stars/copy", data={"to": "alice"}).status_code == 404


def test_copying_stars_within_one_cluster(sharded_client: FlaskClient,
                                         sharded: MemoryStore) -> None:
    post(sharded_client)
    source, target = users_on("social")
    star(sharded_client, source)
    response = sharded_client.post(f"/users/{source}/stars/copy", data={"to": target})
    assert (response.status_code, response.headers["Location"]) == (
        303, f"/users/{target}/stars")
    body = sharded_client.get(f"/users/{target}/stars",
                              headers={"Accept": "application/json"}).get_json()
    assert [s["entry_id"] for s in body["stars"]] == [1]
    assert decode_id(body["stars"][0]["id"]).shard == SPLIT.shard_for(target)


def test_copying_stars_across_clusters_is_409_and_changes_nothing(
        sharded_client: FlaskClient, sharded: MemoryStore) -> None:
    post(sharded_client)
    (source,), (target,) = users_on("main", 1), users_on("social", 1)
    star(sharded_client, source)
    before = {name: dict(table) for name, table in sharded.stars_by_cluster.items()}
    position = sharded.position
    response = sharded_client.post(f"/users/{source}/stars/copy", data={"to": target})
    assert response.status_code == 409
    text = html.unescape(response.get_data(as_text=True))
    assert "span 2 clusters (main, social)" in text
    assert f"{source!r} (shard {SPLIT.shard_for(source)}) -> main" in text
    assert f"{target!r} (shard {SPLIT.shard_for(target)}) -> social" in text
    as_json = sharded_client.post(f"/users/{source}/stars/copy", data={"to": target},
                                  headers={"Accept": "application/json"})
    assert as_json.status_code == 409
    assert as_json.get_json()["clusters"] == ["main", "social"]
    assert sharded.stars_by_cluster == before and sharded.position == position


@pytest.mark.parametrize(("to", "message"), [("alice", "another user"), ("", "copy to")])
def test_copying_stars_needs_another_user(sharded_client: FlaskClient, to: str,
                                          message: str) -> None:
    response = sharded_client.post("/users/alice/stars/copy", data={"to": to})
    assert response.status_code == 400
    assert message in response.get_data(as_text=True)


def test_stars_in_a_database_outage_are_503() -> None:
    client = create_app(DownStore(DatabaseError("gone")), secret_key=KEY).test_client()
    for response in (client.get("/users/alice/stars"),
                     client.post("/stars", data={"user": "alice", "entry_id": "1"}),
                     client.post("/users/alice/stars/copy", data={"to": "bob"})):
        assert response.status_code == 503


# -- the default app reads where the data lives from the environment ----------------------

DSN = "postgresql://127.0.0.1:{}/tiers"


def placement_env(tables: list[str]) -> dict[str, str]:
    return {
        "TIERS_DB_PRIMARY": DSN.format(5501),
        "TIERS_DB_CLUSTERS": json.dumps({"social": {"primary": DSN.format(5511)}}),
        "TIERS_DB_TABLES": json.dumps({"default": "main", "groups": {
            "bookmarks": {"cluster": "social", "tables": tables}}}),
        "TIERS_DB_SHARDS": json.dumps({"tables": ["stars"], "virtual_shards": 1024,
                                       "clusters": {"main": ["0-511"],
                                                    "social": ["512-1023"]}}),
    }


def test_the_default_app_accepts_a_map_that_keeps_the_page_tables_together(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in placement_env(["entries", "bookmarks"]).items():
        monkeypatch.setenv(key, value)
    assert create_app(secret_key=KEY).name == "bookmarks.app"  # connects to nothing


def test_the_default_app_refuses_a_map_that_splits_the_page_tables(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in placement_env(["bookmarks"]).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(CrossShardError, match=r"'entries' -> main, 'bookmarks' -> social"):
        create_app(secret_key=KEY)


@pytest.mark.parametrize(("url", "title"), [
    ("https://Example.com/hot-news_today.html", "Hot news today - example.com"),
    ("https://example.com/", "example.com"),
    ("https://example.com/a%20b/", "A b - example.com"),
])
def test_the_stand_in_page_for_a_url_has_a_title_made_from_it(client: FlaskClient, url: str,
                                                              title: str) -> None:
    response = client.get("/preview", query_string={"url": url})
    assert response.status_code == 200
    assert f"<title>{title}</title>" in response.get_data(as_text=True)


def test_the_stand_in_page_refuses_what_is_not_an_http_url(client: FlaskClient) -> None:
    assert client.get("/preview", query_string={"url": "ftp://example.com/"}).status_code == 400
    assert client.get("/preview").status_code == 400
