"""Resolve ``module:attribute`` to a WSGI callable, after extending ``sys.path``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import cast
from wsgiref.types import WSGIApplication

from tiers.errors import ServiceError


class AppLoadError(ServiceError):
    """The WSGI app named on the command line could not be imported or is not callable."""


def extend_sys_path(pythonpath: Sequence[Path]) -> None:
    """Put each directory at the front of ``sys.path``, keeping their given order.

    The first directory named wins over later ones and over what is installed,
    as with PYTHONPATH. Paths are made absolute so a later chdir changes nothing.
    """
    entries = [str(Path(directory).resolve()) for directory in pythonpath]
    for entry in reversed(entries):
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)


def load_app(spec: str, pythonpath: Sequence[Path] = ()) -> WSGIApplication:
    """Import ``spec`` (``package.module:name`` or ``package.module:obj.attr``) and return it.

    Raises AppLoadError, whose message names the spec and the reason, if the
    spec is malformed, the module fails to import (for any reason, including
    an exception raised while it runs), the attribute is missing, or the
    object is not callable.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise AppLoadError(f"--app {spec!r}: expected 'module:attribute', e.g. 'bookmarks.app:app'")
    extend_sys_path(pythonpath)
    try:
        target: object = importlib.import_module(module_name)
    except Exception as exc:
        where = ", ".join(str(p) for p in pythonpath) or "no --pythonpath"
        raise AppLoadError(
            f"--app {spec!r}: cannot import {module_name!r} ({where}): {type(exc).__name__}: {exc}"
        ) from exc
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise AppLoadError(f"--app {spec!r}: {module_name!r} has no {attr_path!r}") from exc
    if not callable(target):
        raise AppLoadError(f"--app {spec!r}: {type(target).__name__} object is not a WSGI callable")
    return cast(WSGIApplication, target)
