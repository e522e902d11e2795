-- Dead letters moved to a Kafka topic (the worker's `dead_letter_topic`),
-- where the rest of the write-back pipeline lives and operators replay
-- from. The table is no longer written.
DROP TABLE IF EXISTS ringcache_wb_dead_letters;
