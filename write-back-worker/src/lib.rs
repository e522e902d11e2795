//! The write-back worker: consumes the write-back keyspaces' Kafka topics and
//! stores their records in PostgreSQL.
//!
//! Not built yet: the write-back issue adds it on top of the keyspace config,
//! the version clock and the store of the strategies issue.
