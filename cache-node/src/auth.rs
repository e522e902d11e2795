//! Who may do what: bearer tokens with per-keyspace permissions, per-identity
//! rate limits and the node's concurrency limit. Both transports (gRPC and
//! RESP) resolve a caller to a [`Principal`] once (per request for gRPC, at
//! `AUTH` for RESP) and then ask it cheap questions per keyspace.
//!
//! No transport types live here; `docs/security.md` has the permission of
//! every RPC and command.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Config, Permission, RateLimit};
use crate::error::Error;

/// The permissions key that stands for every keyspace a token does not name.
pub const EVERY_KEYSPACE: &str = "*";

/// The name of the token `resp_password` stands for (Redis's default user).
pub const RESP_PASSWORD_TOKEN: &str = "default";

/// The name callers have when the node requires no token.
pub const ANONYMOUS: &str = "anonymous";

/// An authenticated caller: a token's name, permissions and rate limit.
pub struct Principal {
    name: Arc<str>,
    keyspaces: HashMap<String, Permission>,
    every: Option<Permission>,
    /// The lowest permission the principal has anywhere, when it has one
    /// everywhere (`"*"` is granted): a request needing no more passes
    /// without a lookup, which is every request of an unrestricted caller.
    floor: Option<Permission>,
    limiter: Option<DefaultDirectRateLimiter>,
}

impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principal")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Principal {
    fn new(
        name: &str,
        permissions: impl IntoIterator<Item = (String, Permission)>,
        rate: Option<&RateLimit>,
    ) -> Self {
        let mut keyspaces: HashMap<String, Permission> = permissions.into_iter().collect();
        let every = keyspaces.remove(EVERY_KEYSPACE);
        let floor = every.map(|every| keyspaces.values().copied().fold(every, Permission::min));
        Principal {
            name: name.into(),
            keyspaces,
            every,
            floor,
            limiter: rate.map(|rate| RateLimiter::direct(quota(rate))),
        }
    }

    /// The token's name (safe to log).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the principal has `need` in `keyspace` (a keyspace's own
    /// grant beats `"*"`).
    pub fn allows(&self, keyspace: &str, need: Permission) -> bool {
        if self.floor.is_some_and(|floor| floor >= need) {
            return true;
        }
        match self.keyspaces.get(keyspace) {
            Some(granted) => *granted >= need,
            None => self.every.is_some_and(|every| every >= need),
        }
    }

    /// Whether the principal has `need` in every keyspace (for requests
    /// that span all of them: `Stats` and `Flush` without a keyspace).
    pub fn allows_all(&self, need: Permission) -> bool {
        self.floor.is_some_and(|floor| floor >= need)
    }

    /// [`Principal::allows`] as a result.
    ///
    /// # Errors
    /// [`Error::PermissionDenied`] naming the token, keyspace and permission.
    pub fn check(&self, keyspace: &str, need: Permission) -> Result<(), Error> {
        if self.allows(keyspace, need) {
            Ok(())
        } else {
            Err(self.denied(keyspace, need))
        }
    }

    /// [`Principal::allows_all`] as a result.
    ///
    /// # Errors
    /// [`Error::PermissionDenied`] naming the token and permission.
    pub fn check_all(&self, need: Permission) -> Result<(), Error> {
        if self.allows_all(need) {
            Ok(())
        } else {
            Err(self.denied(EVERY_KEYSPACE, need))
        }
    }

    fn denied(&self, keyspace: &str, need: Permission) -> Error {
        Error::PermissionDenied {
            token: self.name.to_string(),
            keyspace: keyspace.to_owned(),
            need: need.name(),
        }
    }
}

fn quota(rate: &RateLimit) -> Quota {
    // `RateLimit::validate` keeps `per / requests` at least 1 ns and both
    // counts at least 1.
    let period = rate.per / rate.requests;
    let burst = NonZeroU32::new(rate.burst.unwrap_or(rate.requests))
        .expect("validated: burst and requests are at least 1");
    Quota::with_period(period)
        .expect("validated: the period is at least 1ns")
        .allow_burst(burst)
}

fn retry_after(not_until: &governor::NotUntil<<DefaultClock as Clock>::Instant>) -> Duration {
    not_until.wait_time_from(DefaultClock::default().now())
}

struct Token {
    secret: Vec<u8>,
    principal: Arc<Principal>,
}

/// The tokens the node accepts, swapped as a whole on a reload.
struct Tokens {
    tokens: Vec<Token>,
    /// Whether gRPC calls must carry a token (`auth.tokens` is set).
    grpc_required: bool,
    /// Whether RESP connections must `AUTH` (tokens or `resp_password`).
    resp_required: bool,
}

impl Tokens {
    /// The tokens `config` names. Token secrets must have been resolved
    /// ([`Config::resolve_secrets`]) and the config validated.
    fn new(config: &Config) -> Self {
        let default_rate = config.limits.rate_limit.as_ref();
        let mut tokens: Vec<Token> = config
            .auth
            .tokens
            .iter()
            .map(|token| Token {
                secret: token
                    .secret
                    .as_ref()
                    .map(|s| s.expose().as_bytes().to_vec())
                    .unwrap_or_default(),
                principal: Arc::new(Principal::new(
                    &token.name,
                    token.permissions.clone(),
                    token.rate_limit.as_ref().or(default_rate),
                )),
            })
            .collect();
        if let Some(password) = &config.resp_password {
            tokens.push(Token {
                secret: password.expose().as_bytes().to_vec(),
                principal: Arc::new(Principal::new(
                    RESP_PASSWORD_TOKEN,
                    [(EVERY_KEYSPACE.to_owned(), Permission::Admin)],
                    default_rate,
                )),
            });
        }
        // Validation refuses empty secrets; an unresolved one must never
        // match an empty password.
        tokens.retain(|token| !token.secret.is_empty());
        Tokens {
            grpc_required: !config.auth.tokens.is_empty(),
            resp_required: !tokens.is_empty(),
            tokens,
        }
    }

    fn by_secret(&self, secret: &[u8]) -> Option<Arc<Principal>> {
        let mut found = None;
        for token in &self.tokens {
            if constant_time_eq(&token.secret, secret) {
                found = Some(Arc::clone(&token.principal));
            }
        }
        found
    }
}

/// The node's authentication and admission state, shared by both
/// transports.
pub struct Auth {
    /// Replaced whole by [`Auth::reload`]; every request reads the current
    /// table without a lock.
    tokens: ArcSwap<Tokens>,
    anonymous: Arc<Principal>,
    /// Rate limit of callers without a token, by peer address.
    anonymous_limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    concurrency: Option<(Arc<Semaphore>, usize)>,
}

impl Auth {
    /// The state `config` describes. Token secrets must have been resolved
    /// ([`Config::resolve_secrets`]) and the config validated.
    pub fn new(config: &Config) -> Self {
        let default_rate = config.limits.rate_limit.as_ref();
        Auth {
            tokens: ArcSwap::from_pointee(Tokens::new(config)),
            // Without a token, the anonymous caller's limit is per address,
            // so its own bucket stays unused.
            anonymous: Arc::new(Principal::new(
                ANONYMOUS,
                [(EVERY_KEYSPACE.to_owned(), Permission::Admin)],
                None,
            )),
            anonymous_limiter: default_rate.map(|rate| RateLimiter::keyed(quota(rate))),
            concurrency: config
                .limits
                .max_concurrent_requests
                .map(|max| (Arc::new(Semaphore::new(max)), max)),
        }
    }

    /// Replaces the accepted tokens (`auth.tokens` and `resp_password`)
    /// with `config`'s, at once for every later request: the rotation of a
    /// secret without a restart (`docs/security.md`). Token buckets start
    /// full again; the anonymous limit and the concurrency limit are kept
    /// (they change at a restart). Returns the number of tokens now
    /// accepted. `config` must be resolved and validated.
    pub fn reload(&self, config: &Config) -> usize {
        let tokens = Tokens::new(config);
        let count = tokens.tokens.len();
        self.tokens.store(Arc::new(tokens));
        count
    }

    /// The principal of a gRPC call from its `authorization` metadata value
    /// (`Bearer <secret>`); without required tokens, the anonymous one.
    ///
    /// # Errors
    /// [`Error::Unauthenticated`] when tokens are required and the value is
    /// missing, malformed or names no token.
    pub fn bearer(&self, authorization: Option<&[u8]>) -> Result<Arc<Principal>, Error> {
        let tokens = self.tokens.load();
        if !tokens.grpc_required {
            return Ok(Arc::clone(&self.anonymous));
        }
        let secret = authorization
            .and_then(|value| {
                let (scheme, secret) = value.split_at_checked(7)?;
                scheme.eq_ignore_ascii_case(b"bearer ").then_some(secret)
            })
            .ok_or(Error::Unauthenticated("missing bearer token"))?;
        tokens
            .by_secret(secret)
            .ok_or(Error::Unauthenticated("unknown bearer token"))
    }

    /// Whether RESP connections must `AUTH` first.
    pub fn resp_required(&self) -> bool {
        self.tokens.load().resp_required
    }

    /// The principal of a RESP connection that has not authenticated (when
    /// none is required).
    pub fn anonymous(&self) -> Arc<Principal> {
        Arc::clone(&self.anonymous)
    }

    /// The principal a RESP `AUTH [name] secret` names: with a name, that
    /// token's (or `default`, `resp_password`'s); without, the token whose
    /// secret it is.
    pub fn password(&self, name: Option<&[u8]>, secret: &[u8]) -> Option<Arc<Principal>> {
        let tokens = self.tokens.load();
        match name {
            None => tokens.by_secret(secret),
            Some(name) => {
                // Compare every token's secret whatever the name, so that
                // the time taken does not tell which names exist.
                let mut found = None;
                for token in &tokens.tokens {
                    let matches = constant_time_eq(&token.secret, secret);
                    if matches && token.principal.name.as_bytes() == name {
                        found = Some(Arc::clone(&token.principal));
                    }
                }
                found
            }
        }
    }

    /// Takes one request from the caller's bucket: the token's, or for the
    /// anonymous caller the bucket of its address.
    ///
    /// # Errors
    /// [`Error::RateLimited`] with the wait before a request may pass.
    pub fn admit(&self, principal: &Principal, peer: Option<IpAddr>) -> Result<(), Error> {
        let refused = |wait: Duration, identity: String| Error::RateLimited {
            identity,
            retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1),
        };
        if let Some(limiter) = &principal.limiter {
            return limiter
                .check()
                .map_err(|not_until| refused(retry_after(&not_until), principal.name.to_string()));
        }
        if let (Some(limiter), Some(peer)) = (&self.anonymous_limiter, peer)
            && std::ptr::eq(principal, &*self.anonymous)
        {
            return limiter
                .check_key(&peer)
                .map_err(|not_until| refused(retry_after(&not_until), peer.to_string()));
        }
        Ok(())
    }

    /// A slot of the node's concurrency limit, held while a request is
    /// worked on; `None` when there is no limit.
    ///
    /// # Errors
    /// [`Error::Overloaded`] when every slot is taken.
    pub fn slot(&self) -> Result<Option<OwnedSemaphorePermit>, Error> {
        match &self.concurrency {
            None => Ok(None),
            Some((semaphore, max)) => Arc::clone(semaphore)
                .try_acquire_owned()
                .map(Some)
                .map_err(|_| Error::Overloaded { max: *max }),
        }
    }

    /// Forgets idle anonymous callers' buckets (full buckets carry no
    /// state), so that the table does not grow with every address seen.
    pub fn forget_idle(&self) {
        if let Some(limiter) = &self.anonymous_limiter {
            limiter.retain_recent();
        }
    }
}

/// Compares without an early exit, so that the time taken does not tell
/// how much of a guessed secret was right (only whether its length was).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secret, TokenConfig};

    fn token(name: &str, secret: &str, permissions: &[(&str, Permission)]) -> TokenConfig {
        TokenConfig {
            name: name.into(),
            secret: Some(Secret::new(secret)),
            secret_file: None,
            secret_env: None,
            permissions: permissions
                .iter()
                .map(|(k, p)| ((*k).to_owned(), *p))
                .collect(),
            rate_limit: None,
        }
    }

    fn auth(tokens: Vec<TokenConfig>) -> Auth {
        let mut config = Config::default();
        config.auth.tokens = tokens;
        config.validate().unwrap();
        Auth::new(&config)
    }

    #[test]
    fn a_keyspace_grant_beats_every_keyspace() {
        let auth = auth(vec![token(
            "app",
            "s3",
            &[("*", Permission::Read), ("users", Permission::Write)],
        )]);
        let app = auth.bearer(Some(b"Bearer s3")).unwrap();
        assert!(app.allows("users", Permission::Write));
        assert!(!app.allows("users", Permission::Admin));
        assert!(app.allows("orders", Permission::Read));
        assert!(!app.allows("orders", Permission::Write));
        assert!(app.allows_all(Permission::Read));
        assert!(!app.allows_all(Permission::Write));
        let err = app.check("orders", Permission::Write).unwrap_err();
        assert_eq!(
            err.to_string(),
            "token \"app\" has no write permission on keyspace \"orders\""
        );
    }

    #[test]
    fn a_token_without_every_keyspace_has_only_what_it_names() {
        let auth = auth(vec![token("w", "x", &[("users", Permission::Admin)])]);
        let w = auth.bearer(Some(b"bearer x")).unwrap();
        assert!(w.allows("users", Permission::Admin));
        assert!(!w.allows("orders", Permission::Read));
        assert!(!w.allows_all(Permission::Read));
    }

    #[test]
    fn wrong_missing_and_malformed_tokens_are_unauthenticated() {
        let auth = auth(vec![token("app", "secret", &[("*", Permission::Read)])]);
        for header in [
            None,
            Some(&b"Bearer wrong"[..]),
            Some(b"Basic secret"),
            Some(b"secret"),
            Some(b"Bearer "),
        ] {
            assert!(
                matches!(auth.bearer(header), Err(Error::Unauthenticated(_))),
                "{header:?}"
            );
        }
        assert!(auth.password(Some(b"app"), b"secret").is_some());
        assert!(auth.password(Some(b"other"), b"secret").is_none());
        assert!(auth.password(None, b"secret").is_some());
        assert!(auth.password(None, b"").is_none());
    }

    #[test]
    fn a_reload_swaps_the_tokens_for_the_next_request() {
        let auth = auth(vec![token(
            "old",
            "old-secret",
            &[("*", Permission::Write)],
        )]);
        assert!(auth.bearer(Some(b"Bearer old-secret")).is_ok());
        let principal = auth.bearer(Some(b"Bearer old-secret")).unwrap();

        // Rotation: both accepted, then only the new one.
        let mut both = Config::default();
        both.auth.tokens = vec![
            token("old", "old-secret", &[("*", Permission::Write)]),
            token("new", "new-secret", &[("*", Permission::Write)]),
        ];
        both.validate().unwrap();
        assert_eq!(auth.reload(&both), 2);
        assert!(auth.bearer(Some(b"Bearer old-secret")).is_ok());
        assert_eq!(
            auth.bearer(Some(b"Bearer new-secret")).unwrap().name(),
            "new"
        );
        assert!(auth.password(Some(b"new"), b"new-secret").is_some());

        let mut new = Config::default();
        new.auth.tokens = vec![token("new", "new-secret", &[("*", Permission::Write)])];
        new.validate().unwrap();
        assert_eq!(auth.reload(&new), 1);
        assert!(matches!(
            auth.bearer(Some(b"Bearer old-secret")),
            Err(Error::Unauthenticated(_))
        ));
        assert!(auth.password(None, b"old-secret").is_none());
        assert!(auth.bearer(Some(b"Bearer new-secret")).is_ok());
        // A principal resolved before the reload keeps its permissions
        // for the request it serves.
        assert!(principal.allows("k", Permission::Write));

        // Dropping every token opens the node, as a restart would.
        assert_eq!(auth.reload(&Config::default()), 0);
        assert!(!auth.resp_required());
        assert_eq!(auth.bearer(None).unwrap().name(), ANONYMOUS);
    }

    #[test]
    fn without_tokens_everyone_is_anonymous_with_every_permission() {
        let auth = auth(Vec::new());
        assert!(!auth.resp_required());
        let anyone = auth.bearer(None).unwrap();
        assert_eq!(anyone.name(), ANONYMOUS);
        assert!(anyone.allows_all(Permission::Admin));
    }

    #[test]
    fn a_bucket_with_a_tiny_refill_rate_engages_after_its_burst() {
        let mut config = Config::default();
        let mut app = token("app", "s", &[("*", Permission::Read)]);
        app.rate_limit = Some(RateLimit {
            requests: 1,
            per: Duration::from_secs(3600),
            burst: Some(2),
        });
        config.auth.tokens = vec![app];
        config.limits.rate_limit = Some(RateLimit {
            requests: 1,
            per: Duration::from_secs(3600),
            burst: None,
        });
        config.validate().unwrap();
        let auth = Auth::new(&config);
        let app = auth.bearer(Some(b"Bearer s")).unwrap();
        auth.admit(&app, None).unwrap();
        auth.admit(&app, None).unwrap();
        let err = auth.admit(&app, None).unwrap_err();
        assert!(
            matches!(err, Error::RateLimited { retry_after_ms, .. } if retry_after_ms > 1000),
            "{err}"
        );
        // Anonymous callers are limited per address.
        let anyone = auth.anonymous();
        let a = Some(IpAddr::from([127, 0, 0, 1]));
        let b = Some(IpAddr::from([127, 0, 0, 2]));
        auth.admit(&anyone, a).unwrap();
        assert!(auth.admit(&anyone, a).is_err());
        auth.admit(&anyone, b).unwrap();
    }

    #[test]
    fn the_concurrency_limit_refuses_beyond_its_slots_and_frees_them() {
        let mut config = Config::default();
        config.limits.max_concurrent_requests = Some(1);
        config.validate().unwrap();
        let auth = Auth::new(&config);
        let slot = auth.slot().unwrap();
        assert!(slot.is_some());
        assert!(matches!(auth.slot(), Err(Error::Overloaded { max: 1 })));
        drop(slot);
        assert!(auth.slot().unwrap().is_some());
    }
}
