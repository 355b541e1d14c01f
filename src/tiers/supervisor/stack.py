"""What a topology means as processes: one :class:`ServiceSpec` per service, in start order.

    db-primary -> db-replica1..N -> app1..N -> proxy

The database specs create what is missing before they start (initdb for the
primary, a base backup of the running primary for each replica) and the
primary applies the app's migrations once it is ready, so a fresh state
directory and a reused one go through the same steps.
"""

from __future__ import annotations

import http.client
import signal
import socket
import sys
from functools import partial
from pathlib import Path

import psycopg
import psycopg.sql

from tiers.config.model import Topology
from tiers.db import embedded
from tiers.db.embedded import Layout, RunAs
from tiers.errors import DatabaseError
from tiers.supervisor.runner import Command, ServiceSpec

PRIMARY = "db-primary"


def replica_name(index: int) -> str:
    return f"db-replica{index}"


def app_name(index: int) -> str:
    return f"app{index}"


class Stack:
    """The services of one topology in one state directory."""

    def __init__(self, topology: Topology, state_path: Path) -> None:
        self.topology = topology
        self.state_path = state_path
        db = topology.db
        data_dir = db.data_dir or Path("db")
        self.data_dir = data_dir if data_dir.is_absolute() else state_path / data_dir
        self._run_as: RunAs | None = None
        self._layout: Layout | None = None

    # The system user and the on-disk layout are settled lazily, in the first
    # prepare step, so that building the specs (e.g. for `status`) has no side effects.
    def _db_layout(self) -> tuple[Layout, RunAs]:
        if self._layout is None or self._run_as is None:
            self._run_as = embedded.resolve_run_as(self.topology.db.system_user)
            self._layout = embedded.prepare_layout(self.data_dir, self._run_as)
        return self._layout, self._run_as

    def primary_dsn(self) -> str:
        return embedded.conninfo(self.topology.db.primary_port, self.topology.db.database)

    def replica_dsns(self) -> list[str]:
        return [embedded.conninfo(p, self.topology.db.database)
                for p in self.topology.db.replica_ports]

    def specs(self) -> list[ServiceSpec]:
        return [self._primary(), *self._replicas(), *self._apps(), self._proxy()]

    # ---- database ------------------------------------------------------------

    def _primary(self) -> ServiceSpec:
        db = self.topology.db

        def prepare() -> Command:
            layout, run_as = self._db_layout()
            embedded.init_primary(layout, run_as, PRIMARY)
            return _postgres_command(layout, run_as, PRIMARY, db.primary_port)

        def after_ready() -> None:
            _ensure_database(db.primary_port, db.database)
            migrations = self.topology.app.migrations
            if migrations is not None:
                from tiers.db.migrate import apply_migrations
                apply_migrations(self.primary_dsn(), migrations)

        return ServiceSpec(
            name=PRIMARY, role="primary", address=f"{db.host}:{db.primary_port}",
            stop_signal=signal.SIGINT, prepare=prepare,
            probe=lambda: _probe_postgres(db.primary_port, recovery=False),
            after_ready=after_ready,
        )

    def _replicas(self) -> list[ServiceSpec]:
        db = self.topology.db
        specs = []
        for index, port in enumerate(db.replica_ports, start=1):
            name = replica_name(index)

            def prepare(name: str = name, port: int = port) -> Command:
                layout, run_as = self._db_layout()
                embedded.init_replica(layout, run_as, name, db.primary_port)
                embedded.point_replica_at(layout, run_as, name, db.primary_port)
                return _postgres_command(layout, run_as, name, port)

            specs.append(ServiceSpec(
                name=name, role="replica", address=f"{db.host}:{port}",
                depends=(PRIMARY,),
                stop_signal=signal.SIGINT, prepare=prepare,
                probe=partial(_probe_postgres, port, recovery=True),
            ))
        return specs

    # ---- application servers ---------------------------------------------------

    def _apps(self) -> list[ServiceSpec]:
        db_services = (PRIMARY,
                       *(replica_name(i) for i in range(1, self.topology.db.replicas + 1)))
        env = {
            "TIERS_DB_PRIMARY": self.primary_dsn(),
            "TIERS_DB_REPLICAS": ",".join(self.replica_dsns()),
            "PYTHONUNBUFFERED": "1",
        }
        specs = []
        for app in self.topology.all_app_groups():
            for name, address in zip(app.service_names(), app.addresses(), strict=True):
                argv = [
                    sys.executable, "-m", "tiers.app", "--name", name, "--bind", str(address),
                    "--app", app.app, "--workers", str(app.workers),
                    "--threads", str(app.threads),
                    "--max-requests", str(app.max_requests),
                    "--max-requests-jitter", str(app.max_requests_jitter),
                    "--graceful-timeout", str(app.graceful_timeout),
                ]
                for entry in app.pythonpath:
                    argv += ["--pythonpath", str(entry)]
                specs.append(ServiceSpec(
                    name=name, role="app" if app is self.topology.app else f"app:{app.name}",
                    address=str(address), prepare=partial(_same, Command(argv, env)),
                    depends=db_services,
                    probe=partial(_probe_http, address.host, address.port,
                                  self.topology.proxy.health_path),
                ))
        return specs

    # ---- proxy -----------------------------------------------------------------

    def _proxy(self) -> ServiceSpec:
        proxy = self.topology.proxy
        source = Path(self.topology.source)
        argv = [
            sys.executable, "-m", "tiers.proxy",
            "--topology", str(source) if source.is_file() else "default",
            "--admin-token-file", str(self.state_path / "admin.token"),
        ]
        if proxy.access_log:
            argv += ["--access-log", str(self.state_path / "logs" / "access.log")]
        apps = [name for group in self.topology.all_app_groups()
                for name in group.service_names()]
        return ServiceSpec(
            name="proxy", role="proxy", address=str(proxy.listen),
            prepare=partial(_same, Command(argv, {"PYTHONUNBUFFERED": "1"})),
            depends=tuple(apps),
            probe=partial(_probe_tcp, proxy.listen.host, proxy.listen.port),
        )


def _postgres_command(layout: Layout, run_as: RunAs, name: str, port: int) -> Command:
    # cwd: the user's working directory may be private to root.
    return Command(embedded.server_argv(layout, name, port),
                   popen_kwargs={**run_as.popen_kwargs(), "cwd": str(layout.root)})


def _same(command: Command) -> Command:
    """The prepare step of a service that needs nothing made before it starts."""
    return command


def _probe_postgres(port: int, *, recovery: bool) -> None:
    """Ready when it answers a query and is in the expected role."""
    with psycopg.connect(embedded.conninfo(port, "postgres"), connect_timeout=1,
                         autocommit=True) as conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    if row is None or bool(row[0]) is not recovery:
        role = "replica" if recovery else "primary"
        raise DatabaseError(f"server on port {port} is not a {role}")


def _ensure_database(port: int, database: str) -> None:
    with psycopg.connect(embedded.conninfo(port, "postgres"), connect_timeout=2,
                         autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                              (database,)).fetchone()
        if exists is None:
            # The name is validated as an identifier when the config is loaded.
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(
                psycopg.sql.Identifier(database)))


def _probe_http(host: str, port: int, path: str) -> None:
    connection = http.client.HTTPConnection(host, port, timeout=1.0)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise ConnectionError(f"health check answered {response.status}")
    finally:
        connection.close()


def _probe_tcp(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=1.0):
        pass


def busy_ports(topology: Topology) -> list[str]:
    """Each configured address another program already listens on, as 'key host:port'."""
    claims = [("proxy.listen", topology.proxy.listen.host, topology.proxy.listen.port)]
    for group in topology.all_app_groups():
        claims += [(f"app {group.name}", group.host, p) for p in group.ports]
    claims += [("db.ports", topology.db.host, p) for p in topology.db.ports]
    admin = topology.proxy.policy.admin.listen
    if admin is not None:
        claims.append(("proxy.admin.listen", admin.host, admin.port))
    busy = []
    for key, host, port in claims:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError:
                busy.append(f"{key} {host}:{port}")
    return busy
