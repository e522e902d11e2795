//! The client's session and token, as every call to a node carries them:
//! unary calls in their metadata ([`Authorize`]), the command stream's
//! batches and commands in their fields.

use std::sync::Arc;

use parking_lot::RwLock;

use crate::config::Token;
use crate::error::{Error, Result};

/// The metadata key of a request's session stamp (the node's
/// `sessions::SESSION_HEADER`).
const SESSION_HEADER: &str = "ringcache-session";

/// This client's session: a random id, and the generation, bumped before
/// every re-admission flush, that its requests carry as
/// `ringcache-session: <id hex>-<generation>`. A node refuses writes of a
/// generation older than that of the last flush it received from the
/// session, so that a write this client gave up on cannot land after the
/// flush that re-admitted the node.
///
/// It also holds the bearer token every request carries, replaceable while
/// the client runs ([`crate::Client::set_token`]).
pub(crate) struct Session {
    id: u64,
    /// The generation and its header value; the lock is held only to clone
    /// the value or to bump both together (so the header never goes back).
    current: RwLock<(u64, tonic::metadata::MetadataValue<tonic::metadata::Ascii>)>,
    /// `Bearer <token>`, if the client has a token; the lock is held only
    /// to clone the value or to replace it.
    authorization: RwLock<Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>>,
}

impl Session {
    pub(crate) fn new(token: Option<&Token>) -> Result<Self> {
        let id = rand::random::<u64>();
        Ok(Session {
            id,
            current: RwLock::new((0, Session::header(id, 0))),
            authorization: RwLock::new(token.map(authorization).transpose()?),
        })
    }

    /// Replaces the token of every request sent from now on.
    pub(crate) fn set_token(&self, token: Option<&Token>) -> Result<()> {
        let value = token.map(authorization).transpose()?;
        *self.authorization.write() = value;
        Ok(())
    }

    fn header(id: u64, generation: u64) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
        format!("{id:016x}-{generation}")
            .parse()
            .expect("hex digits, a dash and decimal digits are valid metadata")
    }

    /// Starts a new generation: requests sent from now on are newer than
    /// every request sent before.
    pub(crate) fn bump(&self) -> u64 {
        let mut current = self.current.write();
        let generation = current.0 + 1;
        *current = (generation, Session::header(self.id, generation));
        generation
    }

    fn value(&self) -> tonic::metadata::MetadataValue<tonic::metadata::Ascii> {
        self.current.read().1.clone()
    }

    /// The current generation, which a command carries.
    pub(crate) fn generation(&self) -> u64 {
        self.current.read().0
    }

    /// The session id as a batch of commands carries it.
    pub(crate) fn id_text(&self) -> String {
        format!("{:016x}", self.id)
    }

    /// The `authorization` value as a batch of commands carries it; empty
    /// without a token.
    pub(crate) fn authorization_text(&self) -> String {
        self.authorization
            .read()
            .as_ref()
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }
}

/// The `authorization` metadata value of `token`.
fn authorization(token: &Token) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> {
    let mut value = format!("Bearer {}", token.expose())
        .parse::<tonic::metadata::MetadataValue<_>>()
        .map_err(|_| Error::Config {
            field: "token",
            reason: "must be printable ASCII".into(),
        })?;
    // Keeps it out of debug output of the headers (HPACK also leaves
    // sensitive values out of its table).
    value.set_sensitive(true);
    Ok(value)
}

/// Adds the client's bearer token and session stamp to every request.
#[derive(Clone)]
pub(crate) struct Authorize {
    pub(super) session: Arc<Session>,
}

impl tonic::service::Interceptor for Authorize {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(header) = self.session.authorization.read().clone() {
            request.metadata_mut().insert("authorization", header);
        }
        request
            .metadata_mut()
            .insert(SESSION_HEADER, self.session.value());
        Ok(request)
    }
}
