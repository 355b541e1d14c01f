-- Stars: a user marks an entry. The table is sharded by user name: every
-- cluster has it, and a user's rows live on the cluster holding the user's
-- virtual shard (TIERS_DB_SHARDS; without it, on main). So there is no
-- foreign key to entries, which may live on another cluster.
--
-- Ids come from tiers_next_id(shard), below: 41 bits of milliseconds, the
-- user's virtual shard, 10 bits of a per-cluster sequence. Every cluster
-- that may hold shards needs the function, and every cluster gets every
-- migration. The function is tiers.db.ids.next_id_ddl() written out (with
-- its default bound of 8192 virtual shards, so any configured count fits);
-- tests/unit/examples/test_bookmarks_store.py checks that the two agree.

CREATE SEQUENCE IF NOT EXISTS tiers_id_seq AS bigint;

CREATE OR REPLACE FUNCTION tiers_next_id(shard int) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $tiers$
DECLARE
    millis bigint;
    seq bigint;
BEGIN
    IF shard IS NULL OR shard < 0 OR shard >= 8192 THEN
        RAISE EXCEPTION 'tiers_next_id: shard % is outside 0..8191', shard
            USING ERRCODE = 'numeric_value_out_of_range';
    END IF;
    millis := floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint - 1767225600000;
    IF millis < 0 OR millis > 1099511627775 THEN
        RAISE EXCEPTION 'tiers_next_id: clock is outside the id time range'
            USING ERRCODE = 'numeric_value_out_of_range';
    END IF;
    seq := 0 + nextval('tiers_id_seq') % 1024;
    RETURN (millis << 23) | (shard::bigint << 10) | seq;
END
$tiers$;

CREATE TABLE stars (
    id         bigint PRIMARY KEY,
    user_name  text NOT NULL CHECK (user_name ~ '^[A-Za-z][A-Za-z0-9_-]{1,31}$'),
    entry_id   bigint NOT NULL CHECK (entry_id > 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    -- One star per user per entry; starring again changes nothing.
    UNIQUE (user_name, entry_id)
);

-- A user's page lists their stars newest first; ids sort by creation time.
CREATE INDEX stars_by_user ON stars (user_name, id DESC);
