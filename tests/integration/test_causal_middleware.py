"""The causal-token middleware end to end: a POST on one app server, the GET on another.

Two WSGI apps, each with a router of its own (two app servers), share one
primary and one replica whose replay is paused. The cookie the first sets
after its write makes the second read the write, from the primary, while a
request without it (or with a tampered one) reads the lagging replica.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from urllib.parse import parse_qs
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import pytest
from werkzeug.test import Client

from tests.integration.pgcluster import Cluster as PgCluster
from tests.integration.routerkit import (
    R1,
    P,
    eventually,
    in_pool,
    module_cluster,
    monitored,
    replay_paused,
    replayed,
)
from tiers.app.causal import COOKIE_NAME, CausalMiddleware
from tiers.db.router import Cluster

KEY = "a key shared by every app server."


def notes_app(router: Cluster) -> WSGIApplication:
    """``POST /notes`` (body=...) saves a note and redirects; ``GET /notes`` lists them."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            form = parse_qs(environ["wsgi.input"].read(length).decode())
            with router.write() as conn:
                conn.execute("INSERT INTO notes (body) VALUES (%s)", (form["body"][0],))
            start_response("303 See Other", [("Location", "/notes")])
            return [b""]
        with router.read() as conn:
            rows = conn.execute("SELECT body FROM notes ORDER BY id").fetchall()
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("X-Served-By", router.last_node or "")])
        return ["\n".join(str(row[0]) for row in rows).encode()]

    return app


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    yield from module_cluster("tiers-router-middleware-")


@pytest.fixture
def servers(pg: PgCluster) -> Iterator[tuple[Cluster, Cluster]]:
    first, second = monitored(pg, causal_wait=0.02), monitored(pg, causal_wait=0.02)
    with first.write() as conn:
        conn.execute("DROP TABLE IF EXISTS notes")
        conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text)")
    token = first.last_write_token
    assert token is not None
    eventually(lambda: replayed(pg.dsn(1), token), "the replica to have the table")
    for router in (first, second):
        eventually(in_pool(router, R1), "the replica to join the read pool")
    yield first, second
    first.stop()
    second.stop()


def test_the_get_on_another_app_server_sees_the_post(
        servers: tuple[Cluster, Cluster], pg: PgCluster) -> None:
    first, second = servers
    app1 = Client(CausalMiddleware(notes_app(first), secret_key=KEY))
    app2 = Client(CausalMiddleware(notes_app(second), secret_key=KEY))
    cookie_value = ""
    with replay_paused(pg.dsn(1)):
        for attempt in range(10):
            posted = app1.post("/notes", data={"body": f"note {attempt}"})
            assert posted.status_code == 303
            cookie = app1.get_cookie(COOKIE_NAME)
            assert cookie is not None
            cookie_value = cookie.value
            # The redirect's GET reaches the other app server, cookie and all.
            app2.set_cookie(COOKIE_NAME, cookie.value)
            page = app2.get("/notes")
            assert page.status_code == 200
            assert f"note {attempt}" in page.text.splitlines()
            assert page.headers["X-Served-By"] == P

        stranger = Client(CausalMiddleware(notes_app(second), secret_key=KEY))
        page = stranger.get("/notes")
        assert (page.text, page.headers["X-Served-By"]) == ("", R1)  # stale, as it may be

        forger = Client(CausalMiddleware(notes_app(second), secret_key=KEY))
        forger.set_cookie(COOKIE_NAME, cookie_value.replace(".", "0.", 1))
        page = forger.get("/notes")
        assert page.status_code == 200
        assert (page.text, page.headers["X-Served-By"]) == ("", R1)  # not trusted

        other_key = Client(CausalMiddleware(notes_app(second),
                                            secret_key="another key, long enough........"))
        other_key.set_cookie(COOKIE_NAME, cookie_value)
        assert other_key.get("/notes").headers["X-Served-By"] == R1
