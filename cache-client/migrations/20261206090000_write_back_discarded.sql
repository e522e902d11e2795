-- Write-back writes the worker will never store: records the database
-- refused for good, which went to the dead-letter topic. Written in the same
-- transaction as the offsets of the batch that skipped them, so that the
-- worker's repair round can still discard their dirty cache entries when
-- the discard sent after the commit was lost (a crash, a node unreachable):
-- such an entry is neither in the store nor on its way to it.
CREATE TABLE ringcache_wb_discarded (
    keyspace     TEXT        NOT NULL,
    record_key   BYTEA       NOT NULL,
    version      BIGINT      NOT NULL,
    discarded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (keyspace, record_key, version)
);
