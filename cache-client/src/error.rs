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
    /// A write-through write met another write of the same key in flight
    /// (its change is pending on a node); retrying later succeeds once that
    /// one commits or aborts.
    #[error("write conflict in keyspace {keyspace:?}: {reason}")]
    Conflict {
        /// The keyspace of the call.
        keyspace: String,
        /// Which node refused and why.
        reason: String,
    },
    /// A write-through writer was held up between its prepare and its
    /// commit for longer than the keyspace's `pending_timeout` (a slow
    /// database, a lock wait, a paused process): the nodes may have given
    /// its change up, so it rolled the write back instead of committing.
    /// Nothing changed; retrying may succeed.
    #[error(
        "write-through write in keyspace {keyspace:?} rolled back: {elapsed:?} passed between prepare and commit, more than pending_timeout ({pending_timeout:?})"
    )]
    PendingTimedOut {
        /// The keyspace of the call.
        keyspace: String,
        /// How long the prepare phase took.
        elapsed: Duration,
        /// The keyspace's pending timeout.
        pending_timeout: Duration,
    },
    /// A keyspace configuration is invalid; the message names the keyspace
    /// and the field. The previous configuration stays in force.
    #[error("invalid keyspace config: keyspaces.{keyspace}.{field}: {reason}")]
    KeyspaceConfig {
        /// The keyspace.
        keyspace: String,
        /// The field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The call needs something the keyspace does not have (a store, a
    /// strategy that supports it).
    #[error("keyspace {keyspace:?}: {reason}")]
    Unsupported {
        /// The keyspace.
        keyspace: String,
        /// What is missing.
        reason: String,
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
    /// An input of [`crate::plan::plan`] is out of range; the message names
    /// it.
    #[error("invalid plan input: {field}: {reason}")]
    PlanInput {
        /// The offending input.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The data store behind a keyspace failed: a lost connection, a
    /// timeout, a row locked by a prepared transaction, a serialization
    /// failure. The same call may succeed later.
    #[error("store failed: {message}")]
    Store {
        /// The keyspace of the call; empty for calls not tied to one
        /// (`commit_prepared`, `abort_prepared`, `in_doubt`).
        keyspace: String,
        /// What failed; names the keyspace and table, or the transaction.
        message: String,
    },
    /// The data store refused the request itself: a version above
    /// `i64::MAX`, a layout whose statements do not fit its table, a
    /// constraint violation, a transaction id already in use. Retrying fails
    /// the same way.
    #[error("store refused the request: {message}")]
    StoreRejected {
        /// The keyspace of the call; empty for calls not tied to one.
        keyspace: String,
        /// What was refused; names the keyspace and table, or the
        /// transaction.
        message: String,
    },
    /// No prepared transaction has this id: it was already committed or
    /// rolled back, or never prepared.
    #[error("no prepared transaction {txn}")]
    TxnNotFound {
        /// The transaction id (the PostgreSQL gid).
        txn: String,
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
            | Error::QuorumNotReached { .. }
            | Error::Store { .. }
            | Error::Conflict { .. }
            | Error::PendingTimedOut { .. } => true,
            Error::Codec(_)
            | Error::KeyspaceConfig { .. }
            | Error::Unsupported { .. }
            | Error::Config { .. }
            | Error::PlanInput { .. }
            | Error::StoreRejected { .. }
            | Error::TxnNotFound { .. } => false,
        }
    }

    /// A short stable name of the error's variant, the `kind` label of the
    /// client's error metrics (`docs/metrics.md`).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NoSeedReachable { .. } => "no_seed_reachable",
            Error::NoNodeAvailable { .. } => "no_node_available",
            Error::Refused { .. } => "refused",
            Error::Unavailable { .. } => "unavailable",
            Error::DeadlineExceeded { .. } => "deadline_exceeded",
            Error::QuorumNotReached { .. } => "quorum_not_reached",
            Error::Conflict { .. } => "conflict",
            Error::PendingTimedOut { .. } => "pending_timed_out",
            Error::KeyspaceConfig { .. } => "keyspace_config",
            Error::Unsupported { .. } => "unsupported",
            Error::Codec(_) => "codec",
            Error::Config { .. } => "config",
            Error::PlanInput { .. } => "plan_input",
            Error::Store { .. } => "store",
            Error::StoreRejected { .. } => "store_rejected",
            Error::TxnNotFound { .. } => "txn_not_found",
        }
    }

    /// Classifies a status from `node`: refusals of the request itself versus
    /// failures of the node or the network.
    pub(crate) fn from_status(node: &str, status: &tonic::Status) -> Error {
        let kind = ErrorKind::from_code(status.code());
        // A node that refuses for a limit (a rate limit, its concurrency
        // limit, dirty bytes) is alive: routing around it would move the
        // load onto other nodes and later flush this one. The refusal goes
        // back to the caller, retryable.
        if kind != ErrorKind::ResourceExhausted
            && (kind.is_retryable() || kind == ErrorKind::Internal)
        {
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
