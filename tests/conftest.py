"""Shared test helpers.

Locally, a test whose external dependency is missing skips with the reason;
with TIERS_REQUIRE_ALL=1 (as CI runs) it fails instead, so nothing is
silently left untested.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def require(condition: bool, reason: str) -> None:
    """Skip (or, under TIERS_REQUIRE_ALL=1, fail) when ``condition`` is false."""
    if condition:
        return
    if os.environ.get("TIERS_REQUIRE_ALL") == "1":
        pytest.fail(f"required dependency missing: {reason}")
    pytest.skip(reason)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary directory other users may traverse (PostgreSQL runs as its own user
    when the tests run as root, and pytest's own tmp_path lives below a private one)."""
    path = Path(tempfile.mkdtemp(prefix="tiers-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
