//! In-process tests of leases (`LeaseGet`/`Fill`) and 2PC pending changes
//! (`Prepare`/`Commit`/`Abort`) over real gRPC: each test binds port 0 and
//! calls `cache_node::run`.

use std::time::{Duration, Instant};

mod common;

use common::{TestNode, http_get, keyspace_stats};
use ringcache_proto::v1::{self, FillOutcome, WriteCondition, cache_node_client::CacheNodeClient};
use tonic::transport::Channel;

fn item(key: &str, value: &str, version: u64) -> v1::SetItem {
    v1::SetItem {
        key: key.as_bytes().to_vec().into(),
        value: value.as_bytes().to_vec().into(),
        version,
        ttl_ms: 0,
        condition: WriteCondition::Unconditional as i32,
        dirty: false,
    }
}

async fn lease_get(c: &mut CacheNodeClient<Channel>, key: &str) -> v1::LeaseGetResponse {
    c.lease_get(v1::LeaseGetRequest {
        keyspace: "default".into(),
        key: key.as_bytes().to_vec().into(),
    })
    .await
    .unwrap()
    .into_inner()
}

async fn fill(
    c: &mut CacheNodeClient<Channel>,
    key: &str,
    value: &str,
    version: u64,
    token: u64,
) -> v1::FillResponse {
    c.fill(v1::FillRequest {
        keyspace: "default".into(),
        item: Some(item(key, value, version)),
        lease_token: token,
    })
    .await
    .unwrap()
    .into_inner()
}

async fn get(c: &mut CacheNodeClient<Channel>, key: &str) -> Option<v1::Entry> {
    c.get(v1::GetRequest {
        keyspace: "default".into(),
        key: key.as_bytes().to_vec().into(),
    })
    .await
    .unwrap()
    .into_inner()
    .entry
}

async fn delete(c: &mut CacheNodeClient<Channel>, key: &str) -> bool {
    c.delete(v1::DeleteRequest {
        keyspace: "default".into(),
        key: key.as_bytes().to_vec().into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .deleted
}

async fn prepare(
    c: &mut CacheNodeClient<Channel>,
    key: &str,
    value: &str,
    version: u64,
    txn: &str,
    timeout_ms: u64,
) -> v1::PrepareResponse {
    c.prepare(v1::PrepareRequest {
        keyspace: "default".into(),
        item: Some(item(key, value, version)),
        txn_id: txn.into(),
        timeout_ms,
        delete: false,
        wait_ms: 0,
    })
    .await
    .unwrap()
    .into_inner()
}

async fn stats(c: &mut CacheNodeClient<Channel>) -> v1::KeyspaceStats {
    keyspace_stats(c, "default").await
}

#[tokio::test]
async fn two_lease_gets_on_a_cold_key_give_one_token_and_one_wait() {
    let node = TestNode::start("").await;
    let mut c = node.client.clone();
    // Concurrently, so that the node really decides between two misses.
    let (mut c1, mut c2) = (c.clone(), c.clone());
    let (a, b) = tokio::join!(lease_get(&mut c1, "cold"), lease_get(&mut c2, "cold"));
    let (holder, waiter) = if a.lease_token != 0 { (a, b) } else { (b, a) };
    assert_ne!(holder.lease_token, 0, "{holder:?}");
    assert_eq!(holder.retry_after_ms, 0);
    assert!(holder.entry.is_none() && holder.stale.is_none());
    assert_eq!(waiter.lease_token, 0, "{waiter:?}");
    assert_eq!(waiter.retry_after_ms, 20, "the default lease_retry_after");
    assert!(waiter.entry.is_none() && waiter.stale.is_none());

    let filled = fill(&mut c, "cold", "loaded", 4, holder.lease_token).await;
    assert_eq!(filled.outcome(), FillOutcome::Stored);
    assert_eq!(filled.current_version, 4);
    let hit = lease_get(&mut c, "cold").await;
    let entry = hit.entry.expect("filled key hits");
    assert_eq!((&entry.value[..], entry.version), (&b"loaded"[..], 4));
    assert_eq!((hit.lease_token, hit.retry_after_ms), (0, 0));
    // The token is spent.
    let again = fill(&mut c, "cold", "loaded", 5, holder.lease_token).await;
    assert_eq!(again.outcome(), FillOutcome::LeaseInvalid);
    assert_eq!(again.current_version, 4);

    let s = stats(&mut c).await;
    assert_eq!(
        (
            s.leases_granted,
            s.lease_waits,
            s.fills_stored,
            s.fills_refused
        ),
        (1, 1, 1, 1)
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_delete_between_lease_get_and_fill_refuses_the_fill() {
    let node = TestNode::start("[keyspaces.default]\nkeep_stale_for = \"30s\"").await;
    let mut c = node.client.clone();
    c.set(v1::SetRequest {
        keyspace: "default".into(),
        item: Some(item("k", "v1", 1)),
    })
    .await
    .unwrap();
    // The writer updates its row and invalidates the cache...
    assert!(delete(&mut c, "k").await);
    // ...a reader misses and takes the lease; it reads the row meanwhile
    // another writer updates the row and deletes again.
    let token = lease_get(&mut c, "k").await.lease_token;
    assert_ne!(token, 0);
    assert!(!delete(&mut c, "k").await, "nothing live to delete");
    let refused = fill(&mut c, "k", "v2-loaded-before", 2, token).await;
    assert_eq!(refused.outcome(), FillOutcome::LeaseInvalid);
    assert!(get(&mut c, "k").await.is_none());

    // The deleted value is kept as stale, shown only to waiters.
    let holder = lease_get(&mut c, "k").await;
    assert_ne!(holder.lease_token, 0);
    assert!(holder.stale.is_none());
    let waiter = lease_get(&mut c, "k").await;
    assert!(waiter.retry_after_ms > 0 && waiter.entry.is_none());
    let stale = waiter.stale.expect("the deleted value is kept as stale");
    assert_eq!((&stale.value[..], stale.version), (&b"v1"[..], 1));
    assert!(stale.ttl_remaining_ms > 0 && stale.ttl_remaining_ms <= 30_000);
    node.shutdown().await;
}

#[tokio::test]
async fn pending_changes_are_invisible_until_committed() {
    let node = TestNode::start("").await;
    let mut c = node.client.clone();
    c.set(v1::SetRequest {
        keyspace: "default".into(),
        item: Some(item("k", "committed", 1)),
    })
    .await
    .unwrap();
    let prepared = prepare(&mut c, "k", "pending", 2, "tx-1", 0).await;
    assert!(prepared.prepared);
    assert_eq!(prepared.current_version, 1);
    assert_eq!(&get(&mut c, "k").await.unwrap().value[..], b"committed");
    let multi = c
        .multi_get(v1::MultiGetRequest {
            keyspace: "default".into(),
            keys: vec!["k".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        &multi.results[0].entry.as_ref().unwrap().value[..],
        b"committed"
    );
    assert_eq!(
        &lease_get(&mut c, "k").await.entry.unwrap().value[..],
        b"committed"
    );
    // Another transaction is refused; the same one again is idempotent.
    assert!(!prepare(&mut c, "k", "other", 3, "tx-2", 0).await.prepared);
    assert!(prepare(&mut c, "k", "pending", 2, "tx-1", 0).await.prepared);

    let commit = |txn: &str| v1::CommitRequest {
        keyspace: "default".into(),
        key: "k".into(),
        txn_id: txn.into(),
    };
    let wrong = c.commit(commit("tx-2")).await.unwrap().into_inner();
    assert!(!wrong.committed);
    let done = c.commit(commit("tx-1")).await.unwrap().into_inner();
    assert!(done.committed);
    assert_eq!(done.current_version, 2);
    let entry = get(&mut c, "k").await.unwrap();
    assert_eq!((&entry.value[..], entry.version), (&b"pending"[..], 2));

    // A pending change on a cold key: misses wait and fills are refused.
    let token = lease_get(&mut c, "cold").await.lease_token;
    assert!(prepare(&mut c, "cold", "v", 1, "tx-3", 0).await.prepared);
    let wait = lease_get(&mut c, "cold").await;
    assert_eq!(wait.lease_token, 0);
    assert!(wait.retry_after_ms > 0);
    assert_eq!(
        fill(&mut c, "cold", "loaded", 1, token).await.outcome(),
        FillOutcome::LeaseInvalid
    );
    let aborted = c
        .abort(v1::AbortRequest {
            keyspace: "default".into(),
            key: "cold".into(),
            txn_id: "tx-3".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(aborted.aborted);
    assert!(get(&mut c, "cold").await.is_none());
    assert_ne!(lease_get(&mut c, "cold").await.lease_token, 0);

    let s = stats(&mut c).await;
    assert_eq!((s.prepares, s.commits, s.aborts), (2, 1, 1));
    node.shutdown().await;
}

#[tokio::test]
async fn a_pending_deletion_commits_over_the_wire() {
    let node = TestNode::start("").await;
    let mut c = node.client.clone();
    c.set(v1::SetRequest {
        keyspace: "default".into(),
        item: Some(item("k", "v", 1)),
    })
    .await
    .unwrap();
    let reply = c
        .prepare(v1::PrepareRequest {
            keyspace: "default".into(),
            item: Some(item("k", "", 2)),
            txn_id: "tx".into(),
            timeout_ms: 0,
            delete: true,
            wait_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.prepared);
    assert!(get(&mut c, "k").await.is_some());
    let done = c
        .commit(v1::CommitRequest {
            keyspace: "default".into(),
            key: "k".into(),
            txn_id: "tx".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(done.committed);
    assert_eq!(done.current_version, 0);
    assert!(get(&mut c, "k").await.is_none());
    node.shutdown().await;
}

#[tokio::test]
async fn the_sweeper_times_out_an_untouched_pending_change() {
    let node = TestNode::start("").await;
    let mut c = node.client.clone();
    c.set(v1::SetRequest {
        keyspace: "default".into(),
        item: Some(item("k", "old", 1)),
    })
    .await
    .unwrap();
    let prepared_at = Instant::now();
    assert!(prepare(&mut c, "k", "new", 2, "tx", 200).await.prepared);
    // Only Stats is polled, never the key: the timeout must come from the
    // sweeper. Waiting for a timeout by polling is the behaviour under test.
    let deadline = prepared_at + Duration::from_secs(20);
    loop {
        if stats(&mut c).await.pending_timeouts == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pending change never timed out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        prepared_at.elapsed() >= Duration::from_millis(200),
        "timed out early"
    );
    // The live entry went with it: the writer may have committed its
    // database, so the old value may be stale.
    assert!(get(&mut c, "k").await.is_none());
    let late = c
        .commit(v1::CommitRequest {
            keyspace: "default".into(),
            key: "k".into(),
            txn_id: "tx".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // The change stays in doubt (`limits.in_doubt_ttl`): its writer's
    // database commit may have been late, so a late commit still applies.
    assert!(late.committed);
    assert_eq!(&get(&mut c, "k").await.unwrap().value[..], b"new");
    node.shutdown().await;
}

#[tokio::test]
async fn malformed_lease_and_2pc_requests_are_refused() {
    let node = TestNode::start("").await;
    let mut c = node.client.clone();
    let no_item = c
        .fill(v1::FillRequest {
            keyspace: "default".into(),
            item: None,
            lease_token: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(no_item.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        no_item.message(),
        "malformed request: fill request has no item"
    );
    let empty_txn = c
        .commit(v1::CommitRequest {
            keyspace: "default".into(),
            key: "k".into(),
            txn_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(empty_txn.code(), tonic::Code::InvalidArgument);
    assert_eq!(empty_txn.message(), "txn_id is empty");
    let empty_key = c
        .lease_get(v1::LeaseGetRequest {
            keyspace: "default".into(),
            key: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(empty_key.message(), "key is empty");
    node.shutdown().await;
}

/// A writer may ask to wait its turn for as long as it likes; the node
/// waits no longer than its `limits.max_prepare_wait`, then refuses the
/// prepare as busy, and counts the wait.
#[tokio::test]
async fn a_prepare_waits_no_longer_than_the_node_allows_and_is_counted() {
    let node = TestNode::start("[limits]\nmax_prepare_wait = \"100ms\"").await;
    let mut c = node.client.clone();
    assert!(
        prepare(&mut c, "k", "first", 1, "tx-a", 30_000)
            .await
            .prepared
    );
    let asked = Duration::from_secs(600);
    let waiting = c.prepare(v1::PrepareRequest {
        keyspace: "default".into(),
        item: Some(item("k", "second", 2)),
        txn_id: "tx-b".into(),
        timeout_ms: 30_000,
        delete: false,
        wait_ms: u64::try_from(asked.as_millis()).unwrap(),
    });
    // A guard against the hang the limit prevents, not a timing goal.
    let reply = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("the wait was cut to the node's limit")
        .unwrap()
        .into_inner();
    assert!(!reply.prepared && reply.busy, "{reply:?}");
    assert!(
        (100..60_000).contains(&reply.waited_ms),
        "waited {} ms",
        reply.waited_ms
    );
    let body = http_get(node.metrics_addr, "/metrics").await;
    for line in [
        "ringcache_node_prepare_waits_total{keyspace=\"default\",outcome=\"exhausted\"} 1",
        "ringcache_node_prepare_wait_seconds_count{keyspace=\"default\"} 1",
    ] {
        assert!(body.contains(line), "missing {line:?} in:\n{body}");
    }
    node.shutdown().await;
}
