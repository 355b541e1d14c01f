"""A byte relay on uvloop: the floor under any Python proxy on this event loop.

    .venv/bin/python benchmarks/_relay.py LISTEN_PORT BACKEND_PORT

Each client connection gets its own connection to the backend on
127.0.0.1, and bytes go through both ways untouched: no parsing, no
routing, no log. ``proxy.py`` loads it like the proxies, so the table shows
what the event loop and the kernel cost per request here, and how much of
a proxy's time is its own work on each request. It is no proxy: it trusts
the client to speak HTTP to the backend.
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import uvloop


class _Backend(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport) -> None:
        self._client = client

    def data_received(self, data: bytes) -> None:
        self._client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client.close()


class _Client(asyncio.Protocol):
    def __init__(self, backend_port: int) -> None:
        self._backend_port = backend_port
        self._backend: asyncio.Transport | None = None
        self._early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        client = cast(asyncio.Transport, transport)
        asyncio.get_running_loop().create_task(self._connect(client))

    async def _connect(self, client: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            backend, _ = await loop.create_connection(
                lambda: _Backend(client), "127.0.0.1", self._backend_port
            )
        except OSError:
            client.close()
            return
        if client.is_closing():
            backend.close()
            return
        self._backend = backend
        for data in self._early:
            backend.write(data)
        self._early.clear()

    def data_received(self, data: bytes) -> None:
        if self._backend is None:
            self._early.append(data)
        else:
            self._backend.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._backend is not None:
            self._backend.close()


async def _serve(port: int, backend_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Client(backend_port), "127.0.0.1", port, backlog=4096
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    listen_port, to_port = int(sys.argv[1]), int(sys.argv[2])
    uvloop.run(_serve(listen_port, to_port))
