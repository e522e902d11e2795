//! The operator's tools against real processes (issue 18): `cachectl dlq
//! list` and `replay` over a worker's real dead-letter topic, `cachectl
//! flush` and `cachectl topology` against node processes, the client's
//! topology gauges in the example service's `/metrics`, and the worker's
//! gauges of PostgreSQL's prepared transactions.
//!
//! Waits poll what the processes expose (rows, topics, `/metrics`) against
//! a deadline.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use cache_client::writeback::{WriteBackRecord, topic_for};
use cache_client::{Client, ClientConfig, SetOptions};
use ringcache_tests::{
    NodeConfig, NodeProcess, ServiceConfig, ServiceProcess, WorkerConfig, WorkerExtra,
    WorkerProcess, cluster, kafka_brokers, node_binary, own_database, pg_url, unique,
    write_back::{
        Expected, RecordProducer, metric_sum, read_topic, rows_moved_backwards, scrape,
        stored_offsets, wait_stored, watch_row_changes,
    },
};
use tokio::time::Instant;

/// Upper bound for a worker to catch up, a broker call, a process to start.
const TIMEOUT: Duration = Duration::from_secs(90);
/// How often a wait looks again.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// Runs `cachectl` with `args`; its success, stdout and stderr.
fn cachectl(args: &[&str]) -> Result<(bool, String, String)> {
    let binary = node_binary()?.with_file_name("cachectl");
    let mut command = std::process::Command::new(&binary);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("RINGCACHE_") {
            command.env_remove(name);
        }
    }
    let out = command.args(args).output().with_context(|| {
        format!(
            "cannot run {} (built by cargo build --bins)",
            binary.display()
        )
    })?;
    Ok((
        out.status.success(),
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

/// Runs `cachectl` and fails unless it exits 0.
fn cachectl_ok(args: &[&str]) -> Result<String> {
    let (ok, out, err) = cachectl(args)?;
    ensure!(ok, "cachectl {args:?} failed:\n{err}\n{out}");
    Ok(out)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

fn record(keyspace: &str, key: &str, version: u64, value: &str) -> WriteBackRecord {
    WriteBackRecord {
        keyspace: keyspace.to_owned(),
        key: Bytes::copy_from_slice(key.as_bytes()),
        version,
        value: Some(Bytes::copy_from_slice(value.as_bytes())),
        written_at_ms: now_ms(),
        replicas: 0,
    }
}

fn expect(rows: &[(&str, &str, i64)]) -> Expected {
    rows.iter()
        .map(|(k, v, version)| {
            (
                k.as_bytes().to_vec(),
                (Some(v.as_bytes().to_vec()), *version),
            )
        })
        .collect()
}

/// Waits until `group` stored offsets summing to `records` for the
/// keyspace's topic (every record consumed: applied, stale or
/// dead-lettered).
async fn wait_consumed(
    pool: &sqlx::PgPool,
    worker: &mut WorkerProcess,
    group: &str,
    keyspace: &str,
    records: i64,
) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        worker.ensure_running()?;
        let consumed: i64 = stored_offsets(pool, group, keyspace).await?.values().sum();
        if consumed >= records {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{consumed} of {records} records consumed after {TIMEOUT:?}; worker log:\n{}",
                worker.log_tail(40)
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// `cachectl dlq list`'s JSON: one object per dead letter.
fn dlq_list(brokers: &str, topic: &str, filter: &[&str]) -> Result<Vec<serde_json::Value>> {
    let mut args = vec![
        "--brokers",
        brokers,
        "--json",
        "dlq",
        "list",
        "--topic",
        topic,
    ];
    args.extend_from_slice(filter);
    let out = cachectl_ok(&args)?;
    let listed: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("dlq list printed no JSON: {out}"))?;
    listed
        .as_array()
        .cloned()
        .with_context(|| format!("dlq list printed no array: {out}"))
}

/// A dead-lettered write comes back through `cachectl dlq replay` once its
/// cause is fixed, and goes through the worker's version guard: the replay
/// of a dead letter older than the stored row leaves the row alone. The
/// filter and the dry run replay only what they say.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_stores_dead_letters_and_never_overwrites_a_newer_row() -> Result<()> {
    let brokers = kafka_brokers()?;
    let (url, store) = own_database("rc_ops_dlq").await?;
    let pool = store.pool().clone();
    watch_row_changes(&pool).await?;
    sqlx::query(
        "ALTER TABLE ringcache_entries ADD CONSTRAINT no_poison \
         CHECK (value IS NULL OR value <> 'poison'::bytea)",
    )
    .execute(&pool)
    .await?;
    let keyspace = unique("opsdlq");
    let group = format!("{keyspace}_group");
    let producer = RecordProducer::create(&brokers, &keyspace, 2, TIMEOUT).await?;
    let config = WorkerConfig {
        brokers: brokers.clone(),
        database_url: url,
        group: group.clone(),
        keyspaces: vec![keyspace.clone()],
        cache_seeds: Vec::new(),
    };
    let dlq_topic = config.dead_letter_topic();
    let mut worker = WorkerProcess::start_with(
        config,
        WorkerExtra {
            args: vec!["--dead-letter-after-attempts".into(), "2".into()],
            env: Vec::new(),
        },
    )?;

    // `poisoned-a` (version 5) and `poisoned-b` (version 3) are refused and
    // dead-lettered; `poisoned-b` is then written again at version 9.
    for r in [
        record(&keyspace, "fine", 1, "ok"),
        record(&keyspace, "poisoned-a", 5, "poison"),
        record(&keyspace, "poisoned-b", 3, "poison"),
    ] {
        producer.produce(&r).await?;
    }
    wait_consumed(&pool, &mut worker, &group, &keyspace, 3).await?;
    producer
        .produce(&record(&keyspace, "poisoned-b", 9, "newer"))
        .await?;
    let stored = expect(&[("fine", "ok", 1), ("poisoned-b", "newer", 9)]);
    wait_stored(&pool, &mut worker, &keyspace, &stored, TIMEOUT).await?;

    // The list shows both, with the write's keyspace, key, version and why.
    let listed = dlq_list(&brokers, &dlq_topic, &[])?;
    ensure!(listed.len() == 2, "dead letters: {listed:?}");
    let by_key: BTreeMap<String, &serde_json::Value> = listed
        .iter()
        .map(|l| (l["key"].as_str().unwrap_or_default().to_owned(), l))
        .collect();
    let a = by_key.get("poisoned-a").context("poisoned-a is listed")?;
    ensure!(a["keyspace"] == keyspace.as_str(), "{a}");
    ensure!(a["version"] == 5, "{a}");
    ensure!(
        a["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no_poison")),
        "{a}"
    );
    ensure!(a["replayable"] == true, "{a}");
    ensure!(by_key.get("poisoned-b").is_some_and(|b| b["version"] == 3));
    // The filters.
    ensure!(dlq_list(&brokers, &dlq_topic, &["--key-prefix", "poisoned-a"])?.len() == 1);
    ensure!(dlq_list(&brokers, &dlq_topic, &["--keyspace", "no-such-keyspace"])?.is_empty());
    // Text output names them too.
    let text = cachectl_ok(&["--brokers", &brokers, "dlq", "list", "--topic", &dlq_topic])?;
    ensure!(
        text.contains("poisoned-a") && text.contains("no_poison"),
        "{text}"
    );

    // A dry run produces nothing.
    let before = read_topic(&brokers, &topic_for(&keyspace)).await?.len();
    let out = cachectl_ok(&[
        "--brokers",
        &brokers,
        "dlq",
        "replay",
        "--topic",
        &dlq_topic,
        "--dry-run",
    ])?;
    ensure!(out.contains("poisoned-a"), "{out}");
    ensure!(
        read_topic(&brokers, &topic_for(&keyspace)).await?.len() == before,
        "a dry run produced records"
    );

    // The cause is fixed; only `poisoned-a` is replayed, and stored.
    sqlx::query("ALTER TABLE ringcache_entries DROP CONSTRAINT no_poison")
        .execute(&pool)
        .await?;
    let out = cachectl_ok(&[
        "--brokers",
        &brokers,
        "--json",
        "dlq",
        "replay",
        "--topic",
        &dlq_topic,
        "--keyspace",
        &keyspace,
        "--key-prefix",
        "poisoned-a",
    ])?;
    let replayed: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(replayed["replayed"] == 1, "{replayed}");
    let stored = expect(&[
        ("fine", "ok", 1),
        ("poisoned-a", "poison", 5),
        ("poisoned-b", "newer", 9),
    ]);
    wait_stored(&pool, &mut worker, &keyspace, &stored, TIMEOUT).await?;

    // Replaying everything: `poisoned-a` again (a duplicate) and
    // `poisoned-b` at version 3, older than the stored 9. Both are
    // consumed and neither changes a row.
    let out = cachectl_ok(&[
        "--brokers",
        &brokers,
        "--json",
        "dlq",
        "replay",
        "--topic",
        &dlq_topic,
    ])?;
    let replayed: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(replayed["replayed"] == 2, "{replayed}");
    let total = read_topic(&brokers, &topic_for(&keyspace)).await?.len() as i64;
    ensure!(total == 7, "4 records and 3 replays, not {total}");
    wait_consumed(&pool, &mut worker, &group, &keyspace, total).await?;
    ensure!(
        ringcache_tests::write_back::rows(&pool, &keyspace).await? == stored,
        "a replay changed a row"
    );
    let backwards = rows_moved_backwards(&pool, &keyspace).await?;
    ensure!(backwards.is_empty(), "rows moved backwards: {backwards:?}");
    // Nothing was dead-lettered again.
    ensure!(dlq_list(&brokers, &dlq_topic, &[])?.len() == 2);
    Ok(())
}

/// `cachectl flush` refuses without `--yes`, flushes one keyspace of one
/// node with `--node`, and every keyspace of every member with
/// `--all-keyspaces`.
#[tokio::test]
async fn cachectl_flush_empties_one_node_or_every_member() -> Result<()> {
    let nodes = cluster(2).await?;
    let seeds = nodes
        .iter()
        .map(|n| n.addr().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let client = Client::connect(ClientConfig::new(
        nodes
            .iter()
            .map(|n| n.addr().to_string())
            .collect::<Vec<_>>(),
    ))
    .await?;
    let keys: Vec<String> = (0..40).map(|i| format!("key-{i}")).collect();
    for keyspace in ["default", "other"] {
        for key in &keys {
            client
                .set(
                    keyspace,
                    key,
                    Bytes::from_static(b"v"),
                    SetOptions::new().version(1),
                )
                .await?;
        }
    }
    let first = nodes[0].config().node_id.clone();
    let owned_by_first = |key: &String| {
        client
            .owners("default", key.as_bytes())
            .first()
            .is_some_and(|owner| *owner == first)
    };
    ensure!(keys.iter().any(owned_by_first) && !keys.iter().all(owned_by_first));
    let cached = |keyspace: &'static str| {
        let client = &client;
        let keys = &keys;
        async move {
            let raw: Vec<Bytes> = keys.iter().map(|k| Bytes::from(k.clone())).collect();
            let found = client.multi_get(keyspace, &raw).await?;
            anyhow::Ok(
                keys.iter()
                    .zip(found)
                    .filter(|(_, e)| e.is_some())
                    .map(|(k, _)| k.clone())
                    .collect::<Vec<_>>(),
            )
        }
    };

    let (ok, _, err) = cachectl(&["--seeds", &seeds, "flush", "--all-keyspaces"])?;
    ensure!(!ok && err.contains("--yes"), "flush without --yes: {err}");
    ensure!(cached("default").await?.len() == keys.len());

    let first_addr = nodes[0].addr().to_string();
    let out = cachectl_ok(&[
        "--seeds",
        &seeds,
        "flush",
        "--yes",
        "--node",
        &first_addr,
        "--keyspace",
        "default",
    ])?;
    ensure!(out.contains(&first), "{out}");
    let left = cached("default").await?;
    let expected: Vec<String> = keys
        .iter()
        .filter(|k| !owned_by_first(k))
        .cloned()
        .collect();
    ensure!(
        left == expected,
        "after flushing default on {first}: {left:?}, not {expected:?}"
    );
    ensure!(
        cached("other").await?.len() == keys.len(),
        "another keyspace was flushed"
    );

    cachectl_ok(&[
        "--seeds",
        &seeds,
        "--json",
        "flush",
        "--yes",
        "--all-keyspaces",
    ])?;
    ensure!(cached("default").await?.is_empty());
    ensure!(cached("other").await?.is_empty());
    Ok(())
}

/// `cachectl topology` probes each member: a member that does not answer
/// shows as unreachable, and the command still exits 0.
#[tokio::test]
async fn cachectl_topology_shows_each_members_real_state() -> Result<()> {
    let mut configs = NodeConfig::cluster(3)?;
    // node-3 is a member nobody starts.
    let missing = configs.pop().context("three configs")?;
    let mut nodes = Vec::new();
    for config in configs {
        nodes.push(NodeProcess::start(config).await?);
    }
    let seeds = nodes
        .iter()
        .map(|n| n.addr().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let out = cachectl_ok(&["--seeds", &seeds, "--deadline", "1s", "--json", "topology"])?;
    let topology: serde_json::Value = serde_json::from_str(&out)?;
    let members = topology["members"].as_array().context("members")?;
    ensure!(members.len() == 3, "{topology}");
    for member in members {
        let missing_one = member["id"] == missing.node_id.as_str();
        ensure!(member["up"] == !missing_one, "{}: {member}", member["id"]);
        let state = member["state"].as_str().unwrap_or_default();
        ensure!(
            if missing_one {
                state.starts_with("unreachable")
            } else {
                state == "serving"
            },
            "{member}"
        );
    }
    let text = cachectl_ok(&["--seeds", &seeds, "--deadline", "1s", "topology"])?;
    let line = text
        .lines()
        .find(|l| l.starts_with(&missing.node_id))
        .with_context(|| format!("no line for {}: {text}", missing.node_id))?;
    ensure!(line.contains("UNREACHABLE"), "{line}");
    Ok(())
}

/// The client's topology gauges, in the example service's `/metrics`: the
/// epoch and member count it routes by, and the new ones after the pool
/// moves to a new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_topology_epoch_and_members_are_gauges() -> Result<()> {
    let mut configs = NodeConfig::cluster(2)?;
    for config in &mut configs {
        config.epoch = 4;
    }
    let mut nodes = Vec::new();
    for config in configs.clone() {
        nodes.push(NodeProcess::start(config).await?);
    }
    let keyspace = unique("opsepoch");
    let service = ServiceProcess::start(ServiceConfig {
        seeds: nodes.iter().map(|n| n.addr().to_string()).collect(),
        keyspaces: format!("[keyspaces.{keyspace}]\nstrategy = \"cache-aside\"\nttl = \"1m\"\n"),
        database_url: pg_url()?,
        brokers: None,
        env: Vec::new(),
    })
    .await?;
    let gauges = || async {
        let (status, text) = service
            .request(reqwest::Method::GET, "/metrics", None)
            .await?;
        ensure!(status == 200, "/metrics answered {status}");
        anyhow::Ok((
            metric_sum(&text, "ringcache_client_topology_epoch"),
            metric_sum(&text, "ringcache_client_topology_members"),
        ))
    };
    let now = gauges().await?;
    ensure!(now == (Some(4.0), Some(2.0)), "{now:?}");

    // Epoch 5 adds a third member; node-1 restarts with it.
    let mut third = NodeConfig::single("node-3")?;
    let mut members = configs[0].members.clone();
    members.push((third.node_id.clone(), third.listen));
    third.members.clone_from(&members);
    third.epoch = 5;
    let mut moved = configs[0].clone();
    moved.members = members;
    moved.epoch = 5;
    let _third = NodeProcess::start(third).await?;
    let mut first = nodes.remove(0);
    first.sigterm()?;
    first.wait_exit(TIMEOUT).await?;
    drop(first);
    let _first = NodeProcess::start(moved).await?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let now = gauges().await?;
        if now == (Some(5.0), Some(3.0)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the gauges are {now:?} after {TIMEOUT:?}; service log:\n{}",
                service.log_tail(30)
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// The worker's `/metrics` counts the prepared transactions of its
/// database and gives the oldest one's age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_exports_postgresqls_prepared_transactions() -> Result<()> {
    let (url, store) = own_database("rc_ops_prepared").await?;
    let keyspace = unique("opsprep");
    let brokers = kafka_brokers()?;
    let _producer = RecordProducer::create(&brokers, &keyspace, 1, TIMEOUT).await?;
    let mut worker = WorkerProcess::start(WorkerConfig {
        brokers,
        database_url: url.clone(),
        group: format!("{keyspace}_group"),
        keyspaces: vec![keyspace],
        cache_seeds: Vec::new(),
    })?;
    let addr = worker.metrics_addr(TIMEOUT).await?;
    let gauges = || async {
        let text = scrape(addr).await?;
        anyhow::Ok((
            metric_sum(&text, "ringcache_wb_pg_prepared_transactions"),
            metric_sum(&text, "ringcache_wb_pg_oldest_prepared_transaction_seconds"),
        ))
    };
    ensure!(
        gauges().await? == (Some(0.0), Some(0.0)),
        "{:?}",
        gauges().await?
    );

    // A transaction prepared and left there, as a writer that died between
    // the phases leaves it.
    let gid = format!("ringcache:{:032x}", rand_u128());
    {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&url).await?;
        sqlx::query("BEGIN").execute(&mut conn).await?;
        sqlx::query(&format!("PREPARE TRANSACTION '{gid}'"))
            .execute(&mut conn)
            .await?;
    }
    let (count, age) = gauges().await?;
    ensure!(count == Some(1.0), "{count:?}");
    ensure!(age.is_some_and(|a| a >= 0.0), "{age:?}");
    // The age is measured by PostgreSQL: it grows.
    let deadline = Instant::now() + TIMEOUT;
    while gauges().await?.1.unwrap_or_default() < 1.0 {
        ensure!(Instant::now() < deadline, "the age never reached 1 s");
        tokio::time::sleep(POLL_EVERY).await;
    }
    sqlx::query(&format!("ROLLBACK PREPARED '{gid}'"))
        .execute(store.pool())
        .await?;
    ensure!(gauges().await? == (Some(0.0), Some(0.0)));
    worker.ensure_running()?;
    Ok(())
}

fn rand_u128() -> u128 {
    (u128::from(now_ms()) << 64) | u128::from(std::process::id())
}
