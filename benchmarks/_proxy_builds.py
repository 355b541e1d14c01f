"""The two builds of tiers' proxy that ``proxy.py`` measures, each in its own copy.

``compiled``: the checkout's sources as ``pip install .`` builds them by
default: the request path compiled by mypyc, plus the C helpers
(``tiers.proxy._heads``, ``tiers.proxy._ltsv``); built with TIERS_COMPILE=1 so
that a failed compile stops the benchmark instead of measuring the fallback.
``pure``: Python plus the C helpers, as an editable install or
``TIERS_COMPILE=0 pip install .`` builds them. Each copy is a
directory to put first on PYTHONPATH; neither touches the checkout (whose
own compiled modules, if it was built in place, are left out).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SKIP = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "compiled.sha256")


def _build_copy(tmp: str, name: str, python: str, compile_: bool) -> tuple[str | None, str]:
    root = os.path.join(tmp, name)
    shutil.copytree(os.path.join(REPO, "src"), os.path.join(root, "src"), ignore=_SKIP)
    shutil.copytree(os.path.join(REPO, "build_backend"), os.path.join(root, "build_backend"),
                    ignore=_SKIP)
    for file in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, file), root)
    done = subprocess.run(
        [python, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=root,
        check=False,
        env={**os.environ, "TIERS_COMPILE": "1" if compile_ else "0"},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        return None, f"the {name} build failed:\n{tail}"
    return os.path.join(root, "src"), ""


def pure_copy(tmp: str, python: str = sys.executable) -> tuple[str | None, str]:
    """Build the Python sources in a copy: (its ``src/`` path, "") or (None, why not)."""
    return _build_copy(tmp, "pure", python, compile_=False)


def compiled_copy(tmp: str, python: str = sys.executable) -> tuple[str | None, str]:
    """Build the default install in a copy: (its ``src/`` path, "") or (None, why not)."""
    probe = subprocess.run([python, "-c", "import mypyc.build"], capture_output=True,
                           check=False)
    if probe.returncode != 0:
        return None, (f"mypyc is not installed for {python} "
                      "(.venv/bin/pip install -e '.[bench]')")
    return _build_copy(tmp, "compiled", python, compile_=True)


def pythonpath_env(src: str) -> dict[str, str]:
    """The environment that runs tiers from the copy at ``src``."""
    return {**os.environ, "PYTHONPATH": src}
