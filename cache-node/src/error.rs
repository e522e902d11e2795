//! The node's error type: everything a request or start-up can fail with.

use ringcache_proto::{ErrorKind, ServiceError};

/// Result alias for the node.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the node. Messages are lowercase and name
/// the limit or field that was violated, so a client can show them as they are.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request carried an empty key.
    #[error("key is empty")]
    EmptyKey,
    /// A request carried a key longer than `limits.max_key_bytes`.
    #[error("key of {len} bytes exceeds max_key_bytes ({max})")]
    KeyTooLarge {
        /// Length of the offending key.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// A write carried a value longer than `limits.max_value_bytes`.
    #[error("value of {len} bytes exceeds max_value_bytes ({max})")]
    ValueTooLarge {
        /// Length of the offending value.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// A write asked for a TTL above `limits.max_ttl`.
    #[error("ttl of {ttl_ms} ms exceeds max_ttl ({max_ms} ms)")]
    TtlOutOfRange {
        /// The requested TTL.
        ttl_ms: u64,
        /// The configured maximum.
        max_ms: u64,
    },
    /// A `Prepare` asked for a pending timeout above
    /// `limits.max_pending_timeout`. Refused rather than capped: its writer
    /// would believe its change pending for longer than the node keeps it.
    #[error("pending timeout of {timeout_ms} ms exceeds max_pending_timeout ({max_ms} ms)")]
    PendingTimeoutOutOfRange {
        /// The requested timeout.
        timeout_ms: u64,
        /// The configured maximum.
        max_ms: u64,
    },
    /// A batch request named more keys than `limits.max_batch_keys`.
    #[error("batch of {len} keys exceeds max_batch_keys ({max})")]
    BatchTooLarge {
        /// Number of keys in the batch.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The keyspace is not configured and the node rejects unknown keyspaces.
    #[error("unknown keyspace {name:?} (unknown_keyspaces = \"reject\")")]
    UnknownKeyspace {
        /// The keyspace the request named.
        name: String,
    },
    /// The keyspace name is not a valid name.
    #[error("invalid keyspace name {name:?}: {reason}")]
    InvalidKeyspaceName {
        /// The name the request carried.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Creating the keyspace on demand would exceed `limits.max_keyspaces`.
    #[error("creating keyspace {name:?} would exceed max_keyspaces ({max})")]
    TooManyKeyspaces {
        /// The keyspace the request named.
        name: String,
        /// The configured maximum.
        max: usize,
    },
    /// A dirty (write-back) write would take the keyspace's dirty entries
    /// beyond `max_dirty_bytes`; nothing was stored.
    #[error("dirty bytes of keyspace {keyspace:?} would exceed max_dirty_bytes ({max})")]
    DirtyBytesExhausted {
        /// The keyspace written to.
        keyspace: String,
        /// The dirty bytes the keyspace would have held with the write.
        bytes: u64,
        /// The configured maximum.
        max: u64,
    },
    /// A 2PC request carried an empty transaction id.
    #[error("txn_id is empty")]
    EmptyTxnId,
    /// A 2PC request carried a transaction id longer than
    /// [`crate::store::MAX_TXN_ID_BYTES`].
    #[error("txn_id of {len} bytes exceeds {max} bytes")]
    TxnIdTooLong {
        /// Length of the offending id.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// A request is malformed in a way the message names (missing field,
    /// unknown enum value).
    #[error("malformed request: {0}")]
    Malformed(String),
    /// A RESP client sent bytes that are not a RESP request, or a request
    /// above the listener's limits; the connection is closed after the
    /// reply, because the stream cannot be resynchronised.
    #[error("Protocol error: {0}")]
    Protocol(String),
    /// `INCR`/`DECR` on a value that is not a decimal 64-bit integer.
    #[error("value is not an integer or out of range")]
    NotAnInteger,
    /// `INCR`/`DECR` would take the value beyond the 64-bit range.
    #[error("increment or decrement would overflow")]
    IncrementOverflow,
    /// A read-modify-write (`INCR`, `EXPIRE`) met a dirty write-back entry,
    /// which only versioned writes may replace.
    #[error("key has a write-back entry not yet stored; it cannot be changed in place")]
    DirtyEntry,
    /// The node requires a token and the request carried none, or one it
    /// does not know.
    #[error("unauthenticated: {0}")]
    Unauthenticated(&'static str),
    /// The caller's token lacks the permission the request needs.
    #[error("token {token:?} has no {need} permission on keyspace {keyspace:?}")]
    PermissionDenied {
        /// The token's name.
        token: String,
        /// The keyspace (`*` for requests spanning every keyspace).
        keyspace: String,
        /// The permission needed.
        need: &'static str,
    },
    /// A write was sent by a client before the flush with which that client
    /// re-admitted this node (`crate::sessions`): the client gave it up, and
    /// applying it now could bring back an overwritten value.
    #[error(
        "write of client session {session:x} generation {generation} predates the flush of generation {flushed}; refused"
    )]
    StaleSession {
        /// The client's session id.
        session: u64,
        /// The generation the write was sent under.
        generation: u64,
        /// The generation of the session's last flush of this node.
        flushed: u64,
    },
    /// The caller's rate limit is exhausted.
    #[error("rate limit of {identity} exceeded; retry after {retry_after_ms} ms")]
    RateLimited {
        /// The token's name, or the peer address of a caller without one.
        identity: String,
        /// How long until the next request may pass.
        retry_after_ms: u64,
    },
    /// The node already works on `limits.max_concurrent_requests` requests.
    #[error("node is at max_concurrent_requests ({max}); retry later")]
    Overloaded {
        /// The configured maximum.
        max: usize,
    },
    /// The TLS certificate, key or CA could not be loaded.
    #[error("tls setup failed: {0}")]
    Tls(String),
    /// The configuration is invalid; the message names the field.
    #[error("invalid config: {field}: {reason}")]
    Config {
        /// Dotted path of the offending field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The configuration file could not be read or parsed.
    #[error("cannot load config file {path}: {reason}")]
    ConfigFile {
        /// The file.
        path: String,
        /// The reading or parsing error.
        reason: String,
    },
    /// A listener, the gRPC server or the metrics server failed.
    #[error("server error: {0}")]
    Server(String),
}

impl Error {
    pub(crate) fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl ServiceError for Error {
    fn kind(&self) -> ErrorKind {
        match self {
            Error::EmptyKey
            | Error::KeyTooLarge { .. }
            | Error::ValueTooLarge { .. }
            | Error::TtlOutOfRange { .. }
            | Error::PendingTimeoutOutOfRange { .. }
            | Error::BatchTooLarge { .. }
            | Error::EmptyTxnId
            | Error::TxnIdTooLong { .. }
            | Error::InvalidKeyspaceName { .. }
            | Error::Malformed(_)
            | Error::Protocol(_)
            | Error::NotAnInteger
            | Error::IncrementOverflow => ErrorKind::InvalidArgument,
            Error::DirtyEntry => ErrorKind::FailedPrecondition,
            // The client gave the request up (its deadline passed) before
            // the node saw it.
            Error::StaleSession { .. } => ErrorKind::DeadlineExceeded,
            Error::UnknownKeyspace { .. } => ErrorKind::NotFound,
            Error::TooManyKeyspaces { .. }
            | Error::DirtyBytesExhausted { .. }
            | Error::RateLimited { .. }
            | Error::Overloaded { .. } => ErrorKind::ResourceExhausted,
            Error::Unauthenticated(_) => ErrorKind::Unauthenticated,
            Error::PermissionDenied { .. } => ErrorKind::PermissionDenied,
            Error::Config { .. } | Error::ConfigFile { .. } | Error::Server(_) | Error::Tls(_) => {
                ErrorKind::Internal
            }
        }
    }
}
