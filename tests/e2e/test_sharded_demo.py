"""The demo over two database clusters, end to end: `tiers up -d` with a second cluster,
a table map and a shard map. Bookmarks (entries and bookmarks) live on the cluster "social";
each user's stars live on the cluster of the user's virtual shard, with ids that carry it;
copying stars between users on different clusters is refused with 409 and changes nothing."""

from __future__ import annotations

import html
import json
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.e2e.stackctl import StackHandle, free_ports, tear_down, write_topology
from tests.e2e.test_stack import browser, post_bookmark
from tiers.db import embedded
from tiers.db.ids import decode_id
from tiers.db.sharding import ShardMap

SHARDS = ShardMap.from_ranges({"main": ["0-511"], "social": ["512-1023"]})
USERS = [f"user{n}" for n in range(20)]

EXTRA = """\
[db.clusters.social]
replicas = 0
port = {social_port}

[db.tables]
default = "main"
bookmarks = {{ cluster = "social", tables = ["entries", "bookmarks"] }}

[db.shards]
tables = ["stars"]
virtual_shards = 1024
[db.shards.clusters]
main = ["0-511"]
social = ["512-1023"]
"""


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[StackHandle, dict[str, int]]]:
    root = Path(tempfile.mkdtemp(prefix="tiers-sharded-"))
    root.chmod(0o755)
    # One call, so that every port differs: proxy, two app servers, main's primary
    # and replica, the admin listener, social's primary.
    ports = free_ports(7)
    handle = StackHandle(root=root, proxy_port=ports[0], app_ports=ports[1:3],
                         db_ports=ports[3:5], admin_port=ports[5])
    write_topology(handle, EXTRA.format(social_port=ports[6]))
    try:
        handle.tiers("up", "-d")
        yield handle, {"main": ports[3], "social": ports[6]}
    finally:
        tear_down(handle)
        shutil.rmtree(root, ignore_errors=True)


def query(port: int, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(embedded.conninfo(port, "tiers"), autocommit=True,
                         connect_timeout=5) as conn:
        return conn.execute(sql, params).fetchall()


def stars_by_user(port: int) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for user, star_id in query(port, "SELECT user_name, id FROM stars ORDER BY id"):
        found.setdefault(user, []).append(star_id)
    return found


def post(client: urllib.request.OpenerDirector, url: str, fields: dict[str, str],
         accept: str = "text/html") -> tuple[int, str, str]:
    """Status, final URL and body of a form POST (redirects followed, errors returned)."""
    request = urllib.request.Request(url, data=urllib.parse.urlencode(fields).encode(),
                                     headers={"Accept": accept})
    try:
        with client.open(request, timeout=10) as response:
            return response.status, response.geturl(), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, url, error.read().decode()


def test_db_status_lists_the_social_clusters_primary(
        stack: tuple[StackHandle, dict[str, int]]) -> None:
    handle, ports = stack
    report = json.loads(handle.tiers("db", "status", "--json").stdout)
    social = [node for node in report if node["cluster"] == "social"]
    assert [(n["name"], n["role"], n["address"]) for n in social] == [
        ("db-social-primary", "primary", f"127.0.0.1:{ports['social']}")]
    roles = {node["name"]: node["role"] for node in report if node["cluster"] == "main"}
    assert roles == {"db-primary": "primary", "db-replica1": "replica"}
    text = handle.tiers("db", "status").stdout
    assert "db-social-primary" in text


def test_bookmarks_land_on_the_cluster_of_their_table_group(
        stack: tuple[StackHandle, dict[str, int]]) -> None:
    handle, ports = stack
    client = browser()
    final_url, page = post_bookmark(client, handle.base_url, "https://example.com/grouped",
                                    "kept on social")
    assert "kept on social" in page  # read-your-writes through the proxy
    entry_id = int(final_url.rsplit("/", 1)[1])
    assert query(ports["social"], "SELECT url FROM entries WHERE id = %s",
                 (entry_id,)) == [("https://example.com/grouped",)]
    assert query(ports["social"], "SELECT comment FROM bookmarks WHERE entry_id = %s",
                 (entry_id,)) == [("kept on social",)]
    assert query(ports["main"], "SELECT count(*) FROM entries") == [(0,)]
    assert query(ports["main"], "SELECT count(*) FROM bookmarks") == [(0,)]


def test_stars_land_on_the_users_shard_and_nowhere_else(
        stack: tuple[StackHandle, dict[str, int]]) -> None:
    handle, ports = stack
    client = browser()
    final_url, _ = post_bookmark(client, handle.base_url, "https://example.com/starred", "")
    entry_id = final_url.rsplit("/", 1)[1]
    for user in USERS:
        status, landed, page = post(client, f"{handle.base_url}/stars",
                                    {"user": user, "entry_id": entry_id})
        assert status == 200 and landed.endswith(f"/users/{user}/stars")
        assert "Title of https://example.com/starred" in page

    placed = {name: stars_by_user(port) for name, port in ports.items()}
    assert {SHARDS.cluster_for(user) for user in USERS} == {"main", "social"}
    for user in USERS:
        home = SHARDS.cluster_for(user)
        assert len(placed[home][user]) == 1, user
        assert all(user not in found for name, found in placed.items() if name != home)
        (star_id,) = placed[home][user]
        assert decode_id(star_id).shard == SHARDS.shard_for(user)
        assert SHARDS.cluster_for_id(star_id) == home

        request = urllib.request.Request(f"{handle.base_url}/users/{user}/stars",
                                         headers={"Accept": "application/json"})
        with client.open(request, timeout=10) as response:
            body = json.loads(response.read())
        assert body["shard"] == SHARDS.shard_for(user)
        assert [s["id"] for s in body["stars"]] == [star_id]
        assert body["stars"][0]["url"] == "https://example.com/starred"


def test_a_copy_across_clusters_is_409_and_changes_nothing(
        stack: tuple[StackHandle, dict[str, int]]) -> None:
    handle, ports = stack
    client = browser()
    final_url, _ = post_bookmark(client, handle.base_url, "https://example.com/copy", "")
    entry_id = final_url.rsplit("/", 1)[1]
    main_users = [u for u in USERS if SHARDS.cluster_for(u) == "main"]
    social_user = next(u for u in USERS if SHARDS.cluster_for(u) == "social")
    source = main_users[0]
    post(client, f"{handle.base_url}/stars", {"user": source, "entry_id": entry_id})
    before = {name: stars_by_user(port) for name, port in ports.items()}

    url = f"{handle.base_url}/users/{source}/stars/copy"
    status, _, page = post(client, url, {"to": social_user})
    assert status == 409
    message = html.unescape(page)
    assert "span 2 clusters (main, social)" in message
    assert f"{source!r} (shard {SHARDS.shard_for(source)}) -> main" in message
    assert f"{social_user!r} (shard {SHARDS.shard_for(social_user)}) -> social" in message
    status, _, body = post(client, url, {"to": social_user}, accept="application/json")
    assert status == 409 and json.loads(body)["clusters"] == ["main", "social"]
    assert {name: stars_by_user(port) for name, port in ports.items()} == before

    # Between two users on one cluster the copy is one transaction there.
    target = main_users[1]
    status, landed, _ = post(client, url, {"to": target})
    assert status == 200 and landed.endswith(f"/users/{target}/stars")
    copied = set(stars_by_user(ports["main"])[target]) - set(before["main"].get(target, []))
    assert copied and {decode_id(i).shard for i in copied} == {SHARDS.shard_for(target)}
    assert target not in stars_by_user(ports["social"])
