from __future__ import annotations

import re
from collections.abc import Iterator

import psycopg
import pytest
from bookmarks.app import TOKEN_COOKIE, create_app
from bookmarks.forms import NewBookmark
from bookmarks.memory import MemoryStore
from bookmarks.store import EntryPage, FrontPage, Saved
from flask.testing import FlaskClient

from tiers.app.causal import sign, verify
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
    assert verify(cookie.value, KEY) == "0/1"  # signed
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
    assert verify(client.get_cookie(TOKEN_COOKIE).value, KEY) == "0/2"  # type: ignore[union-attr]


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
