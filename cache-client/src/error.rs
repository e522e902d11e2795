//! The client's error type.

use std::time::Duration;

use ringcache_proto::ErrorKind;

/// Result alias for the client.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a client call can fail with.
///
/// [`Error::is_retryable`] tells whether the same call may succeed later; the
/// client has already retried idempotent calls within their deadline when it
/// returns one of these.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// None of the seed nodes answered `Topology` at start-up.
    #[error("no seed node answered ({seeds}): {last}")]
    NoSeedReachable {
        /// The seeds tried, comma-separated.
        seeds: String,
        /// The last failure seen.
        last: String,
    },
    /// Every node that could serve the key is down or was tried and failed.
    #[error("no node available for keyspace {keyspace:?}: {reason}")]
    NoNodeAvailable {
        /// The keyspace of the call.
        keyspace: String,
        /// Why (empty ring, all candidates down, last failure).
        reason: String,
    },
    /// A node refused the request itself (bad key, value too large, unknown
    /// keyspace). Retrying the same request fails the same way.
    #[error("node {node} refused the request: {message}")]
    Refused {
        /// The node that answered.
        node: String,
        /// What kind of refusal.
        kind: ErrorKind,
        /// The node's message, which names the limit or field.
        message: String,
    },
    /// A node could not be reached or failed while serving.
    #[error("node {node} unavailable: {message}")]
    Unavailable {
        /// The node.
        node: String,
        /// The transport or server failure.
        message: String,
    },
    /// The call's overall deadline passed.
    #[error("deadline of {deadline:?} exceeded; last failure: {last}")]
    DeadlineExceeded {
        /// The deadline the call had.
        deadline: Duration,
        /// The last failure before the deadline, if any.
        last: String,
    },
    /// A replicated write reached fewer replicas than its write quorum.
    #[error("write reached {acked} of {needed} replicas needed; last failure: {last}")]
    QuorumNotReached {
        /// Replicas that acknowledged.
        acked: usize,
        /// The write quorum.
        needed: usize,
        /// The last replica failure.
        last: String,
    },
    /// A typed value could not be encoded or decoded.
    #[error("codec error: {0}")]
    Codec(String),
    /// The client configuration is invalid; the message names the field.
    #[error("invalid client config: {field}: {reason}")]
    Config {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl Error {
    /// Whether the same call may succeed if made again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Refused { kind, .. } => kind.is_retryable(),
            Error::NoSeedReachable { .. }
            | Error::NoNodeAvailable { .. }
            | Error::Unavailable { .. }
            | Error::DeadlineExceeded { .. }
            | Error::QuorumNotReached { .. } => true,
            Error::Codec(_) | Error::Config { .. } => false,
        }
    }

    /// Classifies a status from `node`: refusals of the request itself versus
    /// failures of the node or the network.
    pub(crate) fn from_status(node: &str, status: &tonic::Status) -> Error {
        let kind = ErrorKind::from_code(status.code());
        if kind.is_retryable() || kind == ErrorKind::Internal {
            Error::Unavailable {
                node: node.to_owned(),
                message: format!("{:?}: {}", status.code(), status.message()),
            }
        } else {
            Error::Refused {
                node: node.to_owned(),
                kind,
                message: status.message().to_owned(),
            }
        }
    }

    /// Whether this failure says something about the node's health (as
    /// opposed to the request being wrong).
    pub(crate) fn is_node_failure(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }
}
