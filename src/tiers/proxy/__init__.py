"""The reverse proxy and L7 load balancer in front of the app servers.

HTTP/1.1 (sans-I/O):

    http1           what both parsers share: framing, body events, Connection tokens
    requestparser   client requests: events, limits and checks
    responseparser  backend responses
    forward         what is sent on: request heads for backends, response heads for clients
    heads           the C head scanners and writer (_heads.c), or their stand-ins
    httpdate        HTTP dates, written and read

Requests (pure decisions):

    routing         the first route whose match fits a request
    normalize       hosts and paths in the normal form routes compare
    matchers        client networks and User-Agent patterns (routes and abuse limits)
    limits          deny lists and per-client rate limits

Backends:

    balancer        health rules and balancing policies (no I/O)
    poolstate       a pool's slots, wait queue and stats (no I/O)
    idlepool        idle keep-alive connections to one backend (no I/O)
    upstream        backend pools and active health checks (asyncio)
    upstreamconn    one keep-alive connection to a backend (asyncio)

Serving a client (asyncio):

    server          the process's core: listener, pools, cache, admin, reload
    connection      one client connection's requests, in order
    client          a client connection's I/O state and the proxy's own answers
    exchange        the state of one request being served
    fastpath        the common request forwarded by callbacks
    forwarding      a request forwarded in a task: bodies, retries
    waittimer       one timer for a connection's consecutive waits

Static files and the page cache:

    static          a static route's files and the planned answer (no socket)
    filesender      sending a planned static answer
    cachepolicy     the RFC 9111 rules of the page cache (no I/O)
    cachestore      its stored entries under a memory budget (no I/O)
    coalescer       one fetch per key at a time
    cache           the page cache as the proxy calls it

Operating it:

    settings        the frozen settings the process runs with
    accesslog       one LTSV line per request (the line made in C by _ltsv.c if built),
                    and the request ids in it
    admin           the admin listener: status, metrics, purge
    observe         the status JSON and Prometheus metrics it shows, request counters
    peers           worker processes asking each other for the admin listener
    workers         several worker processes on one port
    errors          the proxy's branch of the error tree
    requestpath     the compiled build of the request path, or its Python sources

Run it with ``python -m tiers.proxy`` (see ``tiers.proxy.__main__``).
"""

from __future__ import annotations

import importlib
import os

from tiers.proxy import requestpath

# Before any module of the request path is imported: a compiled build that no
# longer matches its sources gives way to them (requestpath).
_PURE_REASON = requestpath.choose(os.path.dirname(os.path.abspath(__file__)))

# Written in C, not compiled from Python sources: part of every build that
# had a C compiler (setup.py), by what each does.
_C_HELPERS = {"tiers.proxy._heads": "head scanner", "tiers.proxy._ltsv": "log line"}


def c_helpers() -> list[str]:
    """What the C helper modules that are built do (empty without a C compiler at install)."""
    found = []
    for name, does in _C_HELPERS.items():
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        found.append(does)
    return found


def compiled_modules() -> list[str]:
    """The proxy's loaded modules compiled from their Python sources.

    Empty when the request path runs its Python sources: an editable or
    wheel install that had no C compiler, a build with TIERS_COMPILE=0, a
    compiled build older than its sources, or TIERS_PURE_PYTHON=1 (see
    setup.py and requestpath).
    """
    return requestpath.compiled_modules(list(_C_HELPERS))


def request_path() -> str:
    """The start log's words for the build of the request path this process runs."""
    return requestpath.describe(list(_C_HELPERS), _PURE_REASON)
