"""Read-your-writes across two real replicated clusters: one causal token per cluster.

Two independent clusters, "main" and "social", each a primary and a streaming
replica whose replay the tests pause. A request that writes on main and then
on social must read both writes back (each from its own primary, since
neither replica has replayed anything), and a read on social that carries
only main's token must go to social's replica at once: a position of one
cluster is never compared with the positions of another.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import partial
from urllib.parse import parse_qs
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import psycopg
import pytest
from werkzeug.test import Client

from tests.integration.pgcluster import Cluster as PgCluster
from tests.integration.routerkit import (
    DEADLINE,
    R1,
    P,
    eventually,
    in_pool,
    module_cluster,
    monitored,
    replay_paused,
    replayed,
)
from tiers.app.causal import COOKIE_NAME, CausalMiddleware, verify
from tiers.db.postgres import parse_lsn
from tiers.db.router import Cluster, Intent
from tiers.db.tokens import causal_scope

NAMES = ("main", "social")
KEY = "a key shared by every app server."
TABLE = "cluster_notes"


@pytest.fixture(scope="module")
def pg_main() -> Iterator[PgCluster]:
    yield from module_cluster("tiers-causal-main-")


@pytest.fixture(scope="module")
def pg_social() -> Iterator[PgCluster]:
    yield from module_cluster("tiers-causal-social-")


@pytest.fixture
def pgs(pg_main: PgCluster, pg_social: PgCluster) -> dict[str, PgCluster]:
    return {"main": pg_main, "social": pg_social}


def routers_over(pgs: dict[str, PgCluster]) -> dict[str, Cluster]:
    """One app server's routers: a Cluster per cluster, named as it is."""
    return {name: monitored(pg, causal_wait=0.02, name=name) for name, pg in pgs.items()}


@pytest.fixture
def routers(pgs: dict[str, PgCluster]) -> Iterator[dict[str, Cluster]]:
    made = routers_over(pgs)
    for name, router in made.items():
        with router.write() as conn:
            conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
            conn.execute(f"CREATE TABLE {TABLE} (id serial PRIMARY KEY, body text)")
        token = router.last_write_token
        assert token is not None
        replica = pgs[name].dsn(1)
        eventually(partial(replayed, replica, token), f"{name}'s replica to have the table")
        eventually(in_pool(router, R1), f"{name}'s replica to join the read pool")
    yield made
    for router in made.values():
        router.stop()


def bodies(conn: psycopg.Connection[tuple[object, ...]]) -> list[str]:
    return [str(row[0]) for row in conn.execute(f"SELECT body FROM {TABLE} ORDER BY id")]


def note(router: Cluster, body: str) -> str:
    with router.write() as conn:
        conn.execute(f"INSERT INTO {TABLE} (body) VALUES (%s)", (body,))
    token = router.last_write_token
    assert token is not None
    return token


def replay_position(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()
    assert row is not None and row[0] is not None
    return parse_lsn(str(row[0]))


def advance(pg: PgCluster, switches: int = 2) -> str:
    """Move a cluster's WAL on by whole segments (16 MB each); its position after."""
    with psycopg.connect(pg.dsn(0), autocommit=True) as conn:
        for _ in range(switches):
            conn.execute(f"INSERT INTO {TABLE} (body) VALUES ('filler')")
            conn.execute("SELECT pg_switch_wal()")
        conn.execute(f"DELETE FROM {TABLE}")
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def test_writes_on_two_clusters_in_one_scope_are_both_read_back(
        routers: dict[str, Cluster], pgs: dict[str, PgCluster]) -> None:
    main, social = routers["main"], routers["social"]
    # Main's replica replays past every position social will reach: were a
    # read on main to use social's token, that stale replica would qualify.
    main_position = advance(pgs["main"])
    eventually(lambda: replayed(pgs["main"].dsn(1), main_position),
               "main's replica to replay the filler")
    with replay_paused(pgs["main"].dsn(1)), replay_paused(pgs["social"].dsn(1)):
        for router in routers.values():
            router.reset_served()
        with causal_scope() as scope:
            for attempt in range(5):
                on_main = note(main, f"main {attempt}")
                on_social = note(social, f"social {attempt}")  # the latest write
                assert scope.tokens == {"main": on_main, "social": on_social}
                assert parse_lsn(on_social) < replay_position(pgs["main"].dsn(1))
                # Main's write is still seen after a later write on social.
                with main.read() as conn:
                    assert bodies(conn) == [f"main {n}" for n in range(attempt + 1)]
                assert main.last_node == P
                with social.read() as conn:
                    assert bodies(conn) == [f"social {n}" for n in range(attempt + 1)]
                assert social.last_node == P
        for router in routers.values():
            # Neither paused replica served a read of the scope.
            assert router.served() == {(P, Intent.WRITE): 5, (P, Intent.READ): 5}
            with router.read(None) as conn:
                assert bodies(conn) == []  # the replica has none of them: it lags for certain
            assert router.last_node == R1


def test_a_read_on_one_cluster_never_waits_for_anothers_position(
        routers: dict[str, Cluster], pgs: dict[str, PgCluster]) -> None:
    main, social = routers["main"], routers["social"]
    # Move main's WAL past every position social has reached, so that its
    # token, if it were held against social's replica, would never be met.
    advance(pgs["main"])
    on_main = note(main, "main only")
    on_social = note(social, "social before the pause")
    eventually(partial(replayed, pgs["social"].dsn(1), on_social),
               "social's replica to replay its note")
    with replay_paused(pgs["social"].dsn(1)):
        assert parse_lsn(on_main) > replay_position(pgs["social"].dsn(1))
        # Waiting for main's position would last the whole deadline, then use the primary.
        social.causal_wait = DEADLINE
        with causal_scope({"main": on_main}):
            with social.read() as conn:
                assert bodies(conn) == ["social before the pause"]
            assert social.last_node == R1
            with main.read() as conn:
                assert bodies(conn) == ["main only"]
        # The control: main's position really is beyond social's replica.
        social.causal_wait = 0.0
        with social.read(on_main):
            pass
        assert social.last_node == P


def notes_app(routers: dict[str, Cluster]) -> WSGIApplication:
    """``POST /<cluster>`` (body=...) saves a note there; ``GET /`` lists every cluster's
    notes as ``cluster:body`` lines, with the node that served each in ``X-Served-By``."""

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ["REQUEST_METHOD"] == "POST":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            form = parse_qs(environ["wsgi.input"].read(length).decode())
            router = routers[str(environ["PATH_INFO"]).strip("/")]
            note(router, form["body"][0])
            start_response("303 See Other", [("Location", "/")])
            return [b""]
        lines, served = [], []
        for name, router in routers.items():
            with router.read() as conn:
                lines += [f"{name}:{body}" for body in bodies(conn)]
            served.append(f"{name}={router.last_node}")
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("X-Served-By", ",".join(served))])
        return ["\n".join(lines).encode()]

    return app


def test_the_cookie_carries_both_clusters_to_another_app_server(
        routers: dict[str, Cluster], pgs: dict[str, PgCluster]) -> None:
    others = routers_over(pgs)  # a second app server, with routers of its own
    try:
        first = Client(CausalMiddleware(notes_app(routers), secret_key=KEY))
        second = Client(CausalMiddleware(notes_app(others), secret_key=KEY))
        # The second server's monitors are new: the stranger's read below may use
        # a replica only once they have seen it healthy.
        for name, router in others.items():
            eventually(in_pool(router, R1), f"{name}'s replica to join the new read pool")
        with replay_paused(pgs["main"].dsn(1)), replay_paused(pgs["social"].dsn(1)):
            # Two requests: the second writes on social only and must keep main's token.
            assert first.post("/main", data={"body": "on main"}).status_code == 303
            assert first.post("/social", data={"body": "on social"}).status_code == 303
            cookie = first.get_cookie(COOKIE_NAME)
            assert cookie is not None
            handed = verify(cookie.value, KEY)
            assert handed is not None and set(handed) == {"main", "social"}
            assert handed["main"] == routers["main"].last_write_token
            assert handed["social"] == routers["social"].last_write_token

            second.set_cookie(COOKIE_NAME, cookie.value)
            page = second.get("/")
            assert page.text.splitlines() == ["main:on main", "social:on social"]
            assert page.headers["X-Served-By"] == f"main={P},social={P}"

            stranger = Client(CausalMiddleware(notes_app(others), secret_key=KEY))
            page = stranger.get("/")
            assert (page.text, page.headers["X-Served-By"]) == ("", f"main={R1},social={R1}")
    finally:
        for router in others.values():
            router.stop()
