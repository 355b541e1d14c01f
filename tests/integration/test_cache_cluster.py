"""The cache cluster over three real memcached processes and the real one-node client.

A node is killed under a bounded read/write loop: the caller sees no error
(misses allowed), the node is ejected after exactly ``failure_limit`` failed
requests, its keys are served by the next node meanwhile, and a restarted
node rejoins once the dead timeout is over. Replicated keys stay readable
with one node dead, and a hundred threads on one expired key compute it once.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from tests.conftest import require
from tests.e2e.stackctl import free_ports
from tests.integration.cachekit import node_state
from tiers.cache.client import Client
from tiers.cache.cluster import CacheCluster, Quorum, memcached_factory, replicated
from tiers.cache.policy import FailureSettings
from tiers.cache.ring import KetamaRing, NodeSpec
from tiers.cache.stampede import get_or_compute, pack

FAILURE = FailureSettings(failure_limit=2, dead_timeout=1.0, connect_timeout=0.5, timeout=1.0)


class Memcached:
    """One memcached process on 127.0.0.1, restartable on the same port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.spec = NodeSpec("127.0.0.1", port)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("memcached")
        assert binary is not None
        command = [binary, "-p", str(self.port), "-l", "127.0.0.1", "-U", "0", "-m", "16"]
        if os.geteuid() == 0:
            command += ["-u", "root"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"memcached on port {self.port} exited at start")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"memcached on port {self.port} did not start listening")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None


@pytest.fixture
def memcacheds() -> Iterator[list[Memcached]]:
    require(shutil.which("memcached") is not None, "memcached is not installed")
    servers = [Memcached(port) for port in free_ports(3)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.kill()


def owned_keys(specs: list[NodeSpec], spec: NodeSpec, count: int) -> list[str]:
    ring = KetamaRing(specs)
    keys = (f"item:{i}" for i in range(100000))
    return [k for k in keys if ring.node_for(k) == spec][:count]


def test_killing_a_node_under_load_gives_no_errors_and_it_rejoins(
    memcacheds: list[Memcached],
) -> None:
    specs = [m.spec for m in memcacheds]
    victim = memcacheds[1]
    victim_keys = owned_keys(specs, victim.spec, 20)
    keys = [f"load:{i}" for i in range(60)] + victim_keys
    with CacheCluster(specs, memcached_factory, failure=FAILURE) as cluster:
        for i, key in enumerate(keys):
            assert cluster.set(key, f"v{i}", confirm=True)
        assert cluster.get_many(keys) == {k: f"v{i}" for i, k in enumerate(keys)}

        victim.kill()
        # A bounded read/write loop: nothing reaches the caller but misses.
        errors_at_ejection = None
        for round_ in range(40):
            for i, key in enumerate(keys):
                cluster.set(key, f"r{round_}-{i}")
                cluster.get(key)
            cluster.get_many(keys)
            state = node_state(cluster, victim.spec)
            if errors_at_ejection is None and state["state"] == "ejected":
                errors_at_ejection = state["errors"]
            if errors_at_ejection is not None and round_ >= 3:
                break
        assert errors_at_ejection == FAILURE.failure_limit
        assert node_state(cluster, victim.spec)["ejections"] == 1
        # While it is out, the next node serves its keys.
        for key in victim_keys:
            assert cluster.set(key, "during", confirm=True)
        assert cluster.get_many(victim_keys) == dict.fromkeys(victim_keys, "during")

        victim.start()
        deadline = time.monotonic() + 30
        while node_state(cluster, victim.spec)["state"] != "up":
            assert time.monotonic() < deadline, "the restarted node never rejoined"
            cluster.get_many(keys)
            time.sleep(0.05)
        assert node_state(cluster, victim.spec)["ejections"] == 1
        # Its keys are its own again.
        for key in victim_keys:
            assert cluster.set(key, "after", confirm=True)
        with Client("127.0.0.1", victim.port) as direct:
            assert direct.get_many(victim_keys) == dict.fromkeys(victim_keys, "after")
        hits = node_state(cluster, victim.spec)["hits"]
        assert cluster.get_many(victim_keys) == dict.fromkeys(victim_keys, "after")
        assert node_state(cluster, victim.spec)["hits"] == hits + len(victim_keys)


def test_replicated_keys_survive_a_dead_node(memcacheds: list[Memcached]) -> None:
    specs = [m.spec for m in memcacheds]
    rules = [("profile:", replicated(3))]
    with CacheCluster(
        specs, memcached_factory, failure=FAILURE, rules=rules, write_quorum=Quorum.MAJORITY
    ) as cluster:
        keys = [f"profile:{i}" for i in range(30)]
        for i, key in enumerate(keys):
            assert cluster.set(key, i, confirm=True)
        for server in memcacheds:
            with Client("127.0.0.1", server.port) as direct:
                assert len(direct.get_many(keys)) == len(keys)

        memcacheds[0].kill()
        assert cluster.get_many(keys) == {k: i for i, k in enumerate(keys)}
        for i, key in enumerate(keys):
            assert cluster.get(key) == i
            # Two of three copies answer: a majority, so the write is confirmed.
            assert cluster.set(key, i + 100, confirm=True)
        assert cluster.get_many(keys) == {k: i + 100 for i, k in enumerate(keys)}


def test_hundred_threads_on_one_expired_key_compute_once(memcacheds: list[Memcached]) -> None:
    specs = [m.spec for m in memcacheds]
    with CacheCluster(specs, memcached_factory, failure=FAILURE) as cluster:
        cluster.set("page:top", pack(b"stale", 0.1, 1.0))  # expired long ago, still stored
        calls: list[int] = []
        lock = threading.Lock()
        release = threading.Event()

        def compute() -> bytes:
            with lock:
                calls.append(1)
            release.wait(30)
            return b"fresh"

        start = threading.Barrier(100)
        results: list[bytes] = []
        failures: list[BaseException] = []

        def worker() -> None:
            try:
                start.wait(30)
                value = get_or_compute(cluster, "page:top", compute, 60, wait=30.0)
                with lock:
                    results.append(value)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(100)]
        for t in threads:
            t.start()
        timer = threading.Timer(0.3, release.set)
        timer.start()
        for t in threads:
            t.join(60)
        timer.cancel()
        release.set()
        assert not failures, failures
        assert len(calls) == 1
        assert len(results) == 100 and set(results) <= {b"stale", b"fresh"}
        assert get_or_compute(cluster, "page:top", compute, 60) == b"fresh"
        assert len(calls) == 1
