//! The in-process test node shared by this crate's integration tests: binds
//! port 0, calls `cache_node::run`, and talks to it with the generated
//! client.

use cache_node::{Config, Listeners};
use ringcache_proto::v1::cache_node_client::CacheNodeClient;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

// Each test binary uses a different subset of the fields.
#[allow(dead_code)]
pub struct TestNode {
    pub client: CacheNodeClient<Channel>,
    pub grpc_addr: std::net::SocketAddr,
    pub metrics_addr: std::net::SocketAddr,
    /// The RESP listener, which every test node serves.
    pub resp_addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<cache_node::Result<()>>,
}

impl TestNode {
    pub async fn start(toml: &str) -> TestNode {
        let mut config = Config::from_toml(toml).expect("test config parses");
        config.validate().expect("test config is valid");
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_addr = grpc.local_addr().unwrap();
        let metrics_addr = metrics.local_addr().unwrap();
        let resp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let resp_addr = resp.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(cache_node::run(
            config,
            Listeners {
                grpc,
                metrics: Some(metrics),
                resp: Some(resp),
            },
            async {
                let _ = stopped.await;
            },
        ));
        // The listener is bound before `run`, so connecting cannot race the
        // server start: the kernel queues the connection until it accepts.
        let client = CacheNodeClient::connect(format!("http://{grpc_addr}"))
            .await
            .unwrap();
        TestNode {
            client,
            grpc_addr,
            metrics_addr,
            resp_addr,
            stop: Some(stop),
            task,
        }
    }

    pub async fn shutdown(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

/// One keyspace's stats, as the node reports them.
#[allow(dead_code)] // not every test binary reads stats this way
pub async fn keyspace_stats(
    c: &mut CacheNodeClient<Channel>,
    keyspace: &str,
) -> ringcache_proto::v1::KeyspaceStats {
    c.stats(ringcache_proto::v1::StatsRequest {
        keyspace: keyspace.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .keyspaces
    .remove(0)
}

#[allow(dead_code)] // not every test binary reads /metrics
/// A minimal HTTP/1.0 GET, so the test needs no HTTP client crate.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    response
}
