//! In-process tests of write-back dirty entries (`SetItem.dirty`,
//! `MarkClean`, `max_dirty_bytes`) over real gRPC: each test binds port 0
//! and calls `cache_node::run`.

mod common;

use cache_node::table::Table;
use common::{TestNode, http_get, keyspace_stats};
use ringcache_proto::v1::{self, SetOutcome, WriteCondition, cache_node_client::CacheNodeClient};
use tonic::Code;
use tonic::transport::Channel;

/// A small keyspace: 4 KiB of cache, 1 KiB of dirty entries.
const CONFIG: &str = "[limits]\nmax_key_bytes = 16\nmax_value_bytes = 64\n\
    [keyspaces.wb]\ncapacity_bytes = 4096\nmax_dirty_bytes = 1024\n";

fn item(key: &str, value: &str, version: u64, dirty: bool) -> v1::SetItem {
    v1::SetItem {
        key: key.as_bytes().to_vec().into(),
        value: value.as_bytes().to_vec().into(),
        version,
        ttl_ms: 0,
        condition: WriteCondition::Unconditional as i32,
        dirty,
    }
}

async fn set(
    c: &mut CacheNodeClient<Channel>,
    item: v1::SetItem,
) -> Result<v1::SetResponse, tonic::Status> {
    c.set(v1::SetRequest {
        keyspace: "wb".into(),
        item: Some(item),
    })
    .await
    .map(|r| r.into_inner())
}

async fn get(c: &mut CacheNodeClient<Channel>, key: &str) -> Option<(Vec<u8>, u64)> {
    c.get(v1::GetRequest {
        keyspace: "wb".into(),
        key: key.as_bytes().to_vec().into(),
    })
    .await
    .unwrap()
    .into_inner()
    .entry
    .map(|e| (e.value.to_vec(), e.version))
}

async fn mark_clean(c: &mut CacheNodeClient<Channel>, keys: &[(&str, u64)]) -> u32 {
    c.mark_clean(v1::MarkCleanRequest {
        keyspace: "wb".into(),
        keys: keys
            .iter()
            .map(|(key, version)| v1::CleanKey {
                key: key.as_bytes().to_vec().into(),
                version: *version,
            })
            .collect(),
    })
    .await
    .unwrap()
    .into_inner()
    .cleaned
}

async fn stats(c: &mut CacheNodeClient<Channel>) -> v1::KeyspaceStats {
    keyspace_stats(c, "wb").await
}

#[tokio::test]
async fn mark_clean_turns_stored_versions_clean_and_keeps_newer_ones_dirty() {
    let node = TestNode::start(CONFIG).await;
    let mut c = node.client.clone();
    let stored = set(&mut c, item("a", "a3", 3, true)).await.unwrap();
    assert_eq!(stored.outcome, SetOutcome::Stored as i32);
    set(&mut c, item("b", "b7", 7, true)).await.unwrap();
    assert_eq!(get(&mut c, "a").await, Some((b"a3".to_vec(), 3)));

    // The worker stored a3 and b6 (b7 is still on its way), and a key the
    // node never saw.
    let cleaned = mark_clean(&mut c, &[("a", 3), ("b", 6), ("zz", 1)]).await;
    assert_eq!(cleaned, 1);
    let s = stats(&mut c).await;
    assert_eq!(s.dirty_items, 1);
    assert_eq!(s.items, 1, "a is now a clean cached entry");
    assert_eq!(get(&mut c, "a").await, Some((b"a3".to_vec(), 3)));
    assert_eq!(get(&mut c, "b").await, Some((b"b7".to_vec(), 7)));

    // A clean write of an older version is fenced off by the dirty entry.
    let refused = set(&mut c, item("b", "b5", 5, false)).await.unwrap();
    assert_eq!(refused.outcome, SetOutcome::StaleVersion as i32);
    assert_eq!(refused.current_version, 7);

    assert_eq!(mark_clean(&mut c, &[("b", 7)]).await, 1);
    let s = stats(&mut c).await;
    assert_eq!((s.dirty_items, s.dirty_bytes), (0, 0));

    // Keys are validated like any other.
    let status = c
        .mark_clean(v1::MarkCleanRequest {
            keyspace: "wb".into(),
            keys: vec![v1::CleanKey {
                key: Default::default(),
                version: 1,
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    node.shutdown().await;
}

#[tokio::test]
async fn dirty_writes_beyond_max_dirty_bytes_are_resource_exhausted() {
    let node = TestNode::start(CONFIG).await;
    let mut c = node.client.clone();
    let value = "v".repeat(64);
    // Each is charged what malloc takes for its header, key and value.
    let each = Table::dirty_entry_footprint(b"k0", value.as_bytes());
    let fit = 1024 / each;
    assert!(fit < 10, "keys stay two bytes long");
    for i in 0..fit {
        set(&mut c, item(&format!("k{i}"), &value, 1, true))
            .await
            .unwrap();
    }
    let last = format!("k{fit}");
    let status = set(&mut c, item(&last, &value, 1, true)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        status.message(),
        "dirty bytes of keyspace \"wb\" would exceed max_dirty_bytes (1024)"
    );
    assert_eq!(get(&mut c, &last).await, None, "nothing was stored");

    let batch = c
        .multi_set(v1::MultiSetRequest {
            keyspace: "wb".into(),
            items: vec![item("m1", "x", 1, false), item("m2", &value, 1, true)],
        })
        .await
        .unwrap_err();
    assert_eq!(batch.code(), Code::ResourceExhausted);
    assert_eq!(get(&mut c, "m1").await, None, "the batch stored nothing");

    // Cleaning makes room again.
    assert_eq!(mark_clean(&mut c, &[("k0", 1)]).await, 1);
    set(&mut c, item(&last, &value, 1, true)).await.unwrap();

    let s = stats(&mut c).await;
    assert_eq!(s.dirty_items, fit);
    assert_eq!(s.dirty_bytes, fit * each);
    assert_eq!(s.max_dirty_bytes, 1024);
    assert_eq!(s.dirty_refused, 2);
    node.shutdown().await;
}

#[tokio::test]
async fn dirty_entries_outlive_eviction_and_show_in_metrics() {
    let node = TestNode::start(CONFIG).await;
    let mut c = node.client.clone();
    for i in 0..4 {
        set(&mut c, item(&format!("d{i}"), "dirty", 10, true))
            .await
            .unwrap();
    }
    let filler = "x".repeat(64);
    let items: Vec<_> = (0..200)
        .map(|i| item(&format!("c{i}"), &filler, 1, false))
        .collect();
    for chunk in items.chunks(50) {
        c.multi_set(v1::MultiSetRequest {
            keyspace: "wb".into(),
            items: chunk.to_vec(),
        })
        .await
        .unwrap();
    }
    let s = stats(&mut c).await;
    assert!(s.evictions > 0, "{s:?}");
    for i in 0..4 {
        assert_eq!(
            get(&mut c, &format!("d{i}")).await,
            Some((b"dirty".to_vec(), 10))
        );
    }
    // A delete removes a dirty entry too.
    let deleted = c
        .delete(v1::DeleteRequest {
            keyspace: "wb".into(),
            key: b"d0".to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .deleted;
    assert!(deleted);
    assert_eq!(get(&mut c, "d0").await, None);

    let body = http_get(node.metrics_addr, "/metrics").await;
    let dirty_bytes = format!(
        "ringcache_node_dirty_bytes{{keyspace=\"wb\"}} {}",
        3 * Table::dirty_entry_footprint(b"d1", b"dirty")
    );
    for line in [
        "ringcache_node_dirty_items{keyspace=\"wb\"} 3",
        dirty_bytes.as_str(),
        "ringcache_node_max_dirty_bytes{keyspace=\"wb\"} 1024",
        "ringcache_node_dirty_refused_total{keyspace=\"wb\"} 0",
    ] {
        assert!(body.contains(line), "missing {line:?} in\n{body}");
    }

    // Flush drops dirty entries as well.
    c.flush(v1::FlushRequest {
        keyspace: "wb".into(),
    })
    .await
    .unwrap();
    assert_eq!(get(&mut c, "d1").await, None);
    assert_eq!(stats(&mut c).await.dirty_items, 0);
    node.shutdown().await;
}

#[tokio::test]
async fn list_dirty_pages_through_old_dirty_entries_in_key_order() {
    let node = TestNode::start(CONFIG).await;
    let mut c = node.client.clone();
    for (i, key) in ["d", "b", "e", "a", "c"].iter().enumerate() {
        set(&mut c, item(key, "v", 10 + i as u64, true))
            .await
            .unwrap();
    }
    set(&mut c, item("clean", "v", 1, false)).await.unwrap();
    mark_clean(&mut c, &[("e", 12)]).await;

    let list = |after: &'static str, limit: u32, min_age_ms: u64| {
        let mut c = c.clone();
        async move {
            let reply = c
                .list_dirty(v1::ListDirtyRequest {
                    keyspace: "wb".into(),
                    min_age_ms,
                    after_key: after.as_bytes().to_vec().into(),
                    limit,
                })
                .await
                .unwrap()
                .into_inner();
            let keys: Vec<(String, u64)> = reply
                .keys
                .iter()
                .map(|k| (String::from_utf8_lossy(&k.key).into_owned(), k.version))
                .collect();
            (keys, reply.more)
        }
    };
    // Only dirty entries, in key order, paged.
    let (page, more) = list("", 2, 0).await;
    assert_eq!(page, [("a".to_owned(), 13), ("b".to_owned(), 11)]);
    assert!(more);
    let (page, more) = list("b", 2, 0).await;
    assert_eq!(page, [("c".to_owned(), 14), ("d".to_owned(), 10)]);
    assert!(!more);
    // Nothing has been dirty for an hour.
    let (page, more) = list("", 0, 3_600_000).await;
    assert!(page.is_empty() && !more, "{page:?}");
}
