"""The build: pip installs compile the proxy's request path, and fall back to
Python where they cannot (setup.py, build_backend/)."""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import require

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """build_backend/backend.py, with setuptools' own requirements fixed.

    setuptools would run setup.py to find them; what is tested here is only
    what the backend adds to them.
    """
    monkeypatch.syspath_prepend(str(REPO / "build_backend"))
    module = importlib.import_module("backend")
    monkeypatch.setattr(module._setuptools, "get_requires_for_build_wheel",
                        lambda config_settings=None: ["wheel-part"])
    monkeypatch.setattr(module._setuptools, "get_requires_for_build_editable",
                        lambda config_settings=None: ["editable-part"])
    monkeypatch.delenv("TIERS_COMPILE", raising=False)
    yield module
    for name in ("backend", "compiled"):
        sys.modules.pop(name, None)


def test_an_install_through_pip_asks_for_mypyc_by_default(backend: ModuleType) -> None:
    assert backend.get_requires_for_build_wheel() == [
        "wheel-part", "mypy>=1.10", "httptools>=0.6"]
    # The hook chose "auto" for the rest of this build's process (setup.py).
    assert os.environ["TIERS_COMPILE"] == "auto"
    del os.environ["TIERS_COMPILE"]
    assert backend.get_requires_for_build_editable() == [
        "editable-part", "mypy>=1.10", "httptools>=0.6"]
    assert os.environ["TIERS_COMPILE"] == "auto"


@pytest.mark.parametrize(("value", "extra"), [("0", []), ("1", ["mypy>=1.10", "httptools>=0.6"])])
def test_tiers_compile_overrides_the_default(backend: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                             value: str, extra: list[str]) -> None:
    monkeypatch.setenv("TIERS_COMPILE", value)
    assert backend.get_requires_for_build_wheel() == ["wheel-part", *extra]
    assert backend.get_requires_for_build_editable() == ["editable-part", *extra]
    assert os.environ["TIERS_COMPILE"] == value


def test_a_bad_tiers_compile_stops_the_build(backend: ModuleType,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERS_COMPILE", "yes")
    with pytest.raises(SystemExit, match="TIERS_COMPILE must be one of 0, 1, auto, got 'yes'"):
        backend.get_requires_for_build_wheel()


def _copy_checkout(to: Path) -> None:
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "compiled.sha256")
    for tree in ("src", "build_backend"):
        shutil.copytree(REPO / tree, to / tree, ignore=skip)
    for file in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / file, to)


def test_without_a_c_compiler_the_build_goes_on_in_python(tmp_path: Path) -> None:
    probe = subprocess.run([sys.executable, "-c", "import mypyc.build"], capture_output=True,
                           check=False)
    require(probe.returncode == 0, "mypyc is not installed (pip install 'mypy>=1.10')")
    _copy_checkout(tmp_path)
    # CC=false: every compile fails, as with no compiler or no Python headers.
    done = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
        env={**os.environ, "TIERS_COMPILE": "auto", "CC": "false"},
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("warning: tiers: building the compiled modules failed" in done.stderr), \
        done.stderr[-3000:]
    # None of the group is left behind: a partial set would fail at import.
    assert not list(tmp_path.glob("src/**/*.so"))
    assert not (tmp_path / "src/tiers/proxy/compiled.sha256").exists()
    assert not list(tmp_path.glob("build/lib*/**/*.so"))
    ran = subprocess.run(
        [sys.executable, "-c", "import tiers.proxy as p, tiers.proxy.fastpath as f; "
         "print(p.request_path(), f.__file__)"],
        env={**os.environ, "PYTHONPATH": str(tmp_path / "src")},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["pure", "Python",
                                  str(tmp_path / "src/tiers/proxy/fastpath.py")]


def test_without_mypyc_an_automatic_build_goes_on_in_python(tmp_path: Path) -> None:
    _copy_checkout(tmp_path)
    # A stand-in package that hides mypyc, as a build environment without it would.
    hide = tmp_path / "hide"
    (hide / "mypyc").mkdir(parents=True)
    (hide / "mypyc" / "__init__.py").write_text("raise ImportError('hidden')\n")
    done = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
        env={**os.environ, "TIERS_COMPILE": "auto", "PYTHONPATH": str(hide)},
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: tiers: mypyc is not installed for this build" in done.stderr
    assert not (tmp_path / "src/tiers/proxy/compiled.sha256").exists()
    # The C helpers are built all the same.
    assert list(tmp_path.glob("src/tiers/proxy/_heads*.so"))


def test_a_build_without_the_compiled_modules_drops_those_an_earlier_one_left(
        tmp_path: Path) -> None:
    # A wheel takes the whole build directory, which pip keeps between builds
    # of a checkout: what a compiled build left there must not come along.
    _copy_checkout(tmp_path)
    lib = tmp_path / "lib"
    package = lib / "tiers" / "proxy"
    package.mkdir(parents=True)
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    stale = [package / f"fastpath{suffix}", lib / f"tiers_proxy__mypyc{suffix}",
             package / "compiled.sha256"]
    for path in stale:
        path.write_bytes(b"")
    done = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(lib)], cwd=tmp_path,
        env={**os.environ, "TIERS_COMPILE": "0"},
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert [path for path in stale if path.exists()] == []
    assert list(package.glob("_heads*.so"))  # the C helpers are built as ever
