"""setuptools' build backend; an install compiles the proxy's request path by default.

Wheel and editable builds are TIERS_COMPILE=auto unless the variable is set,
so they ask for mypy to be installed (see compiled.py and setup.py).
"""

from __future__ import annotations

from typing import Any

from compiled import COMPILE_REQUIREMENTS, compile_mode, default_to_auto
from setuptools import build_meta as _setuptools
from setuptools.build_meta import (  # noqa: F401 (the hooks this backend passes through)
    build_sdist,
    get_requires_for_build_sdist,
    prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel,
)


def _with_compile_requirements(requires: list[str]) -> list[str]:
    if compile_mode() != "0":
        requires.extend(COMPILE_REQUIREMENTS)
    return requires


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    default_to_auto()
    return _with_compile_requirements(
        list(_setuptools.get_requires_for_build_wheel(config_settings)))


def build_wheel(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                metadata_directory: str | None = None) -> str:
    default_to_auto()
    return str(_setuptools.build_wheel(wheel_directory, config_settings, metadata_directory))


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    default_to_auto()
    return _with_compile_requirements(
        list(_setuptools.get_requires_for_build_editable(config_settings)))


def build_editable(wheel_directory: str, config_settings: dict[str, Any] | None = None,
                   metadata_directory: str | None = None) -> str:
    default_to_auto()
    return str(_setuptools.build_editable(wheel_directory, config_settings, metadata_directory))
