//! The Redis protocol (RESP2) listener: a second, thin transport over the
//! same [`crate::store::Store`] as gRPC.
//!
//! - [`parse`]: the pure, incremental request parser, with limits checked
//!   from the headers before the bytes they announce are buffered.
//! - [`reply`]: RESP2 replies and their encoding.
//! - [`command`]: maps each command to store calls (`docs/node.md` lists
//!   them, the key mapping and the differences from Redis).
//! - [`conn`]: the accept loop and the per-connection loop (pipelined
//!   requests are answered in order, replies written per batch), drained on
//!   shutdown.

pub mod command;
pub mod conn;
pub mod parse;
pub mod reply;

pub use conn::serve;
