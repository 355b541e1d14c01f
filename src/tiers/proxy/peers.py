"""Worker processes of one proxy asking each other: the admin listener's view of all of them.

With ``workers = N`` each worker has its own pools, health checks, counters,
page cache and abuse buckets, and only worker 0 runs the admin listener. So
that its answers cover the whole proxy, every worker also listens on a Unix
socket of its own and answers one command per connection with one JSON
document. The sockets have names in Linux's abstract namespace, made of a
random prefix the master chooses and the worker's index, so nothing is left
on disk whatever way the proxy ends; since such a name has no file
permissions, a worker answers only peers running as its own user
(SO_PEERCRED).

    status            the worker's status (``tiers.proxy.observe.status``)
    purge PREFIX      drops its cached pages under PREFIX; {"purged": count}

``ask_all`` sends a command to every worker at once and gives each one's
answer, or None for a worker that did not answer within the timeout (one
that is being restarted, say). ``merge_status`` folds the workers' status
documents into one: counters and gauges summed, each server's state the
same in every worker or ``mixed``, and a short line per worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

log = logging.getLogger("tiers.proxy")

# A command line is short; anything longer is not one of ours.
_MAX_COMMAND = 64 * 1024
_READ_TIMEOUT = 5.0
_MAX_ANSWER = 64 * 1024 * 1024
# struct ucred: pid, uid, gid.
_CREDS = struct.Struct("3i")

Status = dict[str, Any]
# Answers a command's argument (the text after the command word) with a JSON document.
Handler = Callable[[str], Awaitable[Any]]


def socket_name(prefix: str, index: int) -> str:
    """Worker ``index``'s socket name (abstract: it starts with a NUL byte)."""
    return f"{prefix}-worker-{index}"


def new_prefix() -> str:
    """A name prefix for one proxy's worker sockets, unguessable and unique to it."""
    return f"\0tiers-proxy-{os.getpid()}-{secrets.token_hex(8)}"


class PeerListener:
    """One worker's Unix socket, answering the commands of ``handlers`` by name."""

    def __init__(self, prefix: str, index: int, handlers: dict[str, Handler]) -> None:
        self.name = socket_name(prefix, index)
        self._handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen; raises OSError if the name is taken (another proxy's, by chance)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.name)
        except OSError:
            sock.close()
            raise
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not _same_user(writer):
                return
            line = await asyncio.wait_for(reader.readline(), _READ_TIMEOUT)
            if len(line) > _MAX_COMMAND or not line.endswith(b"\n"):
                return
            word, _, argument = line.decode("utf-8", "replace").rstrip("\n").partition(" ")
            handler = self._handlers.get(word)
            answer = {"error": f"unknown command {word!r}"} if handler is None \
                else await handler(argument)
            writer.write(json.dumps(answer).encode())
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        except Exception as exc:  # a bug here must not take the worker down
            log.error("peer socket: unexpected %s: %s", type(exc).__name__, exc)
        finally:
            writer.close()


def _same_user(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
    _pid, uid, _gid = _CREDS.unpack(creds)
    return bool(uid == os.getuid())


async def ask(prefix: str, index: int, command: str, timeout: float) -> Any:
    """Worker ``index``'s answer to ``command``, or None if it gave none in time."""
    async def exchange() -> Any:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, socket_name(prefix, index))
        except OSError:
            sock.close()
            raise
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        try:
            writer.write(command.encode() + b"\n")
            await writer.drain()
            data = await reader.read(_MAX_ANSWER)
        finally:
            writer.close()
        return json.loads(data)

    try:
        return await asyncio.wait_for(exchange(), timeout)
    except (TimeoutError, OSError, ValueError) as exc:
        log.warning("worker %d did not answer %r: %s", index, command.split(" ", maxsplit=1)[0],
                    exc or type(exc).__name__)
        return None


async def ask_all(prefix: str, workers: int, command: str,
                  timeout: float = 1.0) -> list[Any]:
    """Every worker's answer to ``command``, in worker order (None where none came)."""
    return list(await asyncio.gather(*(ask(prefix, index, command, timeout)
                                       for index in range(workers))))


# ---- merging ----------------------------------------------------------------------

_SERVER_SUMS = ("active", "requests", "connect_errors", "server_errors", "timeouts", "broken",
                "downs")
_POOL_SUMS = ("queued", "queue_full", "queue_timeouts")


def merge_status(answers: Sequence[Status | None]) -> Status:
    """One status document for the whole proxy from each worker's (None: no answer).

    Request, byte, connection, abuse and cache numbers are summed: each
    worker counts its own. A server's ``state`` is the one every answering
    worker reports, else ``mixed``, with ``states`` giving each worker's;
    its last check is the most recent any worker made. ``workers`` lists
    each worker's index, pid, connections and requests, or that it did not
    answer.
    """
    got = [a for a in answers if a is not None]
    merged: Status = {
        "workers": len(answers),
        "answered": len(got),
        "uptime_seconds": max((a["uptime_seconds"] for a in got), default=0.0),
        "connections": sum(a["connections"] for a in got),
        "requests": _sum_dicts(a["requests"] for a in got),
        "bytes_out": sum(a["bytes_out"] for a in got),
        "pools": _merge_pools([a["pools"] for a in got]),
        "abuse": _sum_dicts(a["abuse"] for a in got),
        "cache": _sum_dicts(a["cache"] for a in got),
        "per_worker": [
            {"worker": index, "answered": False} if a is None else
            {"worker": index, "answered": True, "pid": a.get("pid"),
             "connections": a["connections"], "requests": sum(a["requests"].values())}
            for index, a in enumerate(answers)
        ],
    }
    return merged


def _sum_dicts(dicts: Any) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for d in dicts:
        for key, value in d.items():
            total[key] = total.get(key, 0) + value
    return total


def _merge_pools(per_worker: Sequence[Sequence[Status]]) -> list[Status]:
    # Pools and servers by name and address, in the order they first appear
    # (during a reload, workers may briefly differ).
    pools: dict[str, list[Status]] = {}
    for worker_pools in per_worker:
        for pool in worker_pools:
            pools.setdefault(pool["name"], []).append(pool)
    out = []
    for name, copies in pools.items():
        first = copies[0]
        servers: dict[str, list[Status]] = {}
        for pool in copies:
            for server in pool["servers"]:
                servers.setdefault(server["address"], []).append(server)
        merged = {key: first[key] for key in ("balance", "queue_limit")}
        merged["name"] = name
        merged.update({key: sum(p[key] for p in copies) for key in _POOL_SUMS})
        merged["servers"] = [_merge_server(s) for s in servers.values()]
        out.append(merged)
    return out


def _merge_server(copies: Sequence[Status]) -> Status:
    first = copies[0]
    states = [s["state"] for s in copies]
    merged = {key: first[key] for key in ("address", "backup", "weight")}
    merged["state"] = states[0] if len(set(states)) == 1 else "mixed"
    merged["states"] = states
    merged["effective_weight"] = sum(s["effective_weight"] for s in copies) / len(copies)
    merged.update({key: sum(s[key] for s in copies) for key in _SERVER_SUMS})
    latest = max(copies, key=lambda s: s["last_check_at"] or 0.0)
    merged.update({key: latest[key] for key in
                   ("last_check_ok", "last_check_at", "last_check_error")})
    return merged
