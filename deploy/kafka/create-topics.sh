#!/bin/sh
# Creates the write-back topics of ringcache on an Apache Kafka cluster:
# one per write-back keyspace, plus the worker's dead-letter topic.
#
#   KAFKA_HOME=/opt/kafka BOOTSTRAP=kafka-1:9092 \
#     deploy/kafka/create-topics.sh sessions carts
#
# Replication 3 with min.insync.replicas=2: an acknowledged (acks=all) write
# is on two brokers at least. No compaction (a tombstone is a delete to
# apply, not a key to forget); retention must outlast the longest PostgreSQL
# outage to ride out (7 days here). A single-broker cluster (docker-compose)
# runs it with REPLICATION=1 MIN_INSYNC_REPLICAS=1.
set -eu

: "${BOOTSTRAP:?set BOOTSTRAP to the Kafka bootstrap servers}"
KAFKA_TOPICS="${KAFKA_HOME:-/opt/kafka}/bin/kafka-topics.sh"
PARTITIONS="${PARTITIONS:-12}"
REPLICATION="${REPLICATION:-3}"
MIN_INSYNC_REPLICAS="${MIN_INSYNC_REPLICAS:-2}"
DEAD_LETTER_TOPIC="${DEAD_LETTER_TOPIC:-ringcache-dead-letters}"

if [ "$#" -eq 0 ]; then
    echo "usage: $0 KEYSPACE..." >&2
    exit 2
fi

create() {
    "$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists \
        --topic "$1" --partitions "$2" --replication-factor "$REPLICATION" \
        --config min.insync.replicas="$MIN_INSYNC_REPLICAS" \
        --config cleanup.policy=delete \
        --config retention.ms=604800000
}

for keyspace in "$@"; do
    create "ringcache-wb-$keyspace" "$PARTITIONS"
done
create "$DEAD_LETTER_TOPIC" 1
