//! `cachectl dlq`: list the write-back worker's dead letters, and replay
//! them to the write-back topics they came from, where the worker applies
//! them through the store's version guard (`cache_client::dead_letter`).

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use cache_client::dead_letter::{self, DeadLetterRecord, Filter};
use rdkafka::{
    ClientConfig,
    message::{Header, OwnedHeaders},
    producer::FutureRecord,
};
use serde_json::json;

/// How long one broker call (metadata, watermarks, a produce) may take.
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);

/// Which dead letters, from which topic.
#[derive(clap::Args)]
pub(crate) struct Selection {
    /// The dead-letter topic (the worker's `dead_letter_topic`).
    #[arg(long, env = "RINGCACHE_WB_DEAD_LETTER_TOPIC", default_value = dead_letter::DEFAULT_TOPIC)]
    topic: String,
    /// Only dead letters of this keyspace.
    #[arg(long)]
    keyspace: Option<String>,
    /// Only dead letters whose key starts with this text.
    #[arg(long)]
    key_prefix: Option<String>,
}

impl Selection {
    fn filter(&self) -> Filter {
        Filter {
            keyspace: self.keyspace.clone(),
            key_prefix: self.key_prefix.clone().map(Bytes::from),
        }
    }
}

#[derive(clap::Subcommand)]
pub(crate) enum DlqOp {
    /// List the dead letters: keyspace, key, version, reason, origin.
    List(Selection),
    /// Produce the dead letters again to their write-back topics; the worker
    /// stores each one unless the store holds a newer version of its key.
    Replay {
        #[command(flatten)]
        selection: Selection,
        /// Show what would be replayed, and produce nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Runs `cachectl dlq`.
pub(crate) async fn run(op: DlqOp, brokers: Option<&str>, json: bool) -> anyhow::Result<()> {
    let Some(brokers) = brokers else {
        bail!("dlq commands need --brokers (or RINGCACHE_KAFKA_BROKERS)");
    };
    let (selection, replay, dry_run) = match &op {
        DlqOp::List(selection) => (selection, false, false),
        DlqOp::Replay { selection, dry_run } => (selection, true, *dry_run),
    };
    let filter = selection.filter();
    let letters: Vec<DeadLetterRecord> = read_all(brokers, &selection.topic)
        .await?
        .into_iter()
        .filter(|letter| letter.matches(&filter))
        .collect();
    if !replay {
        return list(&letters, json);
    }
    let mut producer = None;
    if !dry_run {
        let mut kafka = ClientConfig::new();
        kafka
            .set("bootstrap.servers", brokers)
            .set("message.timeout.ms", BROKER_TIMEOUT.as_millis().to_string());
        producer = Some(
            cache_client::producer::ResilientProducer::new(kafka, true)
                .context("cannot create the Kafka producer")?,
        );
    }
    let (mut replayed, mut skipped, mut rows) = (0usize, 0usize, Vec::new());
    for letter in &letters {
        let mut row = describe(letter);
        match letter.replay(&selection.topic) {
            Err(e) => {
                skipped += 1;
                row["skipped"] = json!(format!("not a write-back record: {e}"));
            }
            Ok(again) => {
                if let Some(producer) = &producer {
                    let mut headers = OwnedHeaders::new_with_capacity(again.headers.len());
                    for (key, value) in &again.headers {
                        headers = headers.insert(Header {
                            key,
                            value: value.as_deref(),
                        });
                    }
                    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&again.topic)
                        .key(&again.key[..])
                        .headers(headers);
                    if let Some(value) = &again.value {
                        record = record.payload(&value[..]);
                    }
                    producer
                        .send(record, BROKER_TIMEOUT)
                        .await
                        .with_context(|| {
                            format!(
                                "cannot produce the replay of {}/{}/{} to {} ({replayed} replayed before it)",
                                selection.topic, letter.partition, letter.offset, again.topic
                            )
                        })?;
                }
                replayed += 1;
                row["to"] = json!(again.topic);
            }
        }
        rows.push(row);
    }
    if json {
        println!(
            "{}",
            json!({"dry_run": dry_run, "replayed": replayed, "skipped": skipped, "records": rows})
        );
    } else {
        for row in &rows {
            let what = format!(
                "{} {} version {}",
                row["keyspace"].as_str().unwrap_or("?"),
                row["key"].as_str().unwrap_or("?"),
                row["version"]
            );
            match (row["to"].as_str(), row["skipped"].as_str()) {
                (Some(to), _) if dry_run => println!("would replay {what} to {to}"),
                (Some(to), _) => println!("replayed {what} to {to}"),
                (None, Some(why)) => println!("skipped {}: {why}", row["at"]),
                (None, None) => {}
            }
        }
        let verb = if dry_run { "would replay" } else { "replayed" };
        println!(
            "{verb} {replayed} of {} dead letters ({skipped} not replayable)",
            letters.len()
        );
    }
    Ok(())
}

/// One dead letter as JSON.
fn describe(letter: &DeadLetterRecord) -> serde_json::Value {
    let (keyspace, key) = match letter.keyspace_and_key() {
        Some((keyspace, key)) => (
            Some(keyspace.to_owned()),
            Some(String::from_utf8_lossy(key).into_owned()),
        ),
        None => (None, None),
    };
    let record = letter.record();
    let number = |name: &str| letter.header(name).and_then(|v| v.parse::<i64>().ok());
    json!({
        "at": format!("{}/{}", letter.partition, letter.offset),
        "keyspace": keyspace,
        "key": key,
        "version": record.as_ref().ok().map(|r| r.version),
        "delete": letter.value.is_none(),
        "value_bytes": letter.value.as_ref().map(Bytes::len),
        "reason": letter.reason(),
        "topic": letter.header(dead_letter::HEADER_TOPIC),
        "partition": number(dead_letter::HEADER_PARTITION),
        "offset": number(dead_letter::HEADER_OFFSET),
        "group": letter.header(dead_letter::HEADER_GROUP),
        "attempts": number(dead_letter::HEADER_ATTEMPTS),
        "moved_at_ms": number(dead_letter::HEADER_AT),
        "replayable": record.is_ok(),
    })
}

fn list(letters: &[DeadLetterRecord], json: bool) -> anyhow::Result<()> {
    let rows: Vec<serde_json::Value> = letters.iter().map(describe).collect();
    if json {
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:<10} {:<16} {:<24} {:>20}  REASON",
        "AT", "KEYSPACE", "KEY", "VERSION"
    );
    for row in &rows {
        let version = row["version"]
            .as_u64()
            .map_or("-".to_owned(), |v| v.to_string());
        println!(
            "{:<10} {:<16} {:<24} {:>20}  {}",
            row["at"].as_str().unwrap_or(""),
            row["keyspace"].as_str().unwrap_or("-"),
            row["key"].as_str().unwrap_or("-"),
            version,
            row["reason"].as_str().unwrap_or("")
        );
    }
    println!("{} dead letters", rows.len());
    Ok(())
}

/// Every record of `topic` up to its high watermarks now; none when the
/// topic does not exist. Reads without joining a group or committing.
async fn read_all(brokers: &str, topic: &str) -> anyhow::Result<Vec<DeadLetterRecord>> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || read_all_blocking(&brokers, &topic))
        .await
        .context("the topic reader panicked")?
}

fn read_all_blocking(brokers: &str, topic: &str) -> anyhow::Result<Vec<DeadLetterRecord>> {
    Ok(dead_letter::read_topic(
        brokers,
        topic,
        "cachectl-dlq",
        BROKER_TIMEOUT,
    )?)
}
