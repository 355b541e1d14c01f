"""setuptools' build backend, asking for mypy when TIERS_COMPILE=1 (see setup.py)."""

from __future__ import annotations

from typing import Any

from compiled import COMPILE_REQUIREMENTS, compile_requested
from setuptools import build_meta as _setuptools
from setuptools.build_meta import (  # noqa: F401 (the hooks this backend passes through)
    build_editable,
    build_sdist,
    build_wheel,
    get_requires_for_build_sdist,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    requires = list(_setuptools.get_requires_for_build_wheel(config_settings))
    if compile_requested():
        requires.extend(COMPILE_REQUIREMENTS)
    return requires


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    requires = list(_setuptools.get_requires_for_build_editable(config_settings))
    if compile_requested():
        requires.extend(COMPILE_REQUIREMENTS)
    return requires
