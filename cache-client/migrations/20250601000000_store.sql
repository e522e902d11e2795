-- The shared table of the `default` store layout: every keyspace's rows,
-- keyed by keyspace and key. A NULL value is a tombstone: the key is
-- deleted at `version`, so that an older write arriving late cannot bring
-- it back.
CREATE TABLE ringcache_entries (
    keyspace   TEXT        NOT NULL,
    key        BYTEA       NOT NULL,
    value      BYTEA       NULL,
    version    BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (keyspace, key)
);

-- Two-phase-commit bookkeeping, for every layout: which keyspace and key a
-- prepared transaction writes, so that recovery can invalidate the cached
-- entry after resolving it. The row is inserted (and committed) just before
-- the transaction begins, since a row written inside it would stay invisible
-- until the commit, and deleted after COMMIT/ROLLBACK PREPARED. The
-- transaction itself never touches it, so a reused gid fails at once on the
-- primary key instead of waiting for the prepared transaction's locks.
CREATE TABLE ringcache_2pc (
    gid        TEXT        PRIMARY KEY,
    keyspace   TEXT        NOT NULL,
    key        BYTEA       NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
