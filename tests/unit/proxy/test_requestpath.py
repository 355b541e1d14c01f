"""Choosing between the compiled request path and its Python sources."""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from tiers.proxy import requestpath

EXTENSION = importlib.machinery.EXTENSION_SUFFIXES[0]


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A package directory holding a "compiled build" of two modules.

    The extension files are empty: nothing here imports them, the finder
    under test must send the import to the source.
    """
    monkeypatch.delenv(requestpath.PURE_ENV, raising=False)
    sources = {"probe_one": "WHICH = 'one from source'\n", "probe_two": "WHICH = 'two'\n"}
    for name, text in sources.items():
        (tmp_path / f"{name}.py").write_text(text)
        (tmp_path / f"{name}{EXTENSION}").write_bytes(b"")
    (tmp_path / "plain.py").write_text("")  # a source without an extension: not compiled
    (tmp_path / requestpath.MANIFEST).write_text(
        "".join(f"{digest(text)}  {name}.py\n" for name, text in sources.items()))
    before = list(sys.meta_path)
    yield tmp_path
    sys.meta_path[:] = before
    for name in sources:
        sys.modules.pop(f"tiers.proxy.{name}", None)


def test_the_modules_with_an_extension_beside_their_source_are_the_compiled_ones(
        package: Path) -> None:
    assert requestpath.compiled_beside_sources(str(package)) == ["probe_one", "probe_two"]


def test_a_build_that_matches_its_sources_runs(package: Path) -> None:
    before = list(sys.meta_path)
    assert requestpath.choose(str(package)) == ""
    assert sys.meta_path == before


def test_an_edited_source_sends_every_compiled_module_to_its_source(package: Path) -> None:
    (package / "probe_one.py").write_text("WHICH = 'one, edited'\n")
    reason = requestpath.choose(str(package))
    assert reason.startswith("probe_one.py changed since the compiled build; rebuild: ")
    assert isinstance(sys.meta_path[0], requestpath.SourceFinder)
    one = importlib.import_module("tiers.proxy.probe_one")
    two = importlib.import_module("tiers.proxy.probe_two")
    assert one.WHICH == "one, edited"
    assert one.__file__ == str(package / "probe_one.py")
    # The unchanged module comes from its source too: never a mix.
    assert two.__file__ == str(package / "probe_two.py")
    # Other modules of the package are not the finder's business.
    assert sys.meta_path[0].find_spec("tiers.proxy.plain") is None


def test_a_source_missing_from_the_manifest_counts_as_changed(package: Path) -> None:
    (package / "probe_three.py").write_text("")
    (package / f"probe_three{EXTENSION}").write_bytes(b"")
    assert requestpath.choose(str(package)).startswith("probe_three.py changed")


def test_many_changed_sources_are_counted_not_listed(package: Path) -> None:
    for i in range(5):
        (package / f"extra{i}.py").write_text("")
        (package / f"extra{i}{EXTENSION}").write_bytes(b"")
    reason = requestpath.choose(str(package))
    assert reason.startswith("extra0.py, extra1.py, extra2.py and 2 more changed")


def test_the_environment_can_ask_for_the_sources(package: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(requestpath.PURE_ENV, "1")
    assert requestpath.choose(str(package)) == "TIERS_PURE_PYTHON=1"
    assert importlib.import_module("tiers.proxy.probe_two").__file__.endswith(".py")


@pytest.mark.parametrize("manifest", [
    None,
    "not a digest  probe_one.py\n",
    f"{'0' * 64}  ../probe_one.py\n",
    f"{'0' * 64} probe_one.py\n",
])
def test_a_missing_or_malformed_manifest_runs_the_sources(package: Path,
                                                          manifest: str | None) -> None:
    path = package / requestpath.MANIFEST
    if manifest is None:
        path.unlink()
    else:
        path.write_text(manifest)
    reason = requestpath.choose(str(package))
    assert reason.startswith("the compiled build cannot be checked against its sources")
    assert str(path) in reason
    assert isinstance(sys.meta_path[0], requestpath.SourceFinder)


def test_without_a_compiled_build_nothing_changes(tmp_path: Path) -> None:
    (tmp_path / "plain.py").write_text("")
    (tmp_path / f"_helper{EXTENSION}").write_bytes(b"")  # a C helper has no source
    before = list(sys.meta_path)
    assert requestpath.choose(str(tmp_path)) == ""
    assert sys.meta_path == before


def test_compiled_modules_are_the_loaded_extensions_but_the_c_helpers(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name, file in [("tiers.proxy.probe_ext", f"/x/probe_ext{EXTENSION}"),
                       ("tiers.proxy._probe_helper", f"/x/_probe_helper{EXTENSION}"),
                       ("tiers.proxy.probe_py", "/x/probe_py.py"),
                       ("elsewhere.probe_ext", f"/x/probe_ext{EXTENSION}")]:
        module = types.ModuleType(name)
        module.__file__ = file
        monkeypatch.setitem(sys.modules, name, module)
    found = requestpath.compiled_modules(["tiers.proxy._probe_helper"])
    assert "tiers.proxy.probe_ext" in found
    assert not {"tiers.proxy._probe_helper", "tiers.proxy.probe_py",
                "elsewhere.probe_ext"} & set(found)


@pytest.mark.parametrize(("compiled", "reason", "words"), [
    (["tiers.proxy.a", "tiers.proxy.b"], "", "compiled (2 modules)"),
    ([], "", "pure Python"),
    ([], "TIERS_PURE_PYTHON=1", "pure Python (TIERS_PURE_PYTHON=1)"),
])
def test_the_start_log_words(monkeypatch: pytest.MonkeyPatch, compiled: list[str],
                             reason: str, words: str) -> None:
    monkeypatch.setattr(requestpath, "compiled_modules", lambda helpers: compiled)
    assert requestpath.describe([], reason) == words
