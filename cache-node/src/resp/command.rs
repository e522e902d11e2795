//! RESP commands: each maps to calls on the node's [`Store`], the same one
//! gRPC serves. No cache logic lives here.
//!
//! # Keys
//! A key `ks:rest` names the key `rest` of keyspace `ks` when a keyspace of
//! that name exists (and `rest` is not empty); any other key is a key of
//! the default keyspace (`resp_default_keyspace`), whole.
//!
//! # Versions
//! RESP writes carry no version: they are unconditional (or `NX`/`XX`) and
//! store version 0, so the later write wins, as in Redis. A dirty
//! (write-back) entry fences them like any clean write of an older version.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::auth::{Auth, Principal};
use crate::config::Permission;
use crate::error::Error;
use crate::metrics::NodeMetrics;
use crate::resp::parse::Request;
use crate::resp::reply::Reply;
use crate::store::{Keyspace, SetItem, SetOutcome, Store, WriteCondition};

/// The commands served, lowercase: the metric label of each, and what
/// `COMMAND COUNT` counts.
pub const COMMANDS: &[&str] = &[
    "get", "set", "del", "exists", "mget", "mset", "expire", "pexpire", "ttl", "pttl", "incr",
    "decr", "incrby", "decrby", "ping", "echo", "select", "dbsize", "info", "command", "client",
    "quit", "auth", "config",
];

/// The label of requests naming no command in [`COMMANDS`].
pub const UNKNOWN_COMMAND: &str = "unknown";

/// What every connection shares.
pub struct Context {
    /// The node's store.
    pub store: Arc<Store>,
    /// The node's metrics.
    pub metrics: Arc<NodeMetrics>,
    /// The tokens `AUTH` checks, the rate limits and the concurrency limit.
    pub auth: Arc<Auth>,
    /// The keyspace of keys with no keyspace prefix.
    pub default_keyspace: String,
    /// The default keyspace, resolved on first use (keyspaces are never
    /// removed, so the handle stays good): spares the hot path a lookup
    /// by name per command.
    pub default: OnceLock<Arc<Keyspace>>,
    /// Reported by `INFO`.
    pub node_id: String,
    /// When the node started, for `INFO`.
    pub started: Instant,
}

/// The state of one connection.
#[derive(Debug)]
pub struct Session {
    /// Who the connection is, resolved once at `AUTH` (or at connection
    /// when no token is required); `None` until then.
    principal: Option<Arc<Principal>>,
    /// The peer's address: the rate-limit identity of a caller without a
    /// token.
    peer: Option<IpAddr>,
    name: Option<Bytes>,
}

/// What the connection does after a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Read the next request.
    Continue,
    /// Flush and close (`QUIT`).
    Close,
}

impl Session {
    /// A new connection's state: authenticated when no token is required.
    pub fn new(context: &Context, peer: Option<IpAddr>) -> Self {
        Session {
            principal: (!context.auth.resp_required()).then(|| context.auth.anonymous()),
            peer,
            name: None,
        }
    }
}

/// Arguments as Redis errors quote them.
fn quoted(args: &[Bytes]) -> String {
    args.iter()
        .take(8)
        .map(|a| format!("'{}' ", String::from_utf8_lossy(&a[..a.len().min(128)])))
        .collect()
}

fn wrong_arity(name: &str) -> Reply {
    Reply::err(format!("wrong number of arguments for '{name}' command"))
}

fn syntax_error() -> Reply {
    Reply::err("syntax error")
}

fn not_an_integer() -> Reply {
    Reply::err(Error::NotAnInteger)
}

fn integer(arg: &[u8]) -> Option<i64> {
    if arg.is_empty() || arg.len() > 20 {
        return None;
    }
    std::str::from_utf8(arg).ok()?.parse().ok()
}

fn store_error(error: Error) -> Reply {
    Reply::err(error)
}

/// Runs one request. An empty request gets no reply (`None`).
pub fn execute(
    context: &Context,
    session: &mut Session,
    request: Request,
) -> Option<(Reply, After)> {
    let first = request.first()?;
    let index = COMMANDS
        .iter()
        .position(|c| first.eq_ignore_ascii_case(c.as_bytes()));
    let name = index.map(|i| COMMANDS[i]);
    let label = name.unwrap_or(UNKNOWN_COMMAND);
    // One clock read per command, for its latency and the store's `now`.
    let now = Instant::now();
    let _timer = context.metrics.time_resp_at(index, now);
    let (reply, after) = dispatch(context, session, name, &request, now);
    if matches!(reply, Reply::Error(_)) {
        context.metrics.count_resp_error(label);
    }
    Some((reply, after))
}

fn dispatch(
    context: &Context,
    session: &mut Session,
    name: Option<&'static str>,
    request: &[Bytes],
    now: Instant,
) -> (Reply, After) {
    let args = &request[1..];
    let Some(name) = name else {
        return (
            Reply::err(format!(
                "unknown command '{}', with args beginning with: {}",
                String::from_utf8_lossy(&request[0][..request[0].len().min(128)]),
                quoted(args)
            )),
            After::Continue,
        );
    };
    match name {
        "quit" => return (Reply::OK, After::Close),
        "auth" => return (auth(context, session, args), After::Continue),
        _ => {}
    }
    let Some(principal) = &session.principal else {
        context.metrics.count_refused("resp", "unauthenticated");
        return (
            Reply::Error("NOAUTH Authentication required.".into()),
            After::Continue,
        );
    };
    if let Err(refused) = admit(context, principal, session.peer, name, args) {
        return (refused, After::Continue);
    }
    // Held while the command runs: it counts towards the node's limit.
    let _slot = match context.auth.slot() {
        Ok(slot) => slot,
        Err(e) => {
            context.metrics.count_refused("resp", "overloaded");
            return (Reply::err(e), After::Continue);
        }
    };
    let commands = Commands { context, now };
    let reply = match name {
        "get" => commands.get(args),
        "set" => commands.set(args),
        "del" => commands.del(args),
        "exists" => commands.exists(args),
        "mget" => commands.mget(args),
        "mset" => commands.mset(args),
        "expire" => commands.expire(name, args, 1000),
        "pexpire" => commands.expire(name, args, 1),
        "ttl" => commands.ttl(name, args, false),
        "pttl" => commands.ttl(name, args, true),
        "incr" => commands.incr(name, args, Some(1)),
        "decr" => commands.incr(name, args, Some(-1)),
        "incrby" => commands.incr(name, args, None),
        "decrby" => commands.incr(name, args, None),
        "ping" => match args {
            [] => Reply::Simple("PONG"),
            [message] => Reply::Bulk(Some(message.clone())),
            _ => wrong_arity(name),
        },
        "echo" => match args {
            [message] => Reply::Bulk(Some(message.clone())),
            _ => wrong_arity(name),
        },
        "select" => match args {
            [db] => match integer(db) {
                Some(0) => Reply::OK,
                Some(_) => Reply::err("DB index is out of range"),
                None => not_an_integer(),
            },
            _ => wrong_arity(name),
        },
        "dbsize" => commands.dbsize(),
        "info" => commands.info(),
        "command" => match args.first() {
            // redis-cli asks for `COMMAND DOCS` to show hints; an empty
            // answer just turns the hints off.
            Some(sub) if sub.eq_ignore_ascii_case(b"count") => {
                Reply::Integer(COMMANDS.len() as i64)
            }
            _ => Reply::Array(Vec::new()),
        },
        "client" => client(session, args),
        // redis-benchmark reads a few settings at start; no setting is
        // readable or writable through RESP.
        "config" => match args.first() {
            Some(sub) if sub.eq_ignore_ascii_case(b"get") => Reply::Array(Vec::new()),
            _ => Reply::err("CONFIG supports only GET, which answers no settings"),
        },
        // `quit` and `auth` were answered above; every other name in
        // COMMANDS has an arm.
        other => Reply::err(format!("unknown command '{other}'")),
    };
    (reply, After::Continue)
}

/// The permission a command needs in the keyspaces of its keys, and which
/// arguments are keys (every `step`th from the first); `None` for commands
/// that touch no keyspace.
fn needs(name: &str) -> Option<(Permission, usize, bool)> {
    // (permission, step between keys, whether every such argument is a key)
    Some(match name {
        "get" | "ttl" | "pttl" => (Permission::Read, 1, false),
        "exists" | "mget" => (Permission::Read, 1, true),
        "set" | "expire" | "pexpire" | "incr" | "decr" | "incrby" | "decrby" => {
            (Permission::Write, 1, false)
        }
        "del" => (Permission::Write, 1, true),
        "mset" => (Permission::Write, 2, true),
        _ => return None,
    })
}

/// The rate limit, then the permission of every key the command names,
/// before anything runs (as Redis's ACLs: a refused `DEL a b` deletes
/// nothing). A caller with the permission everywhere skips the key walk.
fn admit(
    context: &Context,
    principal: &Principal,
    peer: Option<IpAddr>,
    name: &str,
    args: &[Bytes],
) -> Result<(), Reply> {
    if let Err(e) = context.auth.admit(principal, peer) {
        context.metrics.count_refused("resp", "rate_limited");
        return Err(Reply::Error(format!("RATELIMITED {e}")));
    }
    // The common case (no tokens, `resp_password`, an admin token) costs
    // no lookup at all.
    if principal.allows_all(Permission::Admin) {
        return Ok(());
    }
    let denied = |e: Error| {
        context.metrics.count_refused("resp", "permission_denied");
        Reply::Error(format!("NOPERM {e}"))
    };
    if matches!(name, "dbsize" | "info") {
        return principal.check_all(Permission::Read).map_err(denied);
    }
    let Some((need, step, all)) = needs(name) else {
        return Ok(());
    };
    if principal.allows_all(need) {
        return Ok(());
    }
    let keys = if all {
        args
    } else {
        &args[..args.len().min(1)]
    };
    for key in keys.iter().step_by(step) {
        principal
            .check(keyspace_of(context, key), need)
            .map_err(denied)?;
    }
    Ok(())
}

/// The keyspace a RESP key names (see the module docs).
fn keyspace_of<'c>(context: &'c Context, key: &'c [u8]) -> &'c str {
    if let Some(colon) = key.iter().position(|&b| b == b':')
        && colon + 1 < key.len()
        && let Ok(keyspace) = std::str::from_utf8(&key[..colon])
        && context.store.has_keyspace(keyspace)
    {
        return keyspace;
    }
    &context.default_keyspace
}

/// `AUTH secret` (the token whose secret it is, `resp_password` included)
/// or `AUTH name secret` (Redis 6: the token of that name). The
/// connection's principal is resolved here, once; a failed `AUTH` leaves
/// the connection unauthenticated, as Redis does.
fn auth(context: &Context, session: &mut Session, args: &[Bytes]) -> Reply {
    if !context.auth.resp_required() {
        return Reply::err(
            "AUTH <password> called without any password configured for the default user. \
             Are you sure your configuration is correct?",
        );
    }
    let principal = match args {
        [secret] => context.auth.password(None, secret),
        [name, secret] => context.auth.password(Some(name), secret),
        _ => return wrong_arity("auth"),
    };
    session.principal = principal;
    if session.principal.is_some() {
        Reply::OK
    } else {
        context.metrics.count_refused("resp", "unauthenticated");
        Reply::Error("WRONGPASS invalid username-password pair or user is disabled.".into())
    }
}

fn client(session: &mut Session, args: &[Bytes]) -> Reply {
    let Some(sub) = args.first() else {
        return wrong_arity("client");
    };
    let sub = String::from_utf8_lossy(sub).to_ascii_lowercase();
    match (sub.as_str(), &args[1..]) {
        ("setname", [name]) => {
            if name.iter().any(|b| *b <= b' ' || *b > b'~') {
                return Reply::err(
                    "Client names cannot contain spaces, newlines or special characters.",
                );
            }
            session.name = (!name.is_empty()).then(|| name.clone());
            Reply::OK
        }
        ("getname", []) => Reply::Bulk(session.name.clone()),
        // Client libraries announce themselves; nothing to keep.
        ("setinfo", [_, _]) => Reply::OK,
        ("setname" | "getname" | "setinfo", _) => Reply::err(format!(
            "wrong number of arguments for 'client|{sub}' command"
        )),
        _ => Reply::err(format!("unknown subcommand '{sub}'. Try CLIENT HELP.")),
    }
}

struct Commands<'a> {
    context: &'a Context,
    /// When the command arrived.
    now: Instant,
}

impl Commands<'_> {
    fn store(&self) -> &Store {
        &self.context.store
    }

    /// The keyspace and key a RESP key names (see the module docs).
    fn route<'k>(&'k self, key: &'k Bytes) -> (&'k str, Bytes) {
        if let Some(colon) = key.iter().position(|&b| b == b':')
            && colon + 1 < key.len()
            && let Ok(keyspace) = std::str::from_utf8(&key[..colon])
            && self.store().has_keyspace(keyspace)
        {
            return (keyspace, key.slice(colon + 1..));
        }
        (&self.context.default_keyspace, key.clone())
    }

    /// The keyspace and key a RESP key names, the keyspace resolved: the
    /// hot path's [`Commands::route`], one lookup by name at most (none
    /// for a key without a `:`).
    fn resolve(&self, key: &Bytes) -> crate::error::Result<(Arc<Keyspace>, Bytes)> {
        if let Some(colon) = key.iter().position(|&b| b == b':')
            && colon + 1 < key.len()
            && let Ok(name) = std::str::from_utf8(&key[..colon])
            && let Some(keyspace) = self.store().existing_keyspace(name)
        {
            return Ok((keyspace, key.slice(colon + 1..)));
        }
        let keyspace = match self.context.default.get() {
            Some(keyspace) => Arc::clone(keyspace),
            None => {
                let keyspace = self.store().keyspace(&self.context.default_keyspace)?;
                Arc::clone(self.context.default.get_or_init(|| keyspace))
            }
        };
        Ok((keyspace, key.clone()))
    }

    fn get(&self, args: &[Bytes]) -> Reply {
        let [key] = args else {
            return wrong_arity("get");
        };
        let (keyspace, key) = match self.resolve(key) {
            Ok(resolved) => resolved,
            Err(e) => return store_error(e),
        };
        match self.store().get_in(&keyspace, &key, self.now) {
            Ok(hit) => Reply::Bulk(hit.map(|hit| hit.value)),
            Err(e) => store_error(e),
        }
    }

    fn set(&self, args: &[Bytes]) -> Reply {
        let [key, value, options @ ..] = args else {
            return wrong_arity("set");
        };
        let mut condition = WriteCondition::Unconditional;
        let mut ttl = None;
        let mut options = options.iter();
        while let Some(option) = options.next() {
            let option = String::from_utf8_lossy(option).to_ascii_lowercase();
            match option.as_str() {
                "nx" if condition == WriteCondition::Unconditional => {
                    condition = WriteCondition::IfAbsent;
                }
                "xx" if condition == WriteCondition::Unconditional => {
                    condition = WriteCondition::IfPresent;
                }
                unit @ ("ex" | "px") if ttl.is_none() => {
                    let Some(amount) = options.next() else {
                        return syntax_error();
                    };
                    let Some(amount) = integer(amount) else {
                        return not_an_integer();
                    };
                    let millis = u64::try_from(amount)
                        .ok()
                        .filter(|&n| n > 0)
                        .and_then(|n| n.checked_mul(if unit == "ex" { 1000 } else { 1 }));
                    let Some(millis) = millis else {
                        return Reply::err("invalid expire time in 'set' command");
                    };
                    ttl = Some(Duration::from_millis(millis));
                }
                _ => return syntax_error(),
            }
        }
        let (keyspace, key) = match self.resolve(key) {
            Ok(resolved) => resolved,
            Err(e) => return store_error(e),
        };
        let item = SetItem {
            key,
            value: value.clone(),
            version: 0,
            ttl,
            condition,
            dirty: false,
        };
        match self.store().set_in(&keyspace, item, self.now) {
            Ok(result) => match result.outcome {
                SetOutcome::Stored => Reply::OK,
                SetOutcome::Exists | SetOutcome::Missing => Reply::Bulk(None),
                SetOutcome::StaleVersion => fenced(result.current_version),
            },
            Err(e) => store_error(e),
        }
    }

    fn del(&self, args: &[Bytes]) -> Reply {
        if args.is_empty() {
            return wrong_arity("del");
        }
        let mut deleted = 0;
        for key in args {
            let (keyspace, key) = self.route(key);
            match self.store().delete(keyspace, &key) {
                Ok(true) => deleted += 1,
                Ok(false) => {}
                Err(e) => return store_error(e),
            }
        }
        Reply::Integer(deleted)
    }

    fn exists(&self, args: &[Bytes]) -> Reply {
        if args.is_empty() {
            return wrong_arity("exists");
        }
        let mut found = 0;
        for key in args {
            let (keyspace, key) = self.route(key);
            match self.store().get(keyspace, &key) {
                Ok(Some(_)) => found += 1,
                Ok(None) => {}
                Err(e) => return store_error(e),
            }
        }
        Reply::Integer(found)
    }

    fn check_batch(&self, len: usize) -> Option<Reply> {
        let max = self.store().limits().max_batch_keys;
        (len > max).then(|| store_error(Error::BatchTooLarge { len, max }))
    }

    fn mget(&self, args: &[Bytes]) -> Reply {
        if args.is_empty() {
            return wrong_arity("mget");
        }
        if let Some(refused) = self.check_batch(args.len()) {
            return refused;
        }
        let mut values = Vec::with_capacity(args.len());
        for key in args {
            let (keyspace, key) = self.route(key);
            match self.store().get(keyspace, &key) {
                Ok(hit) => values.push(Reply::Bulk(hit.map(|hit| hit.value))),
                Err(e) => return store_error(e),
            }
        }
        Reply::Array(values)
    }

    fn mset(&self, args: &[Bytes]) -> Reply {
        if args.is_empty() || !args.len().is_multiple_of(2) {
            return wrong_arity("mset");
        }
        if let Some(refused) = self.check_batch(args.len() / 2) {
            return refused;
        }
        let mut items = Vec::with_capacity(args.len() / 2);
        for pair in args.chunks_exact(2) {
            let (keyspace, key) = self.route(&pair[0]);
            let item = SetItem {
                key,
                value: pair[1].clone(),
                version: 0,
                ttl: None,
                condition: WriteCondition::Unconditional,
                dirty: false,
            };
            // The whole batch is checked before anything is written.
            if let Err(e) = self.store().check_item(&item) {
                return store_error(e);
            }
            items.push((keyspace, item));
        }
        let mut fenced_version = None;
        for (keyspace, item) in items {
            match self.store().set(keyspace, item) {
                Ok(result) if result.outcome == SetOutcome::StaleVersion => {
                    fenced_version = Some(result.current_version);
                }
                Ok(_) => {}
                Err(e) => return store_error(e),
            }
        }
        match fenced_version {
            Some(version) => fenced(version),
            None => Reply::OK,
        }
    }

    fn expire(&self, name: &str, args: &[Bytes], unit_ms: u64) -> Reply {
        let [key, amount] = args else {
            return wrong_arity(name);
        };
        let Some(amount) = integer(amount) else {
            return not_an_integer();
        };
        let (keyspace, key) = self.route(key);
        if amount <= 0 {
            // Redis deletes a key given a TTL in the past.
            return match self.store().delete(keyspace, &key) {
                Ok(deleted) => Reply::Integer(i64::from(deleted)),
                Err(e) => store_error(e),
            };
        }
        let Some(millis) = u64::try_from(amount)
            .ok()
            .and_then(|n| n.checked_mul(unit_ms))
        else {
            return Reply::err(format!("invalid expire time in '{name}' command"));
        };
        match self
            .store()
            .expire(keyspace, &key, Duration::from_millis(millis))
        {
            Ok(changed) => Reply::Integer(i64::from(changed)),
            Err(e) => store_error(e),
        }
    }

    fn ttl(&self, name: &str, args: &[Bytes], millis: bool) -> Reply {
        let [key] = args else {
            return wrong_arity(name);
        };
        let (keyspace, key) = self.route(key);
        match self.store().get(keyspace, &key) {
            Ok(None) => Reply::Integer(-2),
            Ok(Some(hit)) => match hit.ttl_remaining {
                None => Reply::Integer(-1),
                Some(left) => {
                    let ms = i64::try_from(left.as_millis()).unwrap_or(i64::MAX);
                    // Redis rounds seconds to the nearest.
                    Reply::Integer(if millis {
                        ms
                    } else {
                        ms.saturating_add(500) / 1000
                    })
                }
            },
            Err(e) => store_error(e),
        }
    }

    /// `INCR`/`DECR` (fixed `delta`), `INCRBY`/`DECRBY` (delta argument).
    fn incr(&self, name: &str, args: &[Bytes], delta: Option<i64>) -> Reply {
        let (key, delta) = match (args, delta) {
            ([key], Some(delta)) => (key, delta),
            ([key, amount], None) => {
                let Some(amount) = integer(amount) else {
                    return not_an_integer();
                };
                let delta = if name == "decrby" {
                    match amount.checked_neg() {
                        Some(negated) => negated,
                        None => return Reply::err("decrement would overflow"),
                    }
                } else {
                    amount
                };
                (key, delta)
            }
            _ => return wrong_arity(name),
        };
        let (keyspace, key) = self.route(key);
        match self.store().incr(keyspace, &key, delta) {
            Ok(value) => Reply::Integer(value),
            Err(e) => store_error(e),
        }
    }

    fn dbsize(&self) -> Reply {
        match self.store().stats(None) {
            Ok(stats) => Reply::Integer(
                stats
                    .iter()
                    .map(|ks| ks.items + ks.dirty_items)
                    .sum::<u64>()
                    .try_into()
                    .unwrap_or(i64::MAX),
            ),
            Err(e) => store_error(e),
        }
    }

    fn info(&self) -> Reply {
        let stats = match self.store().stats(None) {
            Ok(stats) => stats,
            Err(e) => return store_error(e),
        };
        let keys: u64 = stats.iter().map(|ks| ks.items + ks.dirty_items).sum();
        let mut text = format!(
            "# Server\r\nredis_version:7.0.0\r\nringcache_version:{}\r\nringcache_node_id:{}\r\n\
             uptime_in_seconds:{}\r\n\r\n# Keyspace\r\ndb0:keys={keys},expires=0,avg_ttl=0\r\n",
            env!("CARGO_PKG_VERSION"),
            self.context.node_id,
            self.context.started.elapsed().as_secs(),
        );
        text.push_str("\r\n# Ringcache keyspaces\r\n");
        for ks in &stats {
            text.push_str(&format!(
                "keyspace_{}:keys={},bytes={},capacity_bytes={},hits={},misses={},evictions={}\r\n",
                ks.name,
                ks.items + ks.dirty_items,
                ks.bytes,
                ks.capacity_bytes,
                ks.hits,
                ks.misses,
                ks.evictions
            ));
        }
        Reply::bulk(text)
    }
}

/// The reply to an unversioned write refused by a dirty entry's fence.
fn fenced(version: u64) -> Reply {
    Reply::err(format!(
        "write refused: the key holds a write-back entry (version {version}) not yet stored"
    ))
}
