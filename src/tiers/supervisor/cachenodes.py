"""The cache tier's nodes as supervised services: memcached, or tiers' embedded server.

``engine = "auto"`` runs the real memcached when it is on PATH and the
embedded asyncio server (``python -m tiers.cache.server``, same text
protocol, LRU within ``memory_mb``) otherwise, so ``tiers up`` works with
nothing installed. ``"memcached"`` insists on the real one (a node whose
binary is missing fails to start, saying so); ``"embedded"`` never uses it.

memcached refuses to run as root; then it runs as the unprivileged system
user that also runs PostgreSQL. A node is ready once it answers ``version``.
"""

from __future__ import annotations

import shutil
import socket
import sys
from functools import partial

from tiers.config.model import DbConfig, MemcacheConfig
from tiers.db import embedded
from tiers.errors import ServiceError
from tiers.supervisor.runner import Command, ServiceSpec


def cache_specs(cache: MemcacheConfig, db: DbConfig) -> list[ServiceSpec]:
    """One spec per cache node, named cache1..N."""
    return [
        ServiceSpec(
            name=name, role="cache", address=str(address),
            prepare=partial(_command, cache, db, address.host, address.port),
            probe=partial(probe_version, address.host, address.port),
        )
        for name, address in zip(cache.service_names(), cache.addresses(), strict=True)
    ]


def memcached_binary(cache: MemcacheConfig) -> str | None:
    """The memcached to run, or None when the embedded server is to be used."""
    if cache.engine == "embedded":
        return None
    found = shutil.which("memcached")
    if found is None and cache.engine == "memcached":
        raise ServiceError("engine = \"memcached\" but memcached is not on PATH "
                           "(apt-get install memcached, or engine = \"auto\")")
    return found


def _command(cache: MemcacheConfig, db: DbConfig, host: str, port: int) -> Command:
    binary = memcached_binary(cache)
    if binary is None:
        return Command([sys.executable, "-m", "tiers.cache.server", "--listen", f"{host}:{port}",
                        "--memory-mb", str(cache.memory_mb)], {"PYTHONUNBUFFERED": "1"})
    run_as = embedded.resolve_run_as(db.system_user)
    # -U 0: no UDP (its amplification is a known abuse vector, and tiers speaks TCP).
    argv = [binary, "-l", host, "-p", str(port), "-U", "0", "-m", str(cache.memory_mb)]
    return Command(argv, popen_kwargs=run_as.popen_kwargs())


def probe_version(host: str, port: int) -> None:
    """Raises unless the node answers ``version`` within a second."""
    with socket.create_connection((host, port), timeout=1.0) as conn:
        conn.sendall(b"version\r\n")
        reply = conn.recv(256)
    if not reply.startswith(b"VERSION "):
        raise ServiceError(f"cache node {host}:{port} answered {reply[:40]!r} to version")
