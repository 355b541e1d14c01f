"""The job queue's SQL, loaded by name from the ``.sql`` files beside this module.

``queries.sql`` holds one statement per block, each block opened by a
``-- name: NAME`` line; ``schema.sql`` is the whole schema, run as one
script. Keeping the SQL in files keeps it readable as SQL (and greppable),
and the names are checked once at import: a missing or duplicated name is an
error at start-up, never at the first job.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import LiteralString

_NAME_RE = re.compile(r"^-- name: ([a-z_]+)\s*$", re.MULTILINE)


def _read(filename: str) -> str:
    return resources.files("tiers.jobs").joinpath(filename).read_text(encoding="utf-8")


def parse_named(text: str) -> dict[str, str]:
    """The statements of ``text`` by name; ValueError for a duplicated name or an empty block.

    Comment lines inside a block are kept (PostgreSQL ignores them); a
    trailing semicolon is dropped so each statement can be prepared alone.
    """
    found: dict[str, str] = {}
    marks = list(_NAME_RE.finditer(text))
    for index, mark in enumerate(marks):
        end = marks[index + 1].start() if index + 1 < len(marks) else len(text)
        body = text[mark.end():end].strip().rstrip(";").strip()
        name = mark.group(1)
        if name in found:
            raise ValueError(f"statement {name!r} is defined twice")
        if not any(line.strip() and not line.lstrip().startswith("--")
                   for line in body.splitlines()):
            raise ValueError(f"statement {name!r} is empty")
        found[name] = body
    return found


QUERIES: dict[str, str] = parse_named(_read("queries.sql"))


def query(name: str) -> LiteralString:
    """The statement named ``name``; KeyError (naming the known ones) if there is none."""
    try:
        text = QUERIES[name]
    except KeyError:
        raise KeyError(f"no statement {name!r} in queries.sql "
                       f"(known: {', '.join(sorted(QUERIES))})") from None
    # Text shipped with the package, never built from input: safe as a query.
    return text


def schema() -> LiteralString:
    """The whole schema script (idempotent)."""
    return _read("schema.sql")
