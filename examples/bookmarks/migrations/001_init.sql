-- Entries are pages people bookmark, one row per URL; bookmarks are one
-- per user per entry (saving again replaces the comment).
-- The length limits repeat the app's validation, so no other writer can
-- store what the pages were not designed to show.

CREATE TABLE entries (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url        text NOT NULL UNIQUE CHECK (length(url) BETWEEN 1 AND 2048),
    title      text NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX entries_recent ON entries (created_at DESC, id DESC);

CREATE TABLE bookmarks (
    entry_id   bigint NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
    user_name  text NOT NULL CHECK (user_name ~ '^[A-Za-z][A-Za-z0-9_-]{1,31}$'),
    comment    text NOT NULL DEFAULT '' CHECK (length(comment) <= 100),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (entry_id, user_name)
);

-- Hot entries count the bookmarks of a recent window.
CREATE INDEX bookmarks_recent ON bookmarks (created_at);
-- An entry's page lists its bookmarks newest first.
CREATE INDEX bookmarks_by_entry ON bookmarks (entry_id, created_at DESC);
