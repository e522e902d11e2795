//! The single mapping from domain errors to gRPC status codes.
//!
//! Domain crates do not pick `tonic::Code`s themselves: their error enums say
//! which [`ErrorKind`] each variant is, and [`ServiceError::to_status`] turns
//! that into a status. The client maps codes back with [`ErrorKind::from_code`],
//! so both ends agree on what "retryable" means.

use tonic::{Code, Status};

/// The kinds of failure the wire distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request itself is wrong (bad key, value too large, TTL out of
    /// range). Retrying the same request fails the same way.
    InvalidArgument,
    /// The named thing (for example a keyspace) does not exist.
    NotFound,
    /// The caller is not allowed to do this.
    PermissionDenied,
    /// The caller is not authenticated.
    Unauthenticated,
    /// A limit was reached (capacity, rate); retrying later may succeed.
    ResourceExhausted,
    /// A precondition of the system's state does not hold.
    FailedPrecondition,
    /// The server cannot serve right now (shutting down, overloaded);
    /// retrying elsewhere or later may succeed.
    Unavailable,
    /// The deadline passed before the work finished.
    DeadlineExceeded,
    /// A bug or an unexpected failure inside the server.
    Internal,
}

impl ErrorKind {
    /// The gRPC code for this kind.
    pub fn code(self) -> Code {
        match self {
            ErrorKind::InvalidArgument => Code::InvalidArgument,
            ErrorKind::NotFound => Code::NotFound,
            ErrorKind::PermissionDenied => Code::PermissionDenied,
            ErrorKind::Unauthenticated => Code::Unauthenticated,
            ErrorKind::ResourceExhausted => Code::ResourceExhausted,
            ErrorKind::FailedPrecondition => Code::FailedPrecondition,
            ErrorKind::Unavailable => Code::Unavailable,
            ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
            ErrorKind::Internal => Code::Internal,
        }
    }

    /// The kind a received gRPC code stands for. Codes the node never sends
    /// on purpose (for example `Unknown`, `Aborted`) count as `Unavailable`:
    /// they come from transports and proxies, not from the request.
    pub fn from_code(code: Code) -> Self {
        match code {
            Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidArgument,
            Code::NotFound => ErrorKind::NotFound,
            Code::PermissionDenied => ErrorKind::PermissionDenied,
            Code::Unauthenticated => ErrorKind::Unauthenticated,
            Code::ResourceExhausted => ErrorKind::ResourceExhausted,
            Code::FailedPrecondition => ErrorKind::FailedPrecondition,
            Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
            Code::Internal | Code::DataLoss | Code::Unimplemented => ErrorKind::Internal,
            _ => ErrorKind::Unavailable,
        }
    }

    /// Whether the same request may succeed if sent again (to the same or
    /// another node). Only idempotent operations are ever retried.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Unavailable | ErrorKind::DeadlineExceeded | ErrorKind::ResourceExhausted
        )
    }
}

/// A domain error that can cross the wire.
pub trait ServiceError: std::error::Error {
    /// Which kind of failure this is.
    fn kind(&self) -> ErrorKind;

    /// The status sent to the caller: the kind's code and the error's
    /// message (which names the limit or the thing that is wrong).
    fn to_status(&self) -> Status {
        Status::new(self.kind().code(), self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_code() {
        let kinds = [
            ErrorKind::InvalidArgument,
            ErrorKind::NotFound,
            ErrorKind::PermissionDenied,
            ErrorKind::Unauthenticated,
            ErrorKind::ResourceExhausted,
            ErrorKind::FailedPrecondition,
            ErrorKind::Unavailable,
            ErrorKind::DeadlineExceeded,
            ErrorKind::Internal,
        ];
        for kind in kinds {
            assert_eq!(ErrorKind::from_code(kind.code()), kind);
        }
    }

    #[test]
    fn only_transient_kinds_are_retryable() {
        assert!(ErrorKind::Unavailable.is_retryable());
        assert!(!ErrorKind::InvalidArgument.is_retryable());
        assert!(!ErrorKind::Internal.is_retryable());
    }
}
