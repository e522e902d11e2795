//! The example HTTP service (`cache-client/examples/kv-service.rs`) driven
//! over HTTP: a process of the real example binary against a three-node
//! cluster, a PostgreSQL server and a broker of the test's own, with one
//! keyspace per strategy. It checks what the example promises its users:
//! reads and writes through every strategy, 404s, and the client's metrics
//! in the service's own `/metrics`.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use reqwest::Method;
use ringcache_tests::{PrivateBroker, PrivatePostgres, ServiceConfig, ServiceProcess, cluster};

/// Upper bound for a broker or a process to start or stop.
const TIMEOUT: Duration = Duration::from_secs(60);

/// One keyspace per strategy, as in the demo.
const KEYSPACES: &str = r#"
[keyspaces.profiles]
strategy = "cache-aside"
ttl = "10m"

[keyspaces.catalog]
strategy = "read-through"
ttl = "10m"
negative_ttl = "1m"

[keyspaces.docs]
strategy = "write-around"
ttl = "10m"

[keyspaces.accounts]
strategy = "write-through"
ttl = "10m"

[keyspaces.orders]
strategy = "write-back"
ttl = "10m"
"#;

const STRATEGIES: [(&str, &str); 5] = [
    ("profiles", "cache-aside"),
    ("catalog", "read-through"),
    ("docs", "write-around"),
    ("accounts", "write-through"),
    ("orders", "write-back"),
];

/// The sum of the samples of `name` whose labels include every one of
/// `labels`, in a Prometheus text exposition; `None` when there is none.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = match rest.strip_prefix('{') {
            Some(rest) => match rest.split_once("} ") {
                Some(parts) => parts,
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(value) => ("", value),
                None => continue,
            },
        };
        if !labels
            .iter()
            .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        if let Ok(value) = value.trim().parse::<f64>() {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_service_serves_every_strategy_and_exports_the_clients_metrics() -> Result<()> {
    let pg = tokio::task::block_in_place(PrivatePostgres::start)?;
    let broker = PrivateBroker::start(TIMEOUT).await?;
    let nodes = cluster(3).await?;
    let mut service = ServiceProcess::start(ServiceConfig {
        seeds: nodes.iter().map(|n| n.addr().to_string()).collect(),
        keyspaces: KEYSPACES.to_owned(),
        database_url: pg.url(),
        brokers: Some(broker.brokers()),
        env: Vec::new(),
    })
    .await?;

    for (keyspace, strategy) in STRATEGIES {
        let path = format!("/kv/{keyspace}/item-1");
        let value = format!("value of {keyspace}");
        let (status, body) = service.request(Method::PUT, &path, Some(&value)).await?;
        ensure!(
            status == 200 && body.contains("\"applied\":true"),
            "{strategy}: PUT {path} answered {status} {body}"
        );
        // Twice: the first read of a strategy that invalidates on write
        // loads from PostgreSQL, the second is a hit.
        for _ in 0..2 {
            let (status, body) = service.request(Method::GET, &path, None).await?;
            ensure!(
                status == 200 && body == value,
                "{strategy}: GET {path} answered {status} {body:?}, not {value:?}"
            );
        }
        let (status, body) = service.request(Method::DELETE, &path, None).await?;
        ensure!(
            status == 200,
            "{strategy}: DELETE {path} answered {status} {body}"
        );
        let (status, body) = service.request(Method::GET, &path, None).await?;
        ensure!(
            status == 404,
            "{strategy}: GET {path} after DELETE answered {status} {body:?}"
        );
    }
    let (status, _) = service
        .request(Method::GET, "/kv/no-such-keyspace/k", None)
        .await?;
    ensure!(status == 404, "an undefined keyspace answered {status}");

    let (status, metrics) = service.request(Method::GET, "/metrics", None).await?;
    ensure!(status == 200, "/metrics answered {status}");
    let show = || format!("/metrics:\n{metrics}");
    for (keyspace, strategy) in STRATEGIES {
        for op in ["put", "get", "remove"] {
            let labels = [("keyspace", keyspace), ("strategy", strategy), ("op", op)];
            let count = sample(&metrics, "ringcache_client_operations_total", &labels);
            let expected = if op == "get" { 3.0 } else { 1.0 };
            ensure!(
                count == Some(expected),
                "{strategy}: {op} counted {count:?}, not {expected}; {}",
                show()
            );
            let timed = sample(
                &metrics,
                "ringcache_client_operation_duration_seconds_count",
                &labels,
            );
            ensure!(
                timed == Some(expected),
                "{strategy}: {op} timed {timed:?} times; {}",
                show()
            );
        }
        let hits = sample(
            &metrics,
            "ringcache_client_hits_total",
            &[("keyspace", keyspace), ("strategy", strategy)],
        );
        ensure!(
            hits.is_some_and(|h| h >= 1.0),
            "{strategy}: hits {hits:?}; {}",
            show()
        );
    }
    // Loaded from PostgreSQL on the first read after each write.
    for keyspace in ["profiles", "catalog", "docs"] {
        let misses = sample(
            &metrics,
            "ringcache_client_misses_total",
            &[("keyspace", keyspace)],
        );
        ensure!(
            misses.is_some_and(|m| m >= 1.0),
            "{keyspace}: misses {misses:?}; {}",
            show()
        );
    }
    let commits = sample(
        &metrics,
        "ringcache_client_twopc_commits_total",
        &[("keyspace", "accounts")],
    );
    ensure!(
        commits == Some(2.0),
        "write-through commits {commits:?}; {}",
        show()
    );
    let queued = sample(
        &metrics,
        "ringcache_client_write_back_queued_total",
        &[("keyspace", "orders"), ("ack", "durable")],
    );
    ensure!(
        queued == Some(2.0),
        "write-back queued {queued:?}; {}",
        show()
    );
    let produced = sample(
        &metrics,
        "ringcache_client_write_back_produce_duration_seconds_count",
        &[("keyspace", "orders"), ("outcome", "acked")],
    );
    ensure!(
        produced == Some(2.0),
        "write-back produce timings {produced:?}; {}",
        show()
    );
    let leases = sample(
        &metrics,
        "ringcache_client_lease_outcomes_total",
        &[("keyspace", "catalog"), ("outcome", "fill_stored")],
    );
    ensure!(
        leases.is_some_and(|l| l >= 1.0),
        "read-through fills {leases:?}; {}",
        show()
    );

    let status = service.stop(TIMEOUT).await.context("stopping kv-service")?;
    ensure!(
        status.success(),
        "kv-service exited with {status} on SIGTERM; log tail:\n{}",
        service.log_tail(40)
    );
    Ok(())
}
