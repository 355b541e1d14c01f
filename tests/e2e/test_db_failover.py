"""Failover and switchover of the stack's database, end to end, under the supervisor.

One stack with a primary and two replicas: `tiers db status` shows the roles;
a switchover under a write load loses no committed write; `kill -9` of the
primary's postmaster under a write load through the demo gets a new primary
serving writes within 10 s, never two primaries at once, and the old primary
back as a replica.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.e2e.stackctl import StackHandle, make_handle, tear_down
from tests.e2e.test_stack import browser, post_bookmark
from tiers.db import embedded


@pytest.fixture(scope="module")
def stack() -> Iterator[StackHandle]:
    root = Path(tempfile.mkdtemp(prefix="tiers-failover-"))
    root.chmod(0o755)
    handle = make_handle(root, apps=2, replicas=2,
                         extra="[supervisor]\nbackoff_initial = 0.2\n")
    try:
        handle.tiers("up", "-d")
        yield handle
    finally:
        tear_down(handle)
        shutil.rmtree(root, ignore_errors=True)


def db_status(stack: StackHandle) -> list[dict[str, Any]]:
    report: list[dict[str, Any]] = json.loads(stack.tiers("db", "status", "--json").stdout)
    return report


def roles(stack: StackHandle) -> dict[str, str]:
    return {node["name"]: node["role"] for node in db_status(stack)}


def in_recovery(port: int) -> bool | None:
    """The node's answer to pg_is_in_recovery(), None when it does not answer."""
    try:
        with psycopg.connect(embedded.conninfo(port, "postgres"), connect_timeout=1,
                             autocommit=True) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    except psycopg.Error:
        return None
    return None if row is None else bool(row[0])


class PrimaryCounter(threading.Thread):
    """Samples every node's role; records the most primaries seen at one moment."""

    def __init__(self, ports: list[int]) -> None:
        super().__init__(daemon=True)
        self.ports = ports
        self.most = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.1):
            answers = [in_recovery(port) for port in self.ports]
            self.most = max(self.most, sum(1 for a in answers if a is False))


def test_db_status_shows_one_primary_and_streaming_replicas(stack: StackHandle) -> None:
    report = db_status(stack)
    assert [(n["name"], n["role"]) for n in report] == [
        ("db-primary", "primary"), ("db-replica1", "replica"), ("db-replica2", "replica")]
    for node in report[1:]:
        assert node["lag_bytes"] is not None and node["fenced"] is False
    done = stack.tiers("db", "shell", "db-replica1", "-tAc", "SELECT pg_is_in_recovery()")
    assert done.stdout.strip() == "t"


def _write_loop(stack: StackHandle, stop: threading.Event, saved: list[str],
                failed: list[str]) -> None:
    client = browser()
    n = 0
    while not stop.is_set() and n < 2000:
        n += 1
        url = f"https://example.com/{os.getpid()}/{time.monotonic_ns()}"
        try:
            post_bookmark(client, stack.base_url, url, "under load")
        except (urllib.error.URLError, OSError) as exc:
            failed.append(f"{url}: {exc}")
            time.sleep(0.05)
        else:
            saved.append(url)


def _stored_urls(port: int) -> set[str]:
    with psycopg.connect(embedded.conninfo(port, "tiers"), connect_timeout=2) as conn:
        return {row[0] for row in conn.execute("SELECT url FROM entries")}


def test_switchover_loses_no_committed_write(stack: StackHandle) -> None:
    stop, saved, failed = threading.Event(), [], []
    writer = threading.Thread(target=_write_loop, args=(stack, stop, saved, failed))
    writer.start()
    try:
        stack.wait_for(lambda: len(saved) >= 20, 30, "writes before the switchover")
        done = stack.tiers("db", "switchover", "--to", "db-replica1", timeout=150)
        assert "db-replica1 is the primary" in done.stdout
        before = len(saved)
        stack.wait_for(lambda: len(saved) >= before + 20, 30, "writes after the switchover")
    finally:
        stop.set()
        writer.join(30)
    assert roles(stack) == {"db-primary": "replica", "db-replica1": "primary",
                            "db-replica2": "replica"}
    stored = _stored_urls(stack.db_ports[1])
    lost = [url for url in saved if url not in stored]
    assert lost == [], f"{len(lost)} committed writes lost"


def test_kill_9_of_the_primary_fails_over_within_10s(stack: StackHandle) -> None:
    current = next(n for n, r in roles(stack).items() if r == "primary")
    victim_port = stack.db_ports[["db-primary", "db-replica1", "db-replica2"].index(current)]
    counter = PrimaryCounter(stack.db_ports)
    counter.start()
    stop, saved, failed = threading.Event(), [], []
    writer = threading.Thread(target=_write_loop, args=(stack, stop, saved, failed))
    writer.start()
    try:
        stack.wait_for(lambda: len(saved) >= 20, 30, "writes before the kill")
        os.kill(stack.service(current)["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        before = len(saved)
        stack.wait_for(lambda: len(saved) > before, 10, "a write served after the kill")
        recovered_in = time.monotonic() - killed_at
        # The old primary comes back, as a replica of the new one.
        stack.wait_for(lambda: in_recovery(victim_port) is True, 90,
                       "the old primary back as a replica")
    finally:
        stop.set()
        writer.join(30)
        counter.done.set()
        counter.join(5)
    assert recovered_in < 10
    assert counter.most <= 1, "two primaries at one moment"
    now = roles(stack)
    assert now[current] == "replica"
    assert sum(1 for r in now.values() if r == "primary") == 1
    status = {s["name"]: s for s in stack.status()["services"]}
    assert status[current]["role"] == "replica"
    new_primary = next(n for n, r in now.items() if r == "primary")
    assert status[new_primary]["role"] == "primary"
