//! The `redis` resource: any Redis command as a method (`xa.cache.set("k", "v")`), plus
//! `multi` for several commands under MULTI/EXEC. See docs/resources/redis.md.
//!
//! Each participant runs its command when the transaction executes; commit and rollback do
//! nothing, because Redis cannot hold a command's reply back until a later commit nor undo a
//! command once it ran (see the docs for why MULTI/EXEC around a single command is not used).
//!
//! ```toml
//! [resources.cache]
//! protocol = "redis"
//! url = "rediss://:${REDIS_PASSWORD}@cache.internal:6380/0"   # redis:// plain, rediss:// TLS
//! ca = "certs/redis-ca.pem"          # optional, rediss:// only: the CA of the server's certificate
//! ```
//!
//! A `rediss://` url connects over TLS (rustls on ring) and always checks the server's
//! certificate: signed by a trusted CA and issued for the url's host. `ca` is a PEM file of one or
//! more CA certificates, relative to the cage folder and read at config time; with it the
//! certificate must chain to one of them and to nothing else, without it to a public (webpki) CA.
//! redis-rs's `#insecure` fragment (no check) is refused.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::LocalBoxFuture;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError, TlsCertificates};
use rustomnic_core::{Section, Value};
use rustomnic_resource::tls::{self as rtls, CaFile};
use rustomnic_resource::{Connection, Error, Resource, ResourceProtocol};

/// The keys this protocol reads itself (the pool keys are read by the runtime).
pub const KEYS: &[&str] = &["url", "ca"];

/// A connection used within this long is trusted without a PING at checkout: a dead one then
/// fails its next call, and the pool replaces it.
const TRUST_RECENT_USE: Duration = Duration::from_secs(1);

/// Commands that would leave a pooled connection in a state the next user does not expect
/// (inside MULTI, subscribed, another database, replies switched off), with the reason.
const REFUSED: &[(&str, &str)] = &[
    ("MULTI", "use the method multi{...} to run several commands atomically"),
    ("EXEC", "use the method multi{...} to run several commands atomically"),
    ("DISCARD", "use the method multi{...} to run several commands atomically"),
    ("WATCH", "a WATCH cannot outlive one call on a pooled connection"),
    ("UNWATCH", "a WATCH cannot outlive one call on a pooled connection"),
    ("SUBSCRIBE", "subscriptions are not supported by this resource"),
    ("PSUBSCRIBE", "subscriptions are not supported by this resource"),
    ("SSUBSCRIBE", "subscriptions are not supported by this resource"),
    ("UNSUBSCRIBE", "subscriptions are not supported by this resource"),
    ("PUNSUBSCRIBE", "subscriptions are not supported by this resource"),
    ("SUNSUBSCRIBE", "subscriptions are not supported by this resource"),
    ("MONITOR", "it turns the connection into a stream of every command"),
    ("SELECT", "the database is chosen by the resource's url (redis://host:port/DB)"),
    ("SWAPDB", "it would change the database under every pooled connection"),
    ("QUIT", "connections are closed by the pool"),
    ("RESET", "connections are reset by the pool"),
    ("HELLO", "the protocol version is chosen by the resource's url (?protocol=resp3)"),
    ("AUTH", "credentials belong in the resource's url (redis://user:password@host)"),
    ("SYNC", "replication streams are not supported"),
    ("PSYNC", "replication streams are not supported"),
];

/// The `redis` protocol.
pub struct Redis;

struct RedisResource {
    client: Client,
    /// host:port/db, without credentials, for messages.
    display: String,
    /// For messages about a certificate its CA did not sign; `None` also without TLS.
    ca: Option<Arc<CaFile>>,
}

struct RedisConnection {
    con: MultiplexedConnection,
    display: Arc<str>,
    last_used: Instant,
    /// A command of the current call reached the wire (it may have acted).
    sent: bool,
}

/// Commands that only read: a transaction that fails after one of them left nothing behind.
/// Anything not listed counts as a write.
const READ_ONLY: &[&str] = &[
    "get",
    "mget",
    "getrange",
    "strlen",
    "exists",
    "type",
    "ttl",
    "pttl",
    "expiretime",
    "pexpiretime",
    "keys",
    "scan",
    "randomkey",
    "dbsize",
    "hget",
    "hmget",
    "hgetall",
    "hkeys",
    "hvals",
    "hlen",
    "hexists",
    "hstrlen",
    "hscan",
    "hrandfield",
    "lrange",
    "llen",
    "lindex",
    "lpos",
    "smembers",
    "sismember",
    "smismember",
    "scard",
    "srandmember",
    "sscan",
    "sinter",
    "sunion",
    "sdiff",
    "sintercard",
    "zrange",
    "zrangebyscore",
    "zrangebylex",
    "zrevrange",
    "zrevrangebyscore",
    "zrevrangebylex",
    "zscore",
    "zmscore",
    "zcard",
    "zcount",
    "zlexcount",
    "zrank",
    "zrevrank",
    "zscan",
    "zrandmember",
    "zinter",
    "zunion",
    "zdiff",
    "bitcount",
    "bitpos",
    "getbit",
    "pfcount",
    "xlen",
    "xrange",
    "xrevrange",
    "xread",
    "geopos",
    "geodist",
    "geohash",
    "geosearch",
    "ping",
    "echo",
    "time",
    "dump",
    "object",
    "memory",
    "touch",
    "lcs",
    "substr",
];

impl ResourceProtocol for Redis {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn configure(&self, _resource: &str, section: &Section) -> Option<Arc<dyn Resource>> {
        let url = section.string("url");
        let ca = rtls::read_ca(section, "ca");
        let Some(url) = url else {
            if !section.has("url") {
                section.table_error("url is required, e.g. url = \"redis://127.0.0.1:6379/0\"");
            }
            return None;
        };
        let tls = url.value.starts_with("rediss://") || url.value.starts_with("valkeys://");
        let ca = match ca {
            Some(Ok(_)) if !tls => {
                section.error("ca", "is only read with a rediss:// url (TLS); this url is plain");
                return None;
            }
            Some(Ok(ca)) => Some(ca),
            Some(Err(())) => return None,
            None => None,
        };
        // The url's text stays out of messages: it may hold a password.
        if tls && url.value.split_once('#').is_some_and(|(_, fragment)| fragment == "insecure") {
            section.error("url", "#insecure (TLS without checking the server's certificate) is refused; give the CA that signed it as ca = \"...\"");
            return None;
        }
        // redis-rs builds its rustls settings with the process's default provider.
        rtls::install_default_provider();
        let client = match &ca {
            Some(ca) => Client::build_with_tls(url.value.as_str(), TlsCertificates { client_tls: None, root_cert: Some(ca.pem.clone()) }),
            None => Client::open(url.value.as_str()),
        };
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                section.error("url", format!("not a usable Redis url: {}", describe(&e)));
                return None;
            }
        };
        let info = client.get_connection_info();
        let display = format!("{}/{}", info.addr(), info.redis_settings().db());
        Some(Arc::new(RedisResource { client, display, ca: ca.map(Arc::new) }))
    }
}

impl Resource for RedisResource {
    fn connect(&self) -> LocalBoxFuture<'static, Result<Box<dyn Connection>, Error>> {
        let client = self.client.clone();
        let display: Arc<str> = Arc::from(self.display.as_str());
        let ca = self.ca.clone();
        Box::pin(async move {
            // The library's own timeouts (1 s to connect, 500 ms per reply) are switched off:
            // the pool's connect_timeout and the request's deadline bound every wait instead,
            // so a slow command such as BLPOP with a timeout is not cut short.
            let config = AsyncConnectionConfig::new().set_connection_timeout(None).set_response_timeout(None);
            match client.get_multiplexed_async_connection_with_config(&config).await {
                Ok(con) => Ok(Box::new(RedisConnection { con, display, last_used: Instant::now(), sent: false }) as Box<dyn Connection>),
                Err(e) => {
                    let why = rtls::describe(&e, ca.as_deref()).unwrap_or_else(|| describe(&e));
                    Err(Error::new(format!("{display}: {why}")))
                }
            }
        })
    }
}

impl Connection for RedisConnection {
    fn begin(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        self.sent = false;
        Box::pin(async { Ok(()) })
    }

    /// Redis cannot roll back: a command that may have written stays written. An error reply
    /// to a single command means it did nothing; a `multi` block that failed half way, a lost
    /// connection or a call cut by the deadline may have acted.
    fn effects_stay(&self, method: &str, outcome: &Result<Value, Error>) -> bool {
        if !self.sent {
            return false;
        }
        let multi = method.eq_ignore_ascii_case("multi");
        match outcome {
            Ok(_) => multi || !READ_ONLY.iter().any(|r| method.eq_ignore_ascii_case(r)),
            Err(e) => multi || e.code.is_none(),
        }
    }

    fn call<'a>(&'a mut self, method: &'a str, args: Vec<Value>) -> LocalBoxFuture<'a, Result<Value, Error>> {
        Box::pin(async move {
            let result = if method.eq_ignore_ascii_case("multi") { self.multi(args).await } else { self.single(method, args).await };
            self.last_used = Instant::now();
            result
        })
    }

    fn is_healthy(&mut self) -> LocalBoxFuture<'_, bool> {
        Box::pin(async move {
            if self.last_used.elapsed() < TRUST_RECENT_USE {
                return true;
            }
            let healthy = matches!(self.con.send_packed_command(&redis::cmd("PING")).await, Ok(redis::Value::SimpleString(_) | redis::Value::Okay));
            if healthy {
                self.last_used = Instant::now();
            }
            healthy
        })
    }
}

impl RedisConnection {
    /// One command: the method name upper-cased, the arguments as bulk strings.
    async fn single(&mut self, method: &str, args: Vec<Value>) -> Result<Value, Error> {
        let name = command_name(method)?;
        let mut cmd = redis::cmd(&name);
        for (i, arg) in args.iter().enumerate() {
            push_arg(&mut cmd, arg, &format!("argument {}", i + 1), true)?;
        }
        let first = first_word(&args);
        self.sent = true;
        match self.con.send_packed_command(&cmd).await {
            Ok(redis::Value::ServerError(e)) => Err(server_error(e.code(), e.details(), &format!("{name} failed"))),
            Ok(reply) => convert_reply(reply, &name, first.as_deref()),
            Err(e) => Err(self.failed(&name, e)),
        }
    }

    /// `multi({"set", "k", "v"}, {"incr", "n"})`: MULTI, the commands, EXEC in one round trip;
    /// the replies come back as an array, one per command.
    async fn multi(&mut self, args: Vec<Value>) -> Result<Value, Error> {
        if args.is_empty() {
            return Err(Error::new("multi needs at least one command, e.g. multi({\"set\", \"k\", \"v\"}, {\"incr\", \"n\"})"));
        }
        let mut pipe = redis::pipe();
        pipe.cmd("MULTI");
        let mut names = Vec::with_capacity(args.len());
        for (i, command) in args.iter().enumerate() {
            let Value::Array(parts) = command else {
                return Err(Error::new(format!("multi: command {} must be an array such as {{\"set\", \"k\", \"v\"}}, got {}", i + 1, command.type_name())));
            };
            let Some(Value::Str(method)) = parts.first() else {
                return Err(Error::new(format!("multi: command {} must start with the command's name", i + 1)));
            };
            let name = command_name(&String::from_utf8_lossy(method))?;
            let mut cmd = redis::cmd(&name);
            for (j, arg) in parts[1..].iter().enumerate() {
                push_arg(&mut cmd, arg, &format!("multi: command {} ({name}) argument {}", i + 1, j + 1), true)?;
            }
            pipe.add_command(cmd);
            names.push((name, first_word(&parts[1..])));
        }
        pipe.cmd("EXEC");
        // A plain pipeline (not redis-rs's atomic mode) so that every reply, errors included,
        // comes back as it is and the error of the right command can be reported.
        self.sent = true;
        let replies = match self.con.send_packed_commands(&pipe, 0, names.len() + 2).await {
            Ok(r) => r,
            Err(e) => return Err(self.failed("multi", e)),
        };
        // Replies: OK for MULTI, QUEUED (or an error) per command, then EXEC's.
        for (i, (reply, (name, _))) in replies.iter().skip(1).zip(&names).enumerate() {
            if let redis::Value::ServerError(e) = reply {
                // Redis refused to queue it, so EXEC discards the whole transaction.
                return Err(server_error(e.code(), e.details(), &format!("multi: command {} ({name}) was refused, so none ran", i + 1)));
            }
        }
        let exec = replies.into_iter().last().unwrap_or(redis::Value::Nil);
        let results = match exec {
            redis::Value::Array(items) => items,
            redis::Value::ServerError(e) => return Err(server_error(e.code(), e.details(), "multi: EXEC failed, so no command ran")),
            other => return Err(Error::broken(format!("multi: unexpected reply to EXEC: {other:?}"))),
        };
        let mut out = Vec::with_capacity(results.len());
        for (i, (reply, (name, first))) in results.into_iter().zip(&names).enumerate() {
            if let redis::Value::ServerError(e) = &reply {
                // Redis has no rollback: the other commands of the block did run.
                return Err(server_error(e.code(), e.details(), &format!("multi: command {} ({name}) failed (the block's other commands did run)", i + 1)));
            }
            out.push(convert_reply(reply, name, first.as_deref())?);
        }
        Ok(Value::Array(out))
    }

    /// The Lua-facing error of a failed command; broken when the connection itself failed.
    fn failed(&self, command: &str, e: RedisError) -> Error {
        if let Some(code) = e.code() {
            if !(e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error()) {
                return server_error(code, e.detail(), &format!("{command} failed"));
            }
        }
        Error::broken(format!("{command} on {}: {}", self.display, describe(&e)))
    }
}

/// The command for a method name: upper-cased, refused when it would spoil a pooled connection.
fn command_name(method: &str) -> Result<String, Error> {
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::new(format!("{method:?} is not a Redis command name")));
    }
    let name = method.to_ascii_uppercase();
    if let Some((_, why)) = REFUSED.iter().find(|(refused, _)| *refused == name) {
        return Err(Error::new(format!("the command {name} is not allowed here: {why}")));
    }
    Ok(name)
}

/// The first argument upper-cased, for commands whose reply shape depends on a subcommand.
fn first_word(args: &[Value]) -> Option<String> {
    match args.first() {
        Some(Value::Str(s)) => Some(String::from_utf8_lossy(s).to_ascii_uppercase()),
        _ => None,
    }
}

/// Adds one Lua argument to `cmd`: scalars as bulk strings; a table (one level) as its items,
/// a map as key, value, key, value...
fn push_arg(cmd: &mut redis::Cmd, arg: &Value, what: &str, tables_allowed: bool) -> Result<(), Error> {
    match arg {
        Value::Str(b) => {
            cmd.arg(b.as_slice());
        }
        Value::Int(i) => {
            cmd.arg(i.to_string());
        }
        Value::Float(f) if f.is_nan() => return Err(Error::new(format!("{what} is NaN, which Redis cannot take"))),
        // Rust writes floats without an exponent and infinities as inf/-inf, which Redis parses.
        Value::Float(f) => {
            cmd.arg(f.to_string());
        }
        // As redis-rs does: Redis has no booleans, and 1/0 work with SETBIT, counters and flags.
        Value::Bool(b) => {
            cmd.arg(if *b { "1" } else { "0" });
        }
        Value::Nil => return Err(Error::new(format!("{what} is nil; Redis has no nil argument (pass \"\" or leave it out)"))),
        Value::Array(items) if tables_allowed => {
            for item in items {
                push_arg(cmd, item, what, false)?;
            }
        }
        Value::Map(entries) if tables_allowed => {
            for (k, v) in entries {
                push_arg(cmd, k, what, false)?;
                push_arg(cmd, v, what, false)?;
            }
        }
        Value::Array(_) | Value::Map(_) => {
            return Err(Error::new(format!("{what}: a table inside a table cannot be sent to Redis (encode it first, e.g. with pmnc.json.encode)")));
        }
    }
    Ok(())
}

/// Converts a reply to the value model. `command` and `first` (its first argument) choose the
/// shape of replies that RESP2 sends flat: HGETALL and CONFIG GET become maps.
fn convert_reply(reply: redis::Value, command: &str, first: Option<&str>) -> Result<Value, Error> {
    let pairs_to_map = command == "HGETALL" || (command == "CONFIG" && first == Some("GET"));
    match reply {
        redis::Value::Array(items) if pairs_to_map => {
            if items.len() % 2 != 0 {
                return Err(Error::new(format!("{command}: odd number of items in a reply of field/value pairs")));
            }
            let mut entries = Vec::with_capacity(items.len() / 2);
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                entries.push((convert(k)?, convert(v)?));
            }
            Ok(Value::Map(entries))
        }
        other => convert(other),
    }
}

/// Converts a reply as it is (RESP2 and RESP3 types alike).
fn convert(reply: redis::Value) -> Result<Value, Error> {
    Ok(match reply {
        redis::Value::Nil => Value::Nil,
        redis::Value::Int(i) => Value::Int(i),
        redis::Value::BulkString(b) => Value::Str(b),
        redis::Value::SimpleString(s) => Value::Str(s.into_bytes()),
        redis::Value::Okay => Value::str("OK"),
        redis::Value::Array(items) | redis::Value::Set(items) | redis::Value::Push { data: items, .. } => {
            Value::Array(items.into_iter().map(convert).collect::<Result<_, _>>()?)
        }
        redis::Value::Map(entries) => {
            let mut out = Vec::with_capacity(entries.len());
            for (k, v) in entries {
                out.push((convert(k)?, convert(v)?));
            }
            Value::Map(out)
        }
        redis::Value::Attribute { data, .. } => convert(*data)?,
        redis::Value::Double(f) => Value::Float(f),
        redis::Value::Boolean(b) => Value::Bool(b),
        redis::Value::VerbatimString { text, .. } => Value::Str(text.into_bytes()),
        // Too big for an integer: the decimal text keeps every digit.
        redis::Value::BigNumber(digits) => Value::Str(digits),
        redis::Value::ServerError(e) => return Err(server_error(e.code(), e.details(), "an item of the reply is an error")),
        other => return Err(Error::new(format!("a reply of a kind this resource does not know: {other:?}"))),
    })
}

/// A Redis error reply: the code is its first word (ERR, WRONGTYPE, ...); the message is `lead`
/// (which command failed) and what Redis said.
fn server_error(code: &str, detail: Option<&str>, lead: &str) -> Error {
    let message = match detail {
        Some(d) if !d.is_empty() => format!("{lead}: {d}"),
        _ => lead.to_string(),
    };
    Error::new(message).with_code(code)
}

/// The text of a client-side error (redis-rs's Display), or its Debug form if that is empty.
fn describe(e: &RedisError) -> String {
    let text = e.to_string();
    if text.is_empty() {
        format!("{e:?}")
    } else {
        text
    }
}
