"""setuptools' build backend; an install compiles the proxy's request path by default.

Wheel and editable builds are TIERS_COMPILE=auto unless the variable is set,
so they ask for mypy to be installed (see compiled.py and setup.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from compiled import COMPILE_REQUIREMENTS, default_to_auto
from setuptools import build_meta as _setuptools
from setuptools.build_meta import (  # noqa: F401 (the hooks this backend passes through)
    build_sdist,
    get_requires_for_build_sdist,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)


def _with_compile_requirements(requires: Iterable[str]) -> list[str]:
    """setuptools' ``requires``, plus what compiling needs unless TIERS_COMPILE=0."""
    if default_to_auto() == "0":
        return list(requires)
    return [*requires, *COMPILE_REQUIREMENTS]


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    return _with_compile_requirements(_setuptools.get_requires_for_build_wheel(config_settings))


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    return _with_compile_requirements(
        _setuptools.get_requires_for_build_editable(config_settings))


def build_wheel(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                metadata_directory: str | None = None) -> str:
    default_to_auto()
    return str(_setuptools.build_wheel(wheel_directory, config_settings, metadata_directory))


def build_editable(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                   metadata_directory: str | None = None) -> str:
    default_to_auto()
    return str(_setuptools.build_editable(wheel_directory, config_settings, metadata_directory))
