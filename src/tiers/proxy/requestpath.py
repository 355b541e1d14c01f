"""Which build of the request path this process runs: compiled, or its Python sources.

A compiled build (setup.py, mypyc) leaves a C extension next to each source it
was made from, plus ``compiled.sha256``: the SHA-256 of each of those sources
at build time, in ``sha256sum`` format (``sha256sum -c compiled.sha256`` in
the package's directory checks them by hand). Python imports an extension before a
source of the same name, so in a checkout an edit to a compiled source would
silently not take effect. ``choose()`` runs when ``tiers.proxy`` is imported,
before any of those modules: if a source no longer matches its digest, or
TIERS_PURE_PYTHON=1 asks for it, every compiled module is imported from its
source instead. All of them, never some: the compiled modules reach into each
other's objects directly, so a mix would break.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

MANIFEST = "compiled.sha256"
PURE_ENV = "TIERS_PURE_PYTHON"
PACKAGE = "tiers.proxy"
REBUILD_HINT = "pip install -e . or TIERS_COMPILE=1 python setup.py build_ext --inplace"


class SourceFinder(importlib.abc.MetaPathFinder):
    """Imports the named modules of one package directory from their ``.py`` sources."""

    def __init__(self, directory: str, names: Sequence[str]) -> None:
        self.directory = directory
        self.names = frozenset(f"{PACKAGE}.{name}" for name in names)

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname not in self.names:
            return None
        source = os.path.join(self.directory, fullname.rpartition(".")[2] + ".py")
        return importlib.util.spec_from_file_location(fullname, source)


def compiled_beside_sources(directory: str) -> list[str]:
    """The modules (``fastpath``) of ``directory`` with both an extension and a source."""
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    files = set(os.listdir(directory))
    return sorted(
        stem for stem in (name[:-3] for name in files if name.endswith(".py"))
        if any(stem + suffix in files for suffix in suffixes)
    )


def read_manifest(path: str) -> dict[str, str]:
    """The manifest's digests by module (``fastpath``); ValueError if it is unreadable."""
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: {error}") from None
    digests = {}
    for line in lines:
        digest, _, filename = line.partition("  ")
        if len(digest) != 64 or not filename.endswith(".py") or "/" in filename:
            raise ValueError(f"{path}: not a line of a compiled build's manifest: {line!r}")
        digests[filename[:-3]] = digest
    return digests


def changed_sources(directory: str, modules: Sequence[str], digests: dict[str, str]) -> list[str]:
    """The sources (``fastpath.py``) whose content is not what the build compiled."""
    changed = []
    for name in modules:
        with open(os.path.join(directory, name + ".py"), "rb") as f:
            now = hashlib.sha256(f.read()).hexdigest()
        if now != digests.get(name):
            changed.append(name + ".py")
    return changed


def why_pure(directory: str, modules: Sequence[str]) -> str:
    """Why the compiled ``modules`` of ``directory`` must not run, or "" when they may."""
    if os.environ.get(PURE_ENV) == "1":
        return f"{PURE_ENV}=1"
    try:
        digests = read_manifest(os.path.join(directory, MANIFEST))
    except ValueError as error:
        return f"the compiled build cannot be checked against its sources ({error})"
    changed = changed_sources(directory, modules, digests)
    if not changed:
        return ""
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    return f"{shown} changed since the compiled build; rebuild: {REBUILD_HINT}"


def choose(directory: str) -> str:
    """Import the Python sources instead of the compiled build when it must not run.

    Returns why the sources run although a compiled build is there; "" when
    the compiled build runs, or there is none.
    """
    modules = compiled_beside_sources(directory)
    if not modules:
        return ""
    reason = why_pure(directory, modules)
    if reason:
        sys.meta_path.insert(0, SourceFinder(directory, modules))
    return reason


def compiled_modules(c_helpers: Sequence[str]) -> list[str]:
    """The proxy's loaded modules compiled from their Python sources."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return sorted(
        name
        for name, module in list(sys.modules.items())
        if name.startswith(PACKAGE + ".") and name not in c_helpers
        and (getattr(module, "__file__", None) or "").endswith(suffixes)
    )


def describe(c_helpers: Sequence[str], pure_reason: str) -> str:
    """The start log's words for the request path this process runs."""
    compiled = compiled_modules(c_helpers)
    if compiled:
        return f"compiled ({len(compiled)} modules)"
    return f"pure Python ({pure_reason})" if pure_reason else "pure Python"
