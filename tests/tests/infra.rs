//! The services `cargo xtask test` provides work as the rest of the suite
//! expects: PostgreSQL with two-phase commit, and a Kafka broker with
//! idempotent produce, consumer groups and offset commits.
//!
//! When one of these fails, fix the environment before reading any other
//! failure: later tests build on exactly these features.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use rdkafka::{
    ClientConfig, Message, Offset,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{CommitMode, Consumer, StreamConsumer},
    producer::{FutureProducer, FutureRecord},
};
use ringcache_tests::{kafka_brokers, pg_url};
use sqlx::{Connection, PgConnection, Row};

/// Upper bound for any single broker operation in these tests. Generous: a
/// consumer group join alone takes a few seconds.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(60);

/// How many messages the broker test round-trips.
const MESSAGES: usize = 5;

/// A name no other test (or earlier run against the same service) uses.
fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}_{}_{nanos}", std::process::id())
}

#[tokio::test]
async fn postgres_supports_two_phase_commit() -> Result<()> {
    let url = pg_url()?;
    let mut conn = PgConnection::connect(&url)
        .await
        .with_context(|| format!("failed to connect to PostgreSQL at {url}"))?;

    let max_prepared: i64 =
        sqlx::query_scalar("SELECT current_setting('max_prepared_transactions')::bigint")
            .fetch_one(&mut conn)
            .await
            .context("failed to read max_prepared_transactions")?;
    ensure!(
        max_prepared > 0,
        "max_prepared_transactions is 0, so PREPARE TRANSACTION cannot work; the server \
         `cargo xtask test` starts sets it to 64"
    );

    let table = unique("infra_2pc");
    let gid = unique("infra_gid");
    sqlx::raw_sql(&format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
        .execute(&mut conn)
        .await
        .context("failed to create the test table")?;

    // The simple-query protocol (`raw_sql`) keeps BEGIN ... PREPARE on one
    // connection without sqlx's transaction bookkeeping, which knows nothing
    // of prepared transactions.
    sqlx::raw_sql(&format!(
        "BEGIN; INSERT INTO {table} VALUES (1); PREPARE TRANSACTION '{gid}'"
    ))
    .execute(&mut conn)
    .await
    .context("PREPARE TRANSACTION failed")?;

    // Prepared but not committed: invisible to everyone, listed as prepared.
    let mut observer = PgConnection::connect(&url)
        .await
        .context("failed to open a second connection")?;
    let visible: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&mut observer)
        .await?;
    ensure!(
        visible == 0,
        "a prepared transaction's row is visible before COMMIT PREPARED"
    );
    let prepared = sqlx::query("SELECT gid FROM pg_prepared_xacts WHERE gid = $1")
        .bind(&gid)
        .fetch_optional(&mut observer)
        .await?;
    ensure!(
        prepared.is_some(),
        "transaction {gid} is missing from pg_prepared_xacts"
    );

    // Any session may finish a prepared transaction; use the other one to
    // prove it is no longer tied to the session that prepared it.
    sqlx::raw_sql(&format!("COMMIT PREPARED '{gid}'"))
        .execute(&mut observer)
        .await
        .context("COMMIT PREPARED failed")?;
    let row = sqlx::query(&format!("SELECT count(*) AS n FROM {table}"))
        .fetch_one(&mut conn)
        .await?;
    ensure!(
        row.get::<i64, _>("n") == 1,
        "the committed row is not visible"
    );

    sqlx::raw_sql(&format!("DROP TABLE {table}"))
        .execute(&mut conn)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_round_trips_idempotent_messages_through_a_consumer_group() -> Result<()> {
    let brokers = kafka_brokers()?;
    let topic = unique("infra_topic");
    let group = unique("infra_group");

    // The broker may not auto-create topics, and later tests must not rely
    // on it either.
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .context("failed to create the Kafka admin client")?;
    let results = admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(KAFKA_TIMEOUT)),
        )
        .await
        .with_context(|| format!("failed to create topic {topic} on {brokers}"))?;
    for result in results {
        if let Err((name, code)) = result {
            bail!("creating topic {name} failed: {code}");
        }
    }

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .create()
        .context("failed to create the idempotent producer")?;
    for i in 0..MESSAGES {
        let key = format!("key-{i}");
        let payload = format!("value-{i}");
        producer
            .send(
                FutureRecord::to(&topic).key(&key).payload(&payload),
                KAFKA_TIMEOUT,
            )
            .await
            .map_err(|(err, _)| err)
            .with_context(|| format!("failed to produce message {i} to {topic}"))?;
    }

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        // The defaults make a group join take ~20 s against tansu.
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("max.poll.interval.ms", "10000")
        .create()
        .context("failed to create the consumer")?;
    consumer
        .subscribe(&[&topic])
        .context("failed to subscribe")?;

    let mut last_offset = None;
    for i in 0..MESSAGES {
        let message = tokio::time::timeout(KAFKA_TIMEOUT, consumer.recv())
            .await
            .with_context(|| format!("no message {i} from {topic} within {KAFKA_TIMEOUT:?}"))?
            .with_context(|| format!("failed to consume message {i}"))?;
        let payload = message
            .payload()
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        ensure!(
            payload == format!("value-{i}"),
            "message {i} came back as {payload:?}"
        );
        last_offset = Some(message.offset());
        consumer
            .commit_message(&message, CommitMode::Sync)
            .with_context(|| format!("failed to commit message {i}"))?;
    }

    // The committed offset is the next one to read: last + 1.
    let committed = consumer
        .committed(KAFKA_TIMEOUT)
        .context("failed to read the committed offsets")?;
    let offset = committed
        .find_partition(&topic, 0)
        .map(|p| p.offset())
        .context("no committed offset for partition 0")?;
    let expected = last_offset.context("no message consumed")? + 1;
    ensure!(
        offset == Offset::Offset(expected),
        "committed offset is {offset:?}, expected {expected}"
    );
    Ok(())
}
