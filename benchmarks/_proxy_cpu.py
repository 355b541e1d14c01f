"""The proxy's own Python cost per request, with transports that do no I/O.

A ``ClientConnection`` of a real ``ProxyServer`` (default settings, one pool
of one backend, access log to /dev/null, page cache on) is fed a whole
keep-alive GET; the request it writes to its pooled backend connection is
answered at once with a 620-byte response framed by Content-Length. Every
step of the common request runs (parsing both ways, abuse check, routing,
page cache lookup and pass marking, balancer, header rewriting, access log
line) except the system calls, so this is what the proxy's Python code costs
per request, repeatable to a few percent whatever else the machine does:
the wrk numbers of ``proxy.py`` add the kernel's work and the waits.

    .venv/bin/python benchmarks/_proxy_cpu.py [REQUESTS] [--evict KIB]

With ``--evict KIB``, KIB kibibytes of memory are touched before each of
the two callbacks of a request, as the kernel's work between callbacks
does under real load, and their cost (measured alone) is taken out: what
the same code costs when it starts with cold CPU caches.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from typing import Any

import uvloop

from tiers.proxy.__main__ import parse_args
from tiers.proxy.accesslog import AccessLog
from tiers.proxy.connection import ClientConnection
from tiers.proxy.server import ProxyServer
from tiers.proxy.upstreamconn import UpstreamConnection

REQUEST = (b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
           b"User-Agent: wrk\r\nAccept: */*\r\n\r\n")
_BODY = b"x" * 620
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sat, 05 Dec 2026 23:54:12 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n"
            % len(_BODY)) + _BODY


class _Transport:
    """Counts writes; hands them to ``sink``."""

    def __init__(self, sink: list[bytes] | None = None) -> None:
        self.sink = sink
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        if self.sink is not None:
            self.sink.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...

    def is_closing(self) -> bool:
        return False


class _Evictor:
    """Touches one byte of every cache line of ``kib`` KiB: the CPU caches lose the rest."""

    def __init__(self, kib: int) -> None:
        self._memory = bytearray(kib * 1024)
        self._ones = b"\x01" * len(self._memory[::64])

    def __call__(self) -> None:
        if self._ones:
            self._memory[::64] = self._ones


async def _measure(requests: int, repeats: int, evict_kib: int = 0) -> list[float]:
    settings, _ = parse_args(["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9",
                              "--access-log", "/dev/null"])
    loop = asyncio.get_running_loop()
    server = ProxyServer(settings)
    server._loop = loop  # what start() sets, without binding or health checks
    server.access_log = AccessLog("/dev/null")
    server.access_log.start(loop)
    upstreams = server.pools["default"]
    backend = upstreams.pick(())
    assert backend is not None
    upstream = UpstreamConnection(backend, loop)
    sent: list[bytes] = []
    upstream.connection_made(_Transport(sent))  # type: ignore[arg-type]
    upstream.finish(loop.time())
    backend.pool.put(upstream)
    client = ClientConnection(server)
    answers = _Transport()
    client.connection_made(answers)  # type: ignore[arg-type]

    evict = _Evictor(evict_kib)

    writes = server.writes

    def serve(count: int) -> None:
        # All in one loop iteration: each request's held-back writes are sent
        # as the end of an iteration would send them.
        for _ in range(count):
            evict()
            client.data_received(REQUEST)
            writes.flush()
            sent.clear()
            evict()
            upstream.data_received(RESPONSE)
            writes.flush()

    def evict_only(count: int) -> None:
        for _ in range(count):
            evict()
            sent.clear()
            evict()

    serve(2000)
    if answers.writes != 2000 or client.task is not None:
        raise RuntimeError("the request did not take the callback path")
    results = []
    for _ in range(repeats):
        eviction = 0.0
        if evict_kib:
            gc.collect()
            began = time.process_time()
            evict_only(requests)
            eviction = time.process_time() - began
        gc.collect()
        began = time.process_time()
        serve(requests)
        results.append((time.process_time() - began - eviction) / requests * 1e6)
    server.access_log.close()
    return results


def own_cpu_per_request(requests: int = 50_000, repeats: int = 5, evict_kib: int = 0) -> float:
    """Median CPU microseconds per request of the proxy's code, without I/O."""
    return statistics.median(uvloop.run(_measure(requests, repeats, evict_kib)))


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="benchmarks/_proxy_cpu.py")
    p.add_argument("requests", type=int, nargs="?", default=50_000)
    p.add_argument("--evict", type=int, default=0, metavar="KIB",
                   help="KiB of memory touched before each callback (cold caches)")
    args = p.parse_args(argv)
    if args.requests < 1 or not 0 <= args.evict <= 65536:
        p.error("need REQUESTS >= 1 and 0 <= --evict <= 65536")
    cold = f", {args.evict} KiB touched before each callback" if args.evict else ""
    print(f"the proxy's own code, with transports that do no I/O{cold}: "
          f"{own_cpu_per_request(args.requests, evict_kib=args.evict):.1f} us of CPU per request")


if __name__ == "__main__":
    main(sys.argv[1:])
