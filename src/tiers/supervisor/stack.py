"""What a topology means as processes: one :class:`ServiceSpec` per service, in start order.

    db-primary, db-replica1..N, cache1..N -> worker -> app1..N -> proxy

The database specs (:mod:`tiers.supervisor.database`) create what is missing
before they start (initdb for the primary, a base backup of the running
primary for each replica) and the main primary installs the job queue's
schema and applies the app's migrations once it is ready, so a fresh state
directory and a reused one go through the same steps. Which node is the
primary can change by failover.

The ``worker`` service (``tiers worker``, a prefork job pool) starts once the
databases and cache nodes are ready, before the app servers, and is ready
when every child is connected; it stops before them, so running jobs can
still record their outcome.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import socket
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

from tiers.config.model import Topology
from tiers.errors import DatabaseError
from tiers.supervisor.cachenodes import cache_specs
from tiers.supervisor.database import DatabaseNodes
from tiers.supervisor.runner import Command, ServiceSpec


def app_name(index: int) -> str:
    return f"app{index}"


class Stack:
    """The services of one topology in one state directory."""

    def __init__(self, topology: Topology, state_path: Path,
                 say: Callable[[str], None] = print) -> None:
        self.topology = topology
        self.state_path = state_path
        data_dir = topology.db.data_dir or Path("db")
        self.data_dir = data_dir if data_dir.is_absolute() else state_path / data_dir
        # Each cluster keeps its data (and its record of the primary) in a
        # directory of its own: the main one in data_dir, others beside it.
        self.databases = [
            DatabaseNodes(cluster, self.data_dir if cluster is topology.db
                          else self.data_dir.with_name(f"{self.data_dir.name}-{cluster.name}"),
                          migrations=topology.app.migrations, say=say,
                          jobs_schema=cluster is topology.db)
            for cluster in topology.db.all_clusters()
        ]
        self.database = self.databases[0]

    def specs(self) -> list[ServiceSpec]:
        db_specs = [spec for nodes in self.databases for spec in nodes.specs()]
        caches = cache_specs(self.topology.cache, self.topology.db)
        return [*db_specs, *caches, *self._worker(), *self._apps(), self._proxy()]

    def cluster_of(self, node: str) -> DatabaseNodes:
        """The cluster that has a node named ``node``; DatabaseError if none has."""
        for nodes in self.databases:
            if node in nodes.ports:
                return nodes
        known = ", ".join(name for nodes in self.databases for name in nodes.names)
        raise DatabaseError(f"no database node named {node!r} (nodes: {known})")

    # ---- application servers ---------------------------------------------------

    def _apps(self) -> list[ServiceSpec]:
        db_services = (*(name for nodes in self.databases for name in nodes.names),
                       *self.topology.cache.service_names())
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
                    address=str(address), prepare=partial(self._app_command, argv),
                    depends=db_services,
                    probe=partial(_probe_http, address.host, address.port,
                                  self.topology.proxy.health_path),
                ))
        return specs

    def _app_command(self, argv: list[str]) -> Command:
        return Command(argv, self.service_env())

    def service_env(self) -> dict[str, str]:
        """The environment of app servers and workers: databases, signing key, cache nodes."""
        cache = ",".join(str(address) for address in self.topology.cache.addresses())
        return {**self.database_env(), "TIERS_SECRET_KEY": self.secret_key(),
                "TIERS_CACHE_NODES": cache, "PYTHONUNBUFFERED": "1"}

    # ---- job workers -------------------------------------------------------------

    @property
    def worker_ready_file(self) -> Path:
        return self.state_path / "worker.ready"

    def _worker(self) -> list[ServiceSpec]:
        worker = self.topology.worker
        if not worker.enabled:
            return []
        depends = (*(name for nodes in self.databases for name in nodes.names),
                   *self.topology.cache.service_names())
        queues = ",".join(worker.queues)
        what = f"{worker.processes} processes" + (" + scheduler" if worker.scheduler else "")
        return [ServiceSpec(
            name="worker", role="worker", address=f"queues {queues} ({what})",
            prepare=self._worker_command, depends=depends,
            probe=partial(_probe_file, self.worker_ready_file),
        )]

    def _worker_command(self) -> Command:
        """``tiers worker``, reading the same topology; a fresh readiness file each start."""
        self.worker_ready_file.unlink(missing_ok=True)
        source = Path(self.topology.source)
        argv = [sys.executable, "-m", "tiers", "--state-dir", str(self.state_path)]
        if source.is_file():
            argv += ["--file", str(source)]
        argv += ["worker", "--ready-file", str(self.worker_ready_file)]
        apps = [f"http://{address}" for group in self.topology.all_app_groups()
                for address in group.addresses()]
        env = {**self.service_env(),
               # Where tasks may reach the site on loopback, and keep files of their own.
               "TIERS_APP_URLS": ",".join(apps),
               "TIERS_PROXY_URL": f"http://{self.topology.proxy.listen}",
               "TIERS_STATE_DIR": str(self.state_path)}
        return Command(argv, env)

    def secret_key(self) -> str:
        """The stack's signing key (causal-token cookies), made once per state directory.

        Every app server must share it, so that a cookie set by one is trusted
        by the others; it survives restarts so cookies outlive them too.
        """
        path = self.state_path / "secret.key"
        try:
            return path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            pass
        key = secrets.token_urlsafe(32)
        partial = path.with_name(f"secret.key.{secrets.token_hex(6)}")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(key + "\n")
        try:
            os.link(partial, path)  # first writer wins if two starts race
        except FileExistsError:
            pass
        finally:
            partial.unlink()
        return path.read_text(encoding="ascii").strip()

    def database_env(self) -> dict[str, str]:
        """What app servers learn of the databases (read by ``tiers.db`` in the app).

        Read at each start: after a failover the recorded primary is another
        node. Routers also find a new primary by themselves; this is the first
        guess. TIERS_DB_CLUSTERS, TIERS_DB_TABLES and TIERS_DB_SHARDS (JSON)
        are set only when the topology has more than the main cluster.
        """
        env = {
            "TIERS_DB_PRIMARY": self.database.primary_dsn(),
            "TIERS_DB_REPLICAS": ",".join(self.database.replica_dsns()),
        }
        db = self.topology.db
        if db.clusters:
            env["TIERS_DB_CLUSTERS"] = json.dumps({
                nodes.db.name: {"primary": nodes.primary_dsn(), "replicas": nodes.replica_dsns()}
                for nodes in self.databases})
        if db.tables is not None:
            env["TIERS_DB_TABLES"] = json.dumps({
                "default": db.tables.default_cluster,
                "groups": {name: {"cluster": group.cluster, "tables": list(group.tables)}
                           for name, group in db.tables.groups.items()}})
        if db.shards is not None:
            env["TIERS_DB_SHARDS"] = json.dumps({
                "tables": list(db.shards.tables),
                "virtual_shards": db.shards.map.virtual_shards,
                "clusters": db.shards.map.to_ranges()})
        return env

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


def _same(command: Command) -> Command:
    """The prepare step of a service that needs nothing made before it starts."""
    return command


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


def _probe_file(path: Path) -> None:
    if not path.exists():
        raise ConnectionError(f"{path} does not exist yet")


def _probe_tcp(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=1.0):
        pass


def busy_ports(topology: Topology) -> list[str]:
    """Each configured address another program already listens on, as 'key host:port'."""
    claims = [("proxy.listen", topology.proxy.listen.host, topology.proxy.listen.port)]
    for group in topology.all_app_groups():
        claims += [(f"app {group.name}", group.host, p) for p in group.ports]
    for cluster in topology.db.all_clusters():
        key = "db.ports" if cluster is topology.db else f"db.clusters.{cluster.name}.ports"
        claims += [(key, cluster.host, p) for p in cluster.ports]
    claims += [("cache.ports", topology.cache.host, p) for p in topology.cache.ports]
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
