"""bookmarks: a small social bookmarking site, the demo service tiers runs by default.

People save a URL with a comment; the home page lists recent entries and the
ones most bookmarked in the last day; each entry's page lists who saved it
and what they said. Reads go to a replica, writes to the primary, and a
causal token in a signed cookie (``tiers.app.causal``, keyed by
``TIERS_SECRET_KEY``) makes every page show the reader's own last write.

People may also star entries; stars are sharded by user name, and with a
topology of several clusters each user's stars live on the cluster of the
user's virtual shard (see ``bookmarks.store`` for what lives where).

Import ``bookmarks.app:app`` with ``examples/`` on ``sys.path``; the database
comes from ``TIERS_DB_PRIMARY`` and ``TIERS_DB_REPLICAS`` (and, with more
clusters, ``TIERS_DB_CLUSTERS``, ``TIERS_DB_TABLES``, ``TIERS_DB_SHARDS``) and
the schema from ``migrations/``, applied to every cluster (apply with
``python -m tiers.db.migrate``).
"""

from pathlib import Path

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
