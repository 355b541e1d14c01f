"""Build: Python, two small C modules, and the proxy's request path compiled
to C extensions by mypyc from the same typed sources, which takes about four
fifths off the proxy's own CPU per request.

The C modules are two helpers of the proxy's request path:
``tiers.proxy._heads`` reads plain HTTP heads in one call, ``tiers.proxy._ltsv``
makes the access log line. Both are optional: without a C compiler the
install goes on, and the Python code does their work (the proxy's start log
line names the helpers it runs with). After editing a ``.c`` file in a
checkout, rebuild them with ``python setup.py build_ext --inplace``.

The compiled request path follows TIERS_COMPILE (build_backend/compiled.py):

    pip install tiers, pip install ., pip install -e .   # compiled where it can be, else pure
    TIERS_COMPILE=1 pip install .              # compiled, or the install fails
    TIERS_COMPILE=0 pip install -e .           # pure Python, no mypy needed, a quicker install
    TIERS_COMPILE=1 python setup.py build_ext --inplace   # compiled again, in a checkout

Built in place (an editable install), a compiled module sits next to its
source and Python would import it first; the build also writes the digest of
each compiled source, and ``tiers.proxy.requestpath`` runs the Python sources
instead as soon as one of them no longer matches, so edits always take effect
(the proxy's start log says so, and why).
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "build_backend"))
from compiled import COMPILED_MODULES, MANIFEST, compile_mode

_MODE = compile_mode()
# The compiled modules' code is in one shared library, named by mypyc after the group.
_GROUP = "tiers_proxy"
_GROUP_LIBRARY = f"{_GROUP}__mypyc"

# Optional: a failed compile leaves the package without them, not uninstallable.
_C_HELPERS = [
    Extension(f"tiers.proxy.{name}", [f"src/tiers/proxy/{name}.c"], optional=True,
              extra_compile_args=["-O2"])
    for name in ("_heads", "_ltsv")
]
_HELPER_NAMES = {ext.name for ext in _C_HELPERS}


def _warn(message: str) -> None:
    print(f"warning: tiers: {message}; the proxy's request path stays pure Python "
          "(about five times its CPU per request)", file=sys.stderr)


def _mypyc_extensions(mode: str) -> list[Any]:
    if mode == "0":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        if set(sys.argv[1:]) & {"egg_info", "dist_info"}:
            # pip runs this file to learn the build requirements before it has
            # installed them (build_backend/backend.py adds mypy to them).
            return []
        if mode == "auto":
            _warn("mypyc is not installed for this build (pip install 'mypy>=1.10')")
            return []
        raise SystemExit("TIERS_COMPILE=1 needs mypyc: pip install 'mypy>=1.10'") from None

    paths = [f"src/{name.replace('.', '/')}.py" for name in COMPILED_MODULES]
    # A build environment holds only the build requirements: the types of
    # the other libraries the package imports are not at hand there.
    return list(mypycify(["--ignore-missing-imports", *paths],
                         opt_level="3", group_name=_GROUP))


class _BuildExt(build_ext):
    """build_ext that, under TIERS_COMPILE=auto, builds the compiled modules all or none.

    They are one group: each module's extension imports the shared library
    that holds the code, so a partial set would fail at import. If any of
    them fails to build (no C compiler, no Python headers), those already
    built are removed, the rest of the build goes on, and the package runs
    its Python sources.
    """

    compiled_built = False

    def run(self) -> None:
        super().run()
        if self.compiled_built:
            self._write_manifest()

    def build_extensions(self) -> None:
        compiled = [ext for ext in self.extensions if ext.name not in _HELPER_NAMES]
        if not compiled:
            # A wheel takes all of the build directory, where an earlier
            # compiled build may have left its modules.
            self._remove_compiled()
        if not compiled or _MODE != "auto":
            super().build_extensions()
            self.compiled_built = bool(compiled)
            return
        self.extensions = [ext for ext in self.extensions if ext.name in _HELPER_NAMES]
        super().build_extensions()
        try:
            for ext in compiled:
                self.build_extension(ext)
        except (CCompilerError, BaseError) as error:
            self._remove_compiled()
            _warn(f"building the compiled modules failed ({error})")
        else:
            self.compiled_built = True
            # Listed again for what follows the build: the copy next to the
            # sources (--inplace) and the list of files a wheel installs.
            self.extensions.extend(compiled)

    def _remove_compiled(self) -> None:
        """Delete the compiled modules and their manifest from the build directory.

        Called while extensions are built, when setuptools builds them there
        even for --inplace (it copies them next to the sources afterwards).
        """
        stale = [self.get_ext_fullpath(name) for name in (*COMPILED_MODULES, _GROUP_LIBRARY)]
        stale.append(os.path.join(self.build_lib, "tiers", "proxy", MANIFEST))
        for path in stale:
            if os.path.exists(path):
                os.remove(path)

    def _write_manifest(self) -> None:
        """Each compiled source's digest, beside the built modules (tiers.proxy.requestpath)."""
        package = self.get_finalized_command("build_py").get_package_dir("tiers.proxy")
        lines = []
        for name in COMPILED_MODULES:
            filename = name.rpartition(".")[2] + ".py"
            with open(os.path.join(package, filename), "rb") as f:
                lines.append(f"{hashlib.sha256(f.read()).hexdigest()}  {filename}\n")
        targets = [os.path.join(self.build_lib, "tiers", "proxy", MANIFEST)]
        if self.inplace:
            targets.append(os.path.join(package, MANIFEST))
        for target in targets:
            with open(target, "w", encoding="ascii") as f:
                f.writelines(lines)


setup(ext_modules=[*_C_HELPERS, *_mypyc_extensions(_MODE)],
      cmdclass={"build_ext": _BuildExt})
