//! TLS on the node's listeners: gRPC, RESP and the metrics endpoint each
//! accept through `tokio-rustls` with the same certificate, key and client
//! CA (rustls with the `ring` provider), differing only in ALPN.
//!
//! [`ServerTls`] holds the three configurations and is replaced whole by a
//! reload (SIGHUP): each new connection's handshake uses the configuration
//! current when it was accepted, connections already open keep theirs, so a
//! certificate rotates without a restart and without a failed request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::TlsConfig;
use crate::error::Error;

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The PEM files of [`TlsConfig`], read once at start-up.
#[derive(Clone)]
pub struct TlsMaterial {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is a secret.
        f.debug_struct("TlsMaterial")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// Reads the files `config` names (on a blocking thread).
    ///
    /// # Errors
    /// [`Error::Tls`] naming the file that cannot be read.
    pub async fn load(config: &TlsConfig) -> Result<Self, Error> {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            let read = |path: &std::path::Path| {
                std::fs::read(path)
                    .map_err(|e| Error::Tls(format!("cannot read {}: {e}", path.display())))
            };
            Ok(TlsMaterial {
                cert_pem: read(&config.cert_file)?,
                key_pem: read(&config.key_file)?,
                client_ca_pem: config.client_ca_file.as_deref().map(read).transpose()?,
            })
        })
        .await
        .map_err(|e| Error::Tls(format!("reading the tls files failed: {e}")))?
    }

    /// The material from PEM bytes (tests, embedders).
    pub fn from_pem(cert_pem: Vec<u8>, key_pem: Vec<u8>, client_ca_pem: Option<Vec<u8>>) -> Self {
        TlsMaterial {
            cert_pem,
            key_pem,
            client_ca_pem,
        }
    }

    /// A rustls acceptor advertising `alpn` (empty for none).
    ///
    /// # Errors
    /// [`Error::Tls`] when the certificate, key or CA does not parse or
    /// does not fit together.
    fn acceptor(&self, alpn: &[&[u8]]) -> Result<TlsAcceptor, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Tls(format!("bad certificate: {e}")))?;
        if certs.is_empty() {
            return Err(Error::Tls(
                "the certificate file holds no certificate".into(),
            ));
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| Error::Tls(format!("bad private key: {e}")))?;
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?;
        let builder = match &self.client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca) {
                    let cert = cert.map_err(|e| Error::Tls(format!("bad client ca: {e}")))?;
                    roots
                        .add(cert)
                        .map_err(|e| Error::Tls(format!("bad client ca: {e}")))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| Error::Tls(format!("bad client ca: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| Error::Tls(format!("certificate and key do not fit: {e}")))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// Which listener a TLS configuration serves (they differ in ALPN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC: HTTP/2 (`h2`).
    Grpc,
    /// The metrics endpoint: HTTP/1.1.
    Metrics,
    /// RESP: no ALPN.
    Resp,
}

/// The acceptors of the three listeners, built from one [`TlsMaterial`].
struct Acceptors {
    grpc: TlsAcceptor,
    metrics: TlsAcceptor,
    resp: TlsAcceptor,
}

impl Acceptors {
    fn new(material: &TlsMaterial) -> Result<Self, Error> {
        Ok(Acceptors {
            grpc: material.acceptor(&[b"h2"])?,
            metrics: material.acceptor(&[b"http/1.1"])?,
            resp: material.acceptor(&[])?,
        })
    }
}

/// The node's TLS configuration, replaceable while it serves.
pub struct ServerTls {
    acceptors: ArcSwap<Acceptors>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    /// The configuration of `material`.
    ///
    /// # Errors
    /// [`Error::Tls`] when the certificate, key or CA does not parse or
    /// does not fit together.
    pub fn new(material: &TlsMaterial) -> Result<Self, Error> {
        Ok(ServerTls {
            acceptors: ArcSwap::from_pointee(Acceptors::new(material)?),
        })
    }

    /// Replaces the configuration with `material`'s for every handshake
    /// that starts from now on. Nothing changes when `material` is not
    /// valid (a half-written file, a key that does not fit the
    /// certificate): the running configuration stays.
    ///
    /// # Errors
    /// [`Error::Tls`] as [`ServerTls::new`].
    pub fn reload(&self, material: &TlsMaterial) -> Result<(), Error> {
        self.acceptors.store(Arc::new(Acceptors::new(material)?));
        Ok(())
    }

    /// The acceptor for a connection to `protocol`'s listener accepted now.
    pub fn acceptor(&self, protocol: Protocol) -> TlsAcceptor {
        let acceptors = self.acceptors.load();
        match protocol {
            Protocol::Grpc => acceptors.grpc.clone(),
            Protocol::Metrics => acceptors.metrics.clone(),
            Protocol::Resp => acceptors.resp.clone(),
        }
    }
}

/// A TCP listener that hands out connections once their TLS handshake is
/// done, for `axum::serve` (and, through [`incoming`], for tonic).
/// Handshakes run in their own tasks, so a slow or silent client does not
/// hold up the others; failed ones are dropped. Each handshake uses the
/// [`ServerTls`] configuration current when its connection was accepted.
pub struct TlsListener {
    listener: TcpListener,
    tls: Arc<ServerTls>,
    protocol: Protocol,
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl TlsListener {
    /// Wraps `listener`, serving `protocol`.
    pub fn new(listener: TcpListener, tls: Arc<ServerTls>, protocol: Protocol) -> Self {
        TlsListener {
            listener,
            tls,
            protocol,
            handshakes: JoinSet::new(),
        }
    }
}

/// The connections of `listener` as the stream of accepted connections
/// tonic serves.
pub fn incoming(
    listener: TlsListener,
) -> impl futures::Stream<Item = std::io::Result<TlsStream<TcpStream>>> {
    futures::stream::unfold(listener, |mut listener| async move {
        let (stream, _) = axum::serve::Listener::accept(&mut listener).await;
        Some((Ok(stream), listener))
    })
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        // Requests are small: no Nagle delay (as tonic's
                        // own listener with `with_nodelay`).
                        if let Err(error) = stream.set_nodelay(true) {
                            tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
                        }
                        let acceptor = self.tls.acceptor(self.protocol);
                        self.handshakes.spawn(async move {
                            match handshake(&acceptor, stream).await {
                                Ok(stream) => Some((stream, peer)),
                                Err(error) => {
                                    tracing::debug!(%peer, %error, "tls handshake failed");
                                    None
                                }
                            }
                        });
                    }
                    Err(error) => {
                        // As axum's own listener: out of descriptors or a
                        // reset before accept; back off a moment and go on.
                        tracing::warn!(%error, protocol = ?self.protocol, "accept failed; continuing");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// Runs the server side of a handshake on `stream`, within
/// [`HANDSHAKE_TIMEOUT`].
///
/// # Errors
/// The handshake's error, or `TimedOut`.
pub async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
) -> std::io::Result<TlsStream<TcpStream>> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "tls handshake timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls_pki_types::ServerName;

    /// A CA, and a function issuing node certificates under it.
    struct Ca {
        issuer: CertifiedIssuer<'static, KeyPair>,
    }

    impl Ca {
        fn new() -> Ca {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            Ca {
                issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
            }
        }

        /// A certificate for `localhost` (and its key), in PEM.
        fn issue(&self) -> (Vec<u8>, Vec<u8>) {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec!["localhost".to_owned()])
                .unwrap()
                .signed_by(&key, &self.issuer)
                .unwrap();
            (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
        }

        fn connector(&self) -> tokio_rustls::TlsConnector {
            let mut roots = RootCertStore::empty();
            roots.add(self.issuer.der().clone()).unwrap();
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            tokio_rustls::TlsConnector::from(Arc::new(config))
        }
    }

    /// The certificate (DER) a client sees in a handshake with `acceptor`.
    async fn presented(ca: &Ca, acceptor: TlsAcceptor) -> Vec<u8> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move { acceptor.accept(server).await.map(|_| ()) });
        let stream = ca
            .connector()
            .connect(ServerName::try_from("localhost").unwrap(), client)
            .await
            .unwrap();
        server.await.unwrap().unwrap();
        let (_, session) = stream.get_ref();
        session.peer_certificates().unwrap()[0].to_vec()
    }

    fn der(pem: &[u8]) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem).unwrap().to_vec()
    }

    #[tokio::test]
    async fn a_reload_serves_the_new_certificate_to_the_next_handshake() {
        let ca = Ca::new();
        let (cert_a, key_a) = ca.issue();
        let (cert_b, key_b) = ca.issue();
        let tls =
            ServerTls::new(&TlsMaterial::from_pem(cert_a.clone(), key_a.clone(), None)).unwrap();
        // An acceptor taken before the reload (a connection accepted then)
        // keeps the old certificate.
        let before = tls.acceptor(Protocol::Resp);
        assert_eq!(
            presented(&ca, tls.acceptor(Protocol::Resp)).await,
            der(&cert_a)
        );

        tls.reload(&TlsMaterial::from_pem(cert_b.clone(), key_b, None))
            .unwrap();
        for protocol in [Protocol::Grpc, Protocol::Metrics, Protocol::Resp] {
            assert_eq!(
                presented(&ca, tls.acceptor(protocol)).await,
                der(&cert_b),
                "{protocol:?}"
            );
        }
        assert_eq!(presented(&ca, before).await, der(&cert_a));
    }

    #[tokio::test]
    async fn a_reload_with_a_key_that_does_not_fit_keeps_the_running_certificate() {
        let ca = Ca::new();
        let (cert_a, key_a) = ca.issue();
        let (cert_b, _) = ca.issue();
        let tls =
            ServerTls::new(&TlsMaterial::from_pem(cert_a.clone(), key_a.clone(), None)).unwrap();
        let err = tls
            .reload(&TlsMaterial::from_pem(cert_b, key_a, None))
            .unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
        let err = tls
            .reload(&TlsMaterial::from_pem(
                b"half a file".to_vec(),
                Vec::new(),
                None,
            ))
            .unwrap_err();
        assert!(matches!(err, Error::Tls(_)), "{err}");
        assert_eq!(
            presented(&ca, tls.acceptor(Protocol::Grpc)).await,
            der(&cert_a)
        );
    }

    #[test]
    fn each_listener_advertises_its_own_protocol() {
        let ca = Ca::new();
        let (cert, key) = ca.issue();
        let acceptors = Acceptors::new(&TlsMaterial::from_pem(cert, key, None)).unwrap();
        assert_eq!(acceptors.grpc.config().alpn_protocols, vec![b"h2".to_vec()]);
        assert_eq!(
            acceptors.metrics.config().alpn_protocols,
            vec![b"http/1.1".to_vec()]
        );
        assert!(acceptors.resp.config().alpn_protocols.is_empty());
    }
}
