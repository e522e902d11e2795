//! In-process tests of the node over real gRPC: each test binds port 0,
//! calls `cache_node::run`, and talks to it with the generated client.

use std::time::{Duration, Instant};

mod common;

use common::{TestNode, http_get};
use ringcache_proto::v1::{self, SetOutcome, WriteCondition, cache_node_client::CacheNodeClient};
use tonic::Code;
use tonic::transport::Channel;

fn item(key: &str, value: &str, version: u64, condition: WriteCondition) -> v1::SetItem {
    v1::SetItem {
        key: key.as_bytes().to_vec().into(),
        value: value.as_bytes().to_vec().into(),
        version,
        ttl_ms: 0,
        condition: condition as i32,
        dirty: false,
    }
}

async fn set(
    client: &mut CacheNodeClient<Channel>,
    keyspace: &str,
    item: v1::SetItem,
) -> Result<v1::SetResponse, tonic::Status> {
    client
        .set(v1::SetRequest {
            keyspace: keyspace.into(),
            item: Some(item),
        })
        .await
        .map(|r| r.into_inner())
}

async fn get(
    client: &mut CacheNodeClient<Channel>,
    keyspace: &str,
    key: &str,
) -> Result<Option<v1::Entry>, tonic::Status> {
    client
        .get(v1::GetRequest {
            keyspace: keyspace.into(),
            key: key.as_bytes().to_vec().into(),
        })
        .await
        .map(|r| r.into_inner().entry)
}

#[tokio::test]
async fn set_get_delete_round_trip() {
    let node = TestNode::start("").await;
    let mut c = node.client.clone();
    let reply = set(
        &mut c,
        "default",
        item("k", "hello", 7, WriteCondition::Unconditional),
    )
    .await
    .unwrap();
    assert_eq!(reply.outcome(), SetOutcome::Stored);
    assert_eq!(reply.current_version, 7);
    let entry = get(&mut c, "default", "k").await.unwrap().unwrap();
    assert_eq!(&entry.value[..], b"hello");
    assert_eq!(entry.version, 7);
    assert_eq!(entry.ttl_remaining_ms, 0, "no TTL means never expires");
    let deleted = c
        .delete(v1::DeleteRequest {
            keyspace: "default".into(),
            key: "k".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(deleted.deleted);
    assert_eq!(get(&mut c, "default", "k").await.unwrap(), None);
    let again = c
        .delete(v1::DeleteRequest {
            keyspace: "default".into(),
            key: "k".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.deleted);
    node.shutdown().await;
}

#[tokio::test]
async fn multi_get_and_multi_set_keep_request_order() {
    let node = TestNode::start("").await;
    let mut c = node.client.clone();
    set(
        &mut c,
        "default",
        item("b", "old-b", 5, WriteCondition::Unconditional),
    )
    .await
    .unwrap();
    let items = vec![
        item("a", "A", 1, WriteCondition::Unconditional),
        item("b", "B", 4, WriteCondition::IfNewerVersion),
        item("c", "C", 1, WriteCondition::IfAbsent),
    ];
    let replies = c
        .multi_set(v1::MultiSetRequest {
            keyspace: "default".into(),
            items,
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let outcomes: Vec<_> = replies.iter().map(|r| r.outcome()).collect();
    assert_eq!(
        outcomes,
        [
            SetOutcome::Stored,
            SetOutcome::StaleVersion,
            SetOutcome::Stored
        ]
    );
    assert_eq!(replies[1].current_version, 5);
    let keys = ["c", "missing", "a", "b"];
    let results = c
        .multi_get(v1::MultiGetRequest {
            keyspace: "default".into(),
            keys: keys.iter().map(|k| k.as_bytes().to_vec().into()).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let values: Vec<Option<&[u8]>> = results
        .iter()
        .map(|r| r.entry.as_ref().map(|e| &e.value[..]))
        .collect();
    assert_eq!(
        values,
        [Some(&b"C"[..]), None, Some(&b"A"[..]), Some(&b"old-b"[..])]
    );
    node.shutdown().await;
}

#[tokio::test]
async fn version_fence_and_if_absent_over_the_wire() {
    let node = TestNode::start("").await;
    let mut c = node.client.clone();
    let fenced = |v| item("k", &format!("v{v}"), v, WriteCondition::IfNewerVersion);
    assert_eq!(
        set(&mut c, "default", fenced(10)).await.unwrap().outcome(),
        SetOutcome::Stored
    );
    for stale in [10, 9] {
        let reply = set(&mut c, "default", fenced(stale)).await.unwrap();
        assert_eq!(reply.outcome(), SetOutcome::StaleVersion);
        assert_eq!(reply.current_version, 10);
    }
    assert_eq!(
        &get(&mut c, "default", "k").await.unwrap().unwrap().value[..],
        b"v10"
    );
    assert_eq!(
        set(&mut c, "default", fenced(11)).await.unwrap().outcome(),
        SetOutcome::Stored
    );

    let absent = |v| item("once", &format!("v{v}"), v, WriteCondition::IfAbsent);
    assert_eq!(
        set(&mut c, "default", absent(1)).await.unwrap().outcome(),
        SetOutcome::Stored
    );
    let reply = set(&mut c, "default", absent(2)).await.unwrap();
    assert_eq!(reply.outcome(), SetOutcome::Exists);
    assert_eq!(reply.current_version, 1);
    node.shutdown().await;
}

#[tokio::test]
async fn ttl_expires_entries() {
    let node = TestNode::start("").await;
    let mut c = node.client.clone();
    let ttl = Duration::from_millis(1500);
    let written = Instant::now();
    let mut short = item("short", "v", 1, WriteCondition::Unconditional);
    short.ttl_ms = ttl.as_millis() as u64;
    set(&mut c, "default", short).await.unwrap();
    let entry = get(&mut c, "default", "short")
        .await
        .unwrap()
        .expect("an entry with 1.5 s to live is readable at once");
    assert!(entry.ttl_remaining_ms > 0 && entry.ttl_remaining_ms <= 1500);
    // Waiting for the TTL is the behaviour under test, not a stand-in for
    // synchronisation: poll until the entry is gone, then check it did not
    // go early.
    let deadline = written + Duration::from_secs(20);
    loop {
        if get(&mut c, "default", "short").await.unwrap().is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "entry outlived its TTL by far");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(written.elapsed() >= ttl, "entry vanished before its TTL");
    node.shutdown().await;
}

#[tokio::test]
async fn keyspace_default_ttl_applies() {
    let node = TestNode::start("[keyspaces.sessions]\ndefault_ttl = \"1m\"").await;
    let mut c = node.client.clone();
    set(
        &mut c,
        "sessions",
        item("s", "v", 1, WriteCondition::Unconditional),
    )
    .await
    .unwrap();
    let entry = get(&mut c, "sessions", "s").await.unwrap().unwrap();
    assert!(entry.ttl_remaining_ms > 50_000 && entry.ttl_remaining_ms <= 60_000);
    node.shutdown().await;
}

#[tokio::test]
async fn byte_bounded_eviction_keeps_the_keyspace_within_capacity() {
    let node = TestNode::start(
        "[limits]\nmax_value_bytes = 4096\n[keyspaces.small]\ncapacity_bytes = 65536",
    )
    .await;
    let mut c = node.client.clone();
    let value = "x".repeat(4096);
    for chunk in 0..10 {
        let items = (0..50)
            .map(|i| {
                item(
                    &format!("k{chunk}-{i}"),
                    &value,
                    1,
                    WriteCondition::Unconditional,
                )
            })
            .collect();
        c.multi_set(v1::MultiSetRequest {
            keyspace: "small".into(),
            items,
        })
        .await
        .unwrap();
    }
    let stats = c
        .stats(v1::StatsRequest {
            keyspace: "small".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let small = &stats.keyspaces[0];
    assert_eq!(small.name, "small");
    assert_eq!(small.capacity_bytes, 65536);
    assert!(small.bytes <= 65536, "{small:?}");
    assert!(small.evictions > 0, "{small:?}");
    assert_eq!(small.sets, 500);
    node.shutdown().await;
}

#[tokio::test]
async fn bad_input_is_refused_with_a_message_naming_the_limit() {
    let node = TestNode::start(
        "[limits]\nmax_key_bytes = 8\nmax_value_bytes = 16\nmax_ttl = \"1h\"\nmax_batch_keys = 3",
    )
    .await;
    let mut c = node.client.clone();
    let expect = |r: Result<v1::SetResponse, tonic::Status>, code: Code, msg: &str| {
        let status = r.expect_err("must be refused");
        assert_eq!(status.code(), code, "{status:?}");
        assert_eq!(status.message(), msg);
    };
    expect(
        set(
            &mut c,
            "default",
            item("", "v", 1, WriteCondition::Unconditional),
        )
        .await,
        Code::InvalidArgument,
        "key is empty",
    );
    expect(
        set(
            &mut c,
            "default",
            item("123456789", "v", 1, WriteCondition::Unconditional),
        )
        .await,
        Code::InvalidArgument,
        "key of 9 bytes exceeds max_key_bytes (8)",
    );
    expect(
        set(
            &mut c,
            "default",
            item("k", &"v".repeat(17), 1, WriteCondition::Unconditional),
        )
        .await,
        Code::InvalidArgument,
        "value of 17 bytes exceeds max_value_bytes (16)",
    );
    let mut long_ttl = item("k", "v", 1, WriteCondition::Unconditional);
    long_ttl.ttl_ms = 3_600_001;
    expect(
        set(&mut c, "default", long_ttl).await,
        Code::InvalidArgument,
        "ttl of 3600001 ms exceeds max_ttl (3600000 ms)",
    );
    expect(
        set(
            &mut c,
            "nope",
            item("k", "v", 1, WriteCondition::Unconditional),
        )
        .await,
        Code::NotFound,
        "unknown keyspace \"nope\" (unknown_keyspaces = \"reject\")",
    );
    let mut bad_condition = item("k", "v", 1, WriteCondition::Unconditional);
    bad_condition.condition = 42;
    expect(
        set(&mut c, "default", bad_condition).await,
        Code::InvalidArgument,
        "malformed request: unknown write condition 42",
    );
    let no_item = c
        .set(v1::SetRequest {
            keyspace: "default".into(),
            item: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        no_item.message(),
        "malformed request: set request has no item"
    );
    let too_many = c
        .multi_get(v1::MultiGetRequest {
            keyspace: "default".into(),
            keys: (0..4)
                .map(|i| format!("k{i}").into_bytes().into())
                .collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
    assert_eq!(
        too_many.message(),
        "batch of 4 keys exceeds max_batch_keys (3)"
    );
    let empty_get = get(&mut c, "default", "").await.unwrap_err();
    assert_eq!(empty_get.message(), "key is empty");

    // Nothing crashed and nothing else was affected: the node still serves.
    set(
        &mut c,
        "default",
        item("ok", "v", 1, WriteCondition::Unconditional),
    )
    .await
    .unwrap();
    assert!(get(&mut c, "default", "ok").await.unwrap().is_some());
    let stats = c
        .stats(v1::StatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stats.keyspaces.len(),
        1,
        "a refused request created nothing"
    );
    assert_eq!(stats.keyspaces[0].sets, 1);
    node.shutdown().await;
}

#[tokio::test]
async fn unknown_keyspaces_can_be_created_on_demand() {
    let node = TestNode::start("unknown_keyspaces = \"create\"").await;
    let mut c = node.client.clone();
    set(
        &mut c,
        "fresh",
        item("k", "v", 1, WriteCondition::Unconditional),
    )
    .await
    .unwrap();
    assert!(get(&mut c, "fresh", "k").await.unwrap().is_some());
    let names: Vec<String> = c
        .stats(v1::StatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .keyspaces
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(names, ["default", "fresh"]);
    let status = get(&mut c, "bad name!", "k").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    node.shutdown().await;
}

#[tokio::test]
async fn stats_count_hits_misses_and_writes() {
    let node = TestNode::start("").await;
    let mut c = node.client.clone();
    set(
        &mut c,
        "default",
        item("k", "v", 2, WriteCondition::Unconditional),
    )
    .await
    .unwrap();
    set(
        &mut c,
        "default",
        item("k", "v", 1, WriteCondition::IfNewerVersion),
    )
    .await
    .unwrap();
    get(&mut c, "default", "k").await.unwrap();
    get(&mut c, "default", "absent").await.unwrap();
    let stats = c
        .stats(v1::StatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.node_id, "node-1");
    let ks = &stats.keyspaces[0];
    assert_eq!(
        (ks.hits, ks.misses, ks.sets, ks.sets_refused, ks.items),
        (1, 1, 1, 1, 1)
    );
    assert!(ks.bytes > 0);
    let unknown = c
        .stats(v1::StatsRequest {
            keyspace: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    node.shutdown().await;
}

#[tokio::test]
async fn flush_drops_entries() {
    let node = TestNode::start("[keyspaces.other]").await;
    let mut c = node.client.clone();
    for ks in ["default", "other"] {
        set(&mut c, ks, item("k", "v", 1, WriteCondition::Unconditional))
            .await
            .unwrap();
    }
    c.flush(v1::FlushRequest {
        keyspace: "other".into(),
    })
    .await
    .unwrap();
    assert!(get(&mut c, "other", "k").await.unwrap().is_none());
    assert!(get(&mut c, "default", "k").await.unwrap().is_some());
    c.flush(v1::FlushRequest::default()).await.unwrap();
    assert!(get(&mut c, "default", "k").await.unwrap().is_none());
    node.shutdown().await;
}

#[tokio::test]
async fn topology_reports_members_and_epoch() {
    let node = TestNode::start(
        r#"
        node_id = "b"
        [cluster]
        epoch = 7
        members = [
          { id = "a", address = "10.0.0.1:7700" },
          { id = "b", address = "10.0.0.2:7700", weight = 3 },
        ]
        "#,
    )
    .await;
    let topo = node
        .client
        .clone()
        .topology(v1::TopologyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(topo.epoch, 7);
    assert_eq!(topo.self_id, "b");
    let members: Vec<_> = topo
        .members
        .iter()
        .map(|m| (m.id.as_str(), m.address.as_str(), m.weight))
        .collect();
    assert_eq!(
        members,
        [("a", "10.0.0.1:7700", 1), ("b", "10.0.0.2:7700", 3)]
    );
    node.shutdown().await;

    // A node without a member list reports itself alone.
    let alone = TestNode::start("").await;
    let topo = alone
        .client
        .clone()
        .topology(v1::TopologyRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(topo.epoch, 1);
    assert_eq!(topo.members.len(), 1);
    assert_eq!(topo.members[0].address, alone.grpc_addr.to_string());
    alone.shutdown().await;
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let node = TestNode::start("").await;
    let channel = Channel::from_shared(format!("http://{}", node.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "ringcache.v1.CacheNode"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, 1, "{service:?} is SERVING");
    }

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply {reply:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"ringcache.v1.CacheNode"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    node.shutdown().await;
}

/// Tools still on the older reflection protocol (older grpcurl, grpcui,
/// Postman, evans) ask `grpc.reflection.v1alpha`; they must see the same
/// services as `v1` clients instead of `UNIMPLEMENTED`.
#[tokio::test]
async fn reflection_v1alpha_is_served_beside_v1() {
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let node = TestNode::start("").await;
    let channel = Channel::from_shared(format!("http://{}", node.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let requests = [
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "ringcache.v1.CacheNode".into(),
            )),
        },
    ];
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("the v1alpha reflection service answers")
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection reply {reply:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"ringcache.v1.CacheNode"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    let reply = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = reply.message_response else {
        panic!("unexpected reflection reply {reply:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    node.shutdown().await;
}

#[tokio::test]
async fn metrics_endpoint_exposes_keyspace_counters_and_latency() {
    let node = TestNode::start("").await;
    let mut c = node.client.clone();
    set(
        &mut c,
        "default",
        item("k", "v", 1, WriteCondition::Unconditional),
    )
    .await
    .unwrap();
    get(&mut c, "default", "k").await.unwrap();
    get(&mut c, "default", "nope").await.unwrap();
    let _ = get(&mut c, "default", "").await;
    let lease = c
        .lease_get(v1::LeaseGetRequest {
            keyspace: "default".into(),
            key: "leased".into(),
        })
        .await
        .unwrap()
        .into_inner();
    c.fill(v1::FillRequest {
        keyspace: "default".into(),
        item: Some(item("leased", "v", 1, WriteCondition::Unconditional)),
        lease_token: lease.lease_token,
    })
    .await
    .unwrap();
    let body = http_get(node.metrics_addr, "/metrics").await;
    for line in [
        "ringcache_node_hits_total{keyspace=\"default\"} 1",
        "ringcache_node_misses_total{keyspace=\"default\"} 2",
        "ringcache_node_sets_total{keyspace=\"default\"} 1",
        "ringcache_node_items{keyspace=\"default\"} 2",
        "ringcache_node_request_errors_total{rpc=\"Get\",code=\"InvalidArgument\"} 1",
        "ringcache_node_leases_granted_total{keyspace=\"default\"} 1",
        "ringcache_node_lease_waits_total{keyspace=\"default\"} 0",
        "ringcache_node_fills_stored_total{keyspace=\"default\"} 1",
        "ringcache_node_fills_refused_total{keyspace=\"default\"} 0",
        "ringcache_node_prepares_total{keyspace=\"default\"} 0",
        "ringcache_node_commits_total{keyspace=\"default\"} 0",
        "ringcache_node_aborts_total{keyspace=\"default\"} 0",
        "ringcache_node_pending_timeouts_total{keyspace=\"default\"} 0",
    ] {
        assert!(body.contains(line), "missing {line:?} in\n{body}");
    }
    assert!(body.contains("ringcache_node_request_duration_seconds_bucket{rpc=\"Get\""));
    assert!(body.contains("ringcache_node_request_duration_seconds_bucket{rpc=\"Fill\""));
    assert!(body.contains("ringcache_node_bytes{keyspace=\"default\"}"));
    node.shutdown().await;
}
