//! TLS on the node's listeners. gRPC uses tonic's rustls support; RESP and
//! the metrics endpoint use `tokio-rustls` with the same certificate, key and
//! client CA. Both use rustls with the `ring` provider.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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

    /// tonic's server TLS settings.
    pub fn tonic(&self) -> tonic::transport::ServerTlsConfig {
        let identity = tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem);
        let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca_pem {
            config = config
                .client_ca_root(tonic::transport::Certificate::from_pem(ca))
                .client_auth_optional(false);
        }
        config
    }

    /// A rustls acceptor advertising `alpn` (empty for none).
    ///
    /// # Errors
    /// [`Error::Tls`] when the certificate, key or CA does not parse or
    /// does not fit together.
    pub fn acceptor(&self, alpn: &[&[u8]]) -> Result<TlsAcceptor, Error> {
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

/// A TCP listener that hands out connections once their TLS handshake is
/// done, for `axum::serve`. Handshakes run in their own tasks, so a slow or
/// silent client does not hold up the others; failed ones are dropped.
pub struct TlsListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl TlsListener {
    /// Wraps `listener`.
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> Self {
        TlsListener {
            listener,
            acceptor,
            handshakes: JoinSet::new(),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let acceptor = self.acceptor.clone();
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
                        tracing::warn!(%error, "metrics accept failed; continuing");
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
