"""Build: pure Python by default; with TIERS_COMPILE=1 the proxy's request path
is compiled to C extensions by mypyc (the same typed sources; about half the
proxy's own CPU per request).

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

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "build_backend"))
from compiled import COMPILED_MODULES, compile_requested


def _extensions() -> list[object]:
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


setup(ext_modules=_extensions())
