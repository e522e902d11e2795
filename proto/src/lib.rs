//! The ringcache wire contract.
//!
//! - [`v1`]: the generated messages, the `CacheNode` client and server, and
//!   [`v1::FILE_DESCRIPTOR_SET`] for gRPC server reflection.
//! - [`error`]: the one table that maps a domain error to a gRPC status code.
//!
//! Only the node's gRPC layer and the client's transport use these types; the
//! domain cores of both convert at their edges.

pub mod error;

/// `ringcache.v1`: generated from `proto/ringcache/v1/cache.proto`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("ringcache.v1");

    /// Encoded `FileDescriptorSet` of `ringcache.v1`, served by the node's
    /// reflection service so that `grpcurl` works without the `.proto` file.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("ringcache_v1_descriptor");
}

pub use error::{ErrorKind, ServiceError};
