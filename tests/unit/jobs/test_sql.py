"""The named SQL files: every statement the code uses is there, once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tiers.jobs import sql

SOURCES = Path(sql.__file__).parent


def test_named_blocks_are_parsed_and_trailing_semicolons_dropped() -> None:
    text = "-- name: one\n-- a comment\nSELECT 1;\n\n-- name: two\nSELECT 2\n"
    assert sql.parse_named(text) == {"one": "-- a comment\nSELECT 1", "two": "SELECT 2"}


@pytest.mark.parametrize(("text", "message"), [
    ("-- name: a\nSELECT 1\n-- name: a\nSELECT 2\n", "'a' is defined twice"),
    ("-- name: a\n-- only a comment\n", "'a' is empty"),
])
def test_bad_files_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sql.parse_named(text)


def test_every_statement_the_package_names_exists_and_every_one_is_used() -> None:
    code = "".join(path.read_text(encoding="utf-8") for path in SOURCES.glob("*.py"))
    used = set(re.findall(r'query\("([a-z_]+)"\)', code))
    assert used, "the package names its statements"
    assert used <= set(sql.QUERIES), used - set(sql.QUERIES)
    unused = {name for name in sql.QUERIES if f'"{name}"' not in code}
    assert unused == set(), "unused statements in queries.sql"
    with pytest.raises(KeyError, match="no statement 'nope'"):
        sql.query("nope")


def test_the_schema_is_idempotent_ddl() -> None:
    text = sql.schema()
    creates = re.findall(r"^CREATE (?!OR REPLACE|TABLE IF NOT EXISTS|INDEX IF NOT EXISTS"
                         r"|UNIQUE INDEX IF NOT EXISTS)(\w+)", text, re.MULTILINE)
    assert creates == [], "every CREATE must be IF NOT EXISTS or OR REPLACE"
