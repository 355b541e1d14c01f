"""A real PostgreSQL primary (and replicas) from the embedded binaries, for integration tests."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psycopg

from tests.e2e.stackctl import free_ports
from tiers.db import embedded


def wait_connect(port: int, timeout: float = 30.0) -> psycopg.Connection[tuple[object, ...]]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return psycopg.connect(embedded.conninfo(port, "postgres"), connect_timeout=1,
                                   autocommit=True)
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class Cluster:
    """Data directories under ``root``, servers started by the test, stopped by ``stop``."""

    def __init__(self, root: Path, nodes: int = 2) -> None:
        self.run_as = embedded.resolve_run_as("tiers")
        self.layout = embedded.prepare_layout(root / "db", self.run_as)
        self.ports = free_ports(nodes)
        self.procs: list[subprocess.Popen[bytes]] = []
        # The latest server of each node and its port, for tests that stop and restart nodes.
        self.servers: dict[str, subprocess.Popen[bytes]] = {}
        self.node_ports: dict[str, int] = {}

    def start(self, name: str, port: int) -> None:
        proc = subprocess.Popen(
            embedded.server_argv(self.layout, name, port), cwd=self.layout.root,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            **self.run_as.popen_kwargs())  # type: ignore[call-overload]
        self.procs.append(proc)
        self.servers[name] = proc
        self.node_ports[name] = port

    def start_node(self, name: str) -> None:
        """Start a node again on the port it had."""
        self.start(name, self.node_ports[name])

    def kill(self, name: str) -> None:
        """SIGKILL the node's postmaster, like a crash (its children notice and exit)."""
        proc = self.servers[name]
        proc.kill()
        proc.wait()

    def start_replicated(self) -> None:
        """Start a primary and a streaming replica on each further port (database ``postgres``)."""
        embedded.init_primary(self.layout, self.run_as, "db-primary")
        self.start("db-primary", self.ports[0])
        wait_connect(self.ports[0]).close()
        for index, port in enumerate(self.ports[1:], start=1):
            name = f"db-replica{index}"
            embedded.init_replica(self.layout, self.run_as, name, self.ports[0])
            embedded.point_replica_at(self.layout, self.run_as, name, self.ports[0])
            self.start(name, port)
            wait_connect(port).close()

    def dsn(self, index: int) -> str:
        return embedded.conninfo(self.ports[index], "postgres")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()



