//! Typed values: a pluggable codec between Rust values and the bytes the
//! cache stores.

use std::marker::PhantomData;

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};

use crate::client::{Client, SetOptions, SetOutcome};
use crate::error::{Error, Result};

/// Turns values into bytes and back. Implement it for your own format
/// (bincode, protobuf, compression…); [`Json`] is built in.
pub trait Codec: Send + Sync + 'static {
    /// Encodes a value.
    ///
    /// # Errors
    /// [`Error::Codec`] when the value cannot be encoded.
    fn encode<T: Serialize>(&self, value: &T) -> Result<Bytes>;

    /// Decodes a value.
    ///
    /// # Errors
    /// [`Error::Codec`] when the bytes are not a valid `T`.
    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T>;
}

/// JSON through serde_json.
#[derive(Clone, Copy, Debug, Default)]
pub struct Json;

impl Codec for Json {
    fn encode<T: Serialize>(&self, value: &T) -> Result<Bytes> {
        serde_json::to_vec(value)
            .map(Bytes::from)
            .map_err(|e| Error::Codec(format!("cannot encode as json: {e}")))
    }

    fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T> {
        serde_json::from_slice(bytes).map_err(|e| Error::Codec(format!("cannot decode json: {e}")))
    }
}

/// A typed view of one keyspace: values of type `T` encoded with `C`.
///
/// ```no_run
/// # async fn demo(client: cache_client::Client) -> cache_client::Result<()> {
/// use cache_client::{codec::Json, SetOptions};
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct User { name: String }
/// let users = client.typed::<User, _>("users", Json);
/// users.set("u1", &User { name: "Ada".into() }, SetOptions::new()).await?;
/// let user: Option<(User, u64)> = users.get("u1").await?;
/// # Ok(()) }
/// ```
pub struct Typed<T, C> {
    client: Client,
    keyspace: String,
    codec: C,
    _type: PhantomData<fn() -> T>,
}

impl<T: Serialize + DeserializeOwned, C: Codec> Typed<T, C> {
    pub(crate) fn new(client: Client, keyspace: String, codec: C) -> Self {
        Typed {
            client,
            keyspace,
            codec,
            _type: PhantomData,
        }
    }

    /// Reads and decodes a value, with its version.
    ///
    /// # Errors
    /// As [`Client::get`], or [`Error::Codec`].
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<(T, u64)>> {
        match self.client.get(&self.keyspace, key).await? {
            Some(entry) => Ok(Some((self.codec.decode(&entry.value)?, entry.version))),
            None => Ok(None),
        }
    }

    /// Encodes and writes a value.
    ///
    /// # Errors
    /// As [`Client::set`], or [`Error::Codec`].
    pub async fn set(
        &self,
        key: impl AsRef<[u8]>,
        value: &T,
        options: SetOptions,
    ) -> Result<SetOutcome> {
        let bytes = self.codec.encode(value)?;
        self.client.set(&self.keyspace, key, bytes, options).await
    }

    /// Deletes a key.
    ///
    /// # Errors
    /// As [`Client::delete`].
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        self.client.delete(&self.keyspace, key).await
    }
}

impl Client {
    /// A typed view of `keyspace`.
    pub fn typed<T: Serialize + DeserializeOwned, C: Codec>(
        &self,
        keyspace: &str,
        codec: C,
    ) -> Typed<T, C> {
        Typed::new(self.clone(), keyspace.to_owned(), codec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_and_reports_bad_bytes() {
        let bytes = Json.encode(&vec![1u32, 2, 3]).unwrap();
        let back: Vec<u32> = Json.decode(&bytes).unwrap();
        assert_eq!(back, [1, 2, 3]);
        let err = Json.decode::<Vec<u32>>(b"not json").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("codec error: cannot decode json"),
            "{err}"
        );
    }
}
