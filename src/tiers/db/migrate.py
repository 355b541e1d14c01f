"""Apply an app's schema migrations: ``*.sql`` files, in name order, each at most once.

Each file runs in its own transaction together with the row that records it
in ``tiers_schema_migrations``, so a file is either applied and recorded or
neither. Every transaction first takes one transaction-level advisory lock,
so concurrent runs (two app servers starting at once) queue up: the second
finds the file recorded and skips it. Files must therefore not contain
statements that cannot run in a transaction (``CREATE INDEX CONCURRENTLY``,
``VACUUM``) nor their own ``BEGIN``/``COMMIT``.

Usage: ``python -m tiers.db.migrate --dsn DSN --dir DIR`` prints the names it
applied, one per line, and exits 0; on failure it prints the reason to stderr
and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import psycopg
from psycopg.rows import TupleRow

from tiers.db.nodes import describe_dsn
from tiers.errors import DatabaseError

# The advisory lock key all runs share: "tiers" in ASCII, as a bigint.
LOCK_KEY = 0x7469657273

_LOCK_SQL = "SELECT pg_advisory_xact_lock(%s)"
_CREATE_TABLE_SQL = (
    "CREATE TABLE IF NOT EXISTS tiers_schema_migrations ("
    " name text PRIMARY KEY,"
    " applied_at timestamptz NOT NULL DEFAULT now())"
)
_APPLIED_SQL = "SELECT 1 FROM tiers_schema_migrations WHERE name = %s"
_RECORD_SQL = "INSERT INTO tiers_schema_migrations (name, applied_at) VALUES (%s, now())"


def migration_files(directory: Path) -> list[Path]:
    """The ``*.sql`` files directly in ``directory``, sorted by name.

    Hidden files (editor leftovers such as ``.001_init.sql.swp`` or
    ``.#x.sql``) are ignored. Raises DatabaseError if the directory is missing.
    """
    if not directory.is_dir():
        raise DatabaseError(f"{directory}: migrations directory not found")
    files = [
        path
        for path in directory.iterdir()
        if path.suffix == ".sql" and not path.name.startswith(".") and path.is_file()
    ]
    return sorted(files, key=lambda path: path.name)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatabaseError(f"{path}: cannot read migration: {exc}") from exc


def _apply_one(conn: psycopg.Connection[TupleRow], path: Path) -> bool:
    """Apply one file in one transaction unless it is recorded; True if applied now."""
    text = _read(path)
    with conn.transaction():
        conn.execute(_LOCK_SQL, (LOCK_KEY,))
        if conn.execute(_APPLIED_SQL, (path.name,)).fetchone() is not None:
            return False
        if text.strip():
            # No parameters, so psycopg sends the simple query protocol and a
            # file may hold several statements.
            conn.execute(text.encode("utf-8"))
        conn.execute(_RECORD_SQL, (path.name,))
    return True


def apply_migrations(dsn: str, directory: Path) -> list[str]:
    """Apply the pending ``*.sql`` files of ``directory`` to the database at ``dsn``.

    Returns the names applied by this call, in order (empty if all were
    applied before). Stops at the first file that fails, leaving it and the
    later ones unapplied; raises DatabaseError naming that file. Safe to run
    again and concurrently with itself.
    """
    files = migration_files(directory)
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot connect to {describe_dsn(dsn)}: {exc}") from exc
    with conn:
        return apply_files(conn, files, where=describe_dsn(dsn))


def apply_files(
    conn: psycopg.Connection[TupleRow], files: Sequence[Path], *, where: str = "the database"
) -> list[str]:
    """Apply ``files`` in the given order over ``conn`` (autocommit on); see apply_migrations."""
    try:
        # Under the lock too: two concurrent CREATE TABLE IF NOT EXISTS can
        # both miss the table and one then fails on the catalog's unique index.
        with conn.transaction():
            conn.execute(_LOCK_SQL, (LOCK_KEY,))
            conn.execute(_CREATE_TABLE_SQL)
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot create tiers_schema_migrations in {where}: {exc}") from exc
    applied: list[str] = []
    for path in files:
        try:
            if _apply_one(conn, path):
                applied.append(path.name)
        except psycopg.Error as exc:
            raise DatabaseError(f"{path}: migration failed: {exc}") from exc
    return applied


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tiers.db.migrate",
        description="Apply *.sql migrations in name order, each once.",
    )
    parser.add_argument("--dsn", required=True, help="libpq conninfo or URI of the primary")
    parser.add_argument("--dir", required=True, type=Path, help="directory of *.sql files")
    args = parser.parse_args(argv)
    try:
        applied = apply_migrations(args.dsn, args.dir)
    except DatabaseError as exc:
        print(f"migrate: {exc}", file=sys.stderr)
        return 1
    for name in applied:
        print(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
