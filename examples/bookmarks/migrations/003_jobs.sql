-- What the site's background jobs keep (bookmarks.tasks).
--
-- fetched_at: when the title job last fetched the entry's page; an entry saved
-- without a title (its URL standing in) gets the fetched title.
ALTER TABLE entries ADD COLUMN fetched_at timestamptz;

-- The hot ranking's counts, recomputed every minute by the cron job
-- bookmarks.rank_hot: per entry, its bookmarks in the ranking's window as of
-- hot_counts_meta.computed_at. The front page adds the bookmarks made since
-- (bookmarks_recent makes that a short index scan), so the ranking counts a new
-- bookmark at once while the long aggregation runs once a minute, not per page.
CREATE TABLE hot_counts (
    entry_id bigint PRIMARY KEY REFERENCES entries (id) ON DELETE CASCADE,
    recent   integer NOT NULL,
    latest   timestamptz NOT NULL
);

CREATE TABLE hot_counts_meta (
    one         boolean PRIMARY KEY DEFAULT true CHECK (one),
    computed_at timestamptz NOT NULL
);
