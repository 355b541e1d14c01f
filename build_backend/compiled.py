"""What the compiled build compiles, and when it is built.

Shared by ``setup.py`` and the in-tree build backend (``backend.py``), which
adds mypy to the build requirements whenever a build may compile.
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

# TIERS_COMPILE: "1" compiles or fails, "0" never compiles, "auto" compiles
# where it can and otherwise builds the pure-Python request path with a
# warning. Unset, an install through pip (``pip install tiers``, ``pip install
# .``, ``pip install -e .``) is "auto", and ``python setup.py build_ext`` is
# "0" (the quick rebuild of the C helpers after editing one).
COMPILE_MODES = ("0", "1", "auto")
ENV = "TIERS_COMPILE"

# The digests of the compiled sources, written beside the built modules;
# tiers.proxy.requestpath reads it (and names it: keep the two the same).
MANIFEST = "compiled.sha256"


def compile_mode(default: str = "0") -> str:
    """The build's mode: TIERS_COMPILE when set, else ``default``."""
    value = os.environ.get(ENV) or default
    if value not in COMPILE_MODES:
        raise SystemExit(f"{ENV} must be one of {', '.join(COMPILE_MODES)}, got {value!r}")
    return value


def default_to_auto() -> str:
    """Make "auto" the mode of this build unless TIERS_COMPILE says otherwise; the mode.

    The backend calls it in the hooks of a wheel or editable build; each hook
    runs in its own process, and setup.py runs in that process.
    """
    mode = compile_mode(default="auto")
    os.environ[ENV] = mode
    return mode
