-- The write-back worker's consumed offsets: the next Kafka offset to read
-- per consumer group, topic and partition. Written in the same transaction
-- as the rows of the batch it consumed, so that the rows and the offset
-- never disagree; on assignment the worker seeks to `next_offset`.
CREATE TABLE ringcache_wb_offsets (
    consumer_group  TEXT        NOT NULL,
    topic           TEXT        NOT NULL,
    kafka_partition INTEGER     NOT NULL,
    next_offset     BIGINT      NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, kafka_partition)
);

-- Write-back records that can never be applied (malformed, a version above
-- i64::MAX, rejected by the store), as they came from Kafka. Written in the
-- same transaction as the batch's offsets, so a record is either applied,
-- dead-lettered, or still to be consumed. `headers` is a JSON array of
-- [name, hex value or null]. The unique constraint keeps a replayed batch
-- from dead-lettering a record twice.
CREATE TABLE ringcache_wb_dead_letters (
    id              BIGSERIAL   PRIMARY KEY,
    consumer_group  TEXT        NOT NULL,
    topic           TEXT        NOT NULL,
    kafka_partition INTEGER     NOT NULL,
    kafka_offset    BIGINT      NOT NULL,
    record_key      BYTEA       NULL,
    record_value    BYTEA       NULL,
    headers         JSONB       NOT NULL,
    error           TEXT        NOT NULL,
    dead_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (consumer_group, topic, kafka_partition, kafka_offset)
);
