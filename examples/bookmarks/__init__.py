"""bookmarks: a small social bookmarking site, the demo service tiers runs by default.

People save a URL with a comment; the home page lists recent entries and the
ones most bookmarked in the last day; each entry's page lists who saved it
and what they said. Reads go to a replica, writes to the primary, and a
causal token in a signed cookie (``tiers.app.causal``, keyed by
``TIERS_SECRET_KEY``) makes every page show the reader's own last write.

Import ``bookmarks.app:app`` with ``examples/`` on ``sys.path``; the database
comes from ``TIERS_DB_PRIMARY`` and ``TIERS_DB_REPLICAS`` and the schema from
``migrations/`` (apply with ``python -m tiers.db.migrate``).
"""

from pathlib import Path

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
