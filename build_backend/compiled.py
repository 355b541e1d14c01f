"""What the compiled build compiles, and whether it was asked for.

Shared by ``setup.py`` and the in-tree build backend (``backend.py``), which
adds mypy to the build requirements only when a compiled build is asked for.
"""

from __future__ import annotations

import os

# The proxy's request path: parsing both ways, routing, abuse checks, the page
# cache's lookups, the balancer and pools, the callback fast path, the access
# log. Interpreted code may call into them freely, but not subclass their
# classes or replace their methods at run time (tests do neither).
COMPILED_MODULES = (
    "tiers.proxy.accesslog",
    "tiers.proxy.balancer",
    "tiers.proxy.cache",
    "tiers.proxy.cachepolicy",
    "tiers.proxy.cachestore",
    "tiers.proxy.client",
    "tiers.proxy.coalescer",
    "tiers.proxy.connection",
    "tiers.proxy.exchange",
    "tiers.proxy.fastpath",
    "tiers.proxy.forward",
    "tiers.proxy.forwarding",
    "tiers.proxy.http1",
    "tiers.proxy.httpdate",
    "tiers.proxy.idlepool",
    "tiers.proxy.limits",
    "tiers.proxy.matchers",
    "tiers.proxy.normalize",
    "tiers.proxy.observe",
    "tiers.proxy.poolstate",
    "tiers.proxy.requestparser",
    "tiers.proxy.responseparser",
    "tiers.proxy.routing",
    "tiers.proxy.settings",
    "tiers.proxy.shared",
    "tiers.proxy.upstream",
    "tiers.proxy.upstreamconn",
    "tiers.proxy.waittimer",
    "tiers.proxy.writebatch",
)

# What the compiled build needs besides setuptools: mypyc (the mypy the
# sources are checked with) and httptools, whose types the parsers are
# compiled against. Other libraries' types are not needed
# (--ignore-missing-imports in setup.py).
COMPILE_REQUIREMENTS = ("mypy>=1.10", "httptools>=0.6")


def compile_requested() -> bool:
    """True when the environment asks for a compiled build (TIERS_COMPILE=1)."""
    value = os.environ.get("TIERS_COMPILE", "0")
    if value not in ("0", "1"):
        raise SystemExit(f"TIERS_COMPILE must be 0 or 1, got {value!r}")
    return value == "1"
