"""Build: Python plus two small C modules by default; with TIERS_COMPILE=1 the
proxy's request path is compiled to C extensions by mypyc as well (the same
typed sources; about a fifth of the pure build's CPU for the proxy's own work).

The C modules are two helpers of the proxy's request path:
``tiers.proxy._heads`` reads plain HTTP heads in one call, ``tiers.proxy._ltsv``
makes the access log line. Both are optional: without a C compiler the
install goes on, and the Python code does their work (the proxy's start log
line names the helpers it runs with). An editable install builds them in
place; after editing a ``.c`` file, rebuild with
``python setup.py build_ext --inplace``.

    TIERS_COMPILE=1 pip install '.[test]'      # a compiled install
    TIERS_COMPILE=1 python setup.py build_ext --inplace   # compiled, in a checkout

An editable install stays pure Python unless built in place as above: a
compiled module next to its source shadows it, so edits to that source would
not take effect until the next build (``tiers.proxy.compiled_modules()`` tells
what is compiled in a running process).
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "build_backend"))
from compiled import COMPILED_MODULES, compile_requested

# Optional: a failed compile leaves the package without them, not uninstallable.
_C_HELPERS = [
    Extension(f"tiers.proxy.{name}", [f"src/tiers/proxy/{name}.c"], optional=True,
              extra_compile_args=["-O2"])
    for name in ("_heads", "_ltsv")
]


def _mypyc_extensions() -> list[object]:
    if not compile_requested():
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        if set(sys.argv[1:]) & {"egg_info", "dist_info"}:
            # pip runs this file to learn the build requirements before it has
            # installed them (build_backend/backend.py adds mypy to them).
            return []
        raise SystemExit("TIERS_COMPILE=1 needs mypyc: pip install 'mypy>=1.10'") from None

    paths = [f"src/{name.replace('.', '/')}.py" for name in COMPILED_MODULES]
    # A build environment holds only the build requirements: the types of
    # the other libraries the package imports are not at hand there.
    return list(mypycify(["--ignore-missing-imports", *paths],
                         opt_level="3", group_name="tiers_proxy"))


setup(ext_modules=[*_C_HELPERS, *_mypyc_extensions()])
