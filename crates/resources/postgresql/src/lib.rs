//! The `postgresql` resource: `xa.db.execute(sql, ...params)` on a real PostgreSQL transaction
//! per participant (BEGIN, the call, then COMMIT or ROLLBACK), through tokio-postgres, over TLS
//! (rustls on ring) when `sslmode` asks for it.
//!
//! ```toml
//! [resources.db]
//! protocol = "postgresql"
//! url = "postgresql://app:${DB_PASSWORD}@db.internal:5432/app"
//! statement_timeout = "30s"          # optional: the server cancels statements running longer
//! sslmode = "verify-full"            # optional, default "disable"; or ?sslmode=... in the url
//! ca = "certs/db-ca.pem"             # optional: the CA of the server's certificate (PEM)
//! ```
//!
//! `sslmode` takes libpq's values: `disable` (plain), `prefer` (TLS when the server offers it,
//! certificate not checked, plain otherwise), `require` (TLS, certificate not checked),
//! `verify-ca` (TLS, certificate signed by a trusted CA) and `verify-full` (that, and issued for
//! the host of the url). It may be given in the url instead (`?sslmode=verify-full`, or
//! `sslmode=verify-full` in a key=value string), not in both with different values.
//!
//! `ca` is a PEM file of one or more CA certificates, relative to the cage folder; with it the
//! server's certificate must chain to one of them and to nothing else. Without it verify-ca and
//! verify-full trust the public (webpki) CAs. It is read at config time, and only with
//! verify-ca or verify-full: with prefer or require nothing would check against it.

mod decode;
/// Entry points for the fuzz targets (`fuzz/`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::decode::{numeric, value, Decode};
    pub use tokio_postgres::types::{Kind, Type};
}
mod params;
mod tls;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::LocalBoxFuture;
use futures_util::{pin_mut, TryStreamExt};
use rustomnic_core::{Section, Value};
use rustomnic_resource::tls::{self as rtls, CaFile};
use rustomnic_resource::{error_chain, Connection, Error, Resource, ResourceProtocol};
use tokio_postgres::{CancelToken, Client};

use crate::tls::{PgTls, SslMode};

/// The keys this protocol reads itself (the pool keys are read by the runtime).
pub const KEYS: &[&str] = &["url", "statement_timeout", "sslmode", "ca"];

/// Methods of a connection, for "unknown method" messages.
const METHODS: &[&str] = &["execute"];

/// An idle connection unused for longer than this is checked with a round trip before it is
/// handed out again; a shorter idle time trusts the cheap "not closed" check alone.
const PING_AFTER_IDLE: Duration = Duration::from_secs(30);

/// How long that round trip may take before the connection is given up as dead.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// The protocol plugin; register it with the runtime's resource protocols.
pub struct Postgresql;

/// The protocol as the runtime's registry takes it.
pub fn protocol() -> Arc<dyn ResourceProtocol> {
    Arc::new(Postgresql)
}

impl ResourceProtocol for Postgresql {
    fn name(&self) -> &'static str {
        "postgresql"
    }

    fn configure(&self, _resource: &str, section: &Section) -> Option<Arc<dyn Resource>> {
        // Every key is read before any is judged, so that a bad url does not make the others
        // look unknown.
        let url = section.string("url");
        let statement_timeout = section.duration("statement_timeout", Duration::from_secs(86_400));
        let key_mode = section.string("sslmode").map(|m| SslMode::parse(&m.value).map_err(|e| section.error("sslmode", e)));
        let ca = rtls::read_ca(section, "ca");
        let Some(url) = url else {
            if !section.has("url") {
                section.error("url", "missing: the server to connect to, e.g. url = \"postgresql://app:${DB_PASSWORD}@127.0.0.1:5432/app\"");
            }
            return None;
        };
        // The text of the url is left out of messages: it may hold a password.
        let url = tls::take_url_tls(&url.value);
        if let Some(param) = url.other.first() {
            let hint = match param.as_str() {
                "sslrootcert" => "give the CA file as the key ca = \"...\" (relative to the cage folder)",
                _ => "client certificates are not supported by this resource",
            };
            section.error("url", format!("the url parameter {param} is not read here: {hint}"));
            return None;
        }
        let url_mode = match url.sslmode.as_deref().map(SslMode::parse) {
            Some(Ok(m)) => Some(m),
            Some(Err(e)) => {
                section.error("url", format!("sslmode in the url: {e}"));
                return None;
            }
            None => None,
        };
        let sslmode = match (key_mode, url_mode) {
            (Some(Err(())), _) => return None,
            (Some(Ok(k)), Some(u)) if k != u => {
                section.error("sslmode", format!("is {:?} but the url says sslmode={}; give it once", k.name(), u.name()));
                return None;
            }
            (Some(Ok(k)), _) => k,
            (None, Some(u)) => u,
            // Unlike libpq's prefer, so that no connection looks protected when it is not; see
            // docs/decisions/080-database-tls.md.
            (None, None) => SslMode::Disable,
        };
        let ca = match ca {
            Some(Ok(_)) if !sslmode.verifies() => {
                section.error(
                    "ca",
                    format!("is only read with sslmode \"verify-ca\" or \"verify-full\"; with {:?} the server's certificate is not checked", sslmode.name()),
                );
                return None;
            }
            Some(Ok(ca)) => Some(ca),
            Some(Err(())) => return None,
            None => None,
        };
        let tls_config = match sslmode.verify().map(|v| rtls::client_config(v, ca.as_ref())) {
            Some(Ok(c)) => Some(c),
            Some(Err(e)) => {
                section.error(if section.has("ca") { "ca" } else { "sslmode" }, format!("cannot set up TLS: {e}"));
                return None;
            }
            None => None,
        };
        let mut config: tokio_postgres::Config = match url.url.parse() {
            Ok(c) => c,
            Err(e) => {
                section.error("url", format!("not a PostgreSQL connection URL (postgresql://user:password@host:port/database): {e}"));
                return None;
            }
        };
        if config.get_hosts().is_empty() {
            section.error("url", "names no host (postgresql://user:password@host:port/database)");
            return None;
        }
        if config.get_user().is_none() {
            section.error("url", "names no user (postgresql://user:password@host:port/database)");
            return None;
        }
        if let Some(t) = statement_timeout {
            // Passed as a startup option, so it costs no round trip per connection.
            let option = format!("-c statement_timeout={}", t.value.as_millis());
            let options = match config.get_options() {
                Some(existing) if !existing.is_empty() => format!("{existing} {option}"),
                _ => option,
            };
            config.options(&options);
        }
        if config.get_application_name().is_none() {
            // Shows in pg_stat_activity which connections are ours.
            config.application_name("rustomnic");
        }
        config.ssl_mode(sslmode.wire());
        Some(Arc::new(PgResource { config, tls: PgTls { config: tls_config }, sslmode, ca: ca.map(Arc::new) }))
    }
}

struct PgResource {
    config: tokio_postgres::Config,
    tls: PgTls,
    sslmode: SslMode,
    /// For messages about a certificate its CA did not sign.
    ca: Option<Arc<CaFile>>,
}

impl Resource for PgResource {
    fn connect(&self) -> LocalBoxFuture<'static, Result<Box<dyn Connection>, Error>> {
        let config = self.config.clone();
        let tls = self.tls.clone();
        let sslmode = self.sslmode;
        let ca = self.ca.clone();
        Box::pin(async move {
            let (client, connection) = config.connect(tls.clone()).await.map_err(|e| Error::new(connect_message(&e, sslmode, ca.as_deref())))?;
            // The connection future does the socket I/O for the client; it ends when the client
            // is dropped or the server goes away (then the client reports itself closed).
            tokio::task::spawn_local(async move {
                if let Err(e) = connection.await {
                    tracing::debug!("postgresql connection ended: {e}");
                }
            });
            let cancel = client.cancel_token();
            Ok(Box::new(PgConnection { client, cancel, tls, busy: false, broken: false, last_used: Instant::now() }) as Box<dyn Connection>)
        })
    }
}

/// What the pool reports after "cannot connect: ".
fn connect_message(e: &tokio_postgres::Error, sslmode: SslMode, ca: Option<&CaFile>) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} [{}]", db.message(), db.code().code());
    }
    if let Some(why) = rtls::describe(e, ca) {
        return why;
    }
    let text = error_chain(e);
    if text.contains("server does not support TLS") {
        return format!("TLS: the server does not accept TLS connections (ssl is off on the server), and sslmode {:?} requires TLS", sslmode.name());
    }
    text
}

struct PgConnection {
    client: Client,
    cancel: CancelToken,
    /// The cancel request of a cut-off statement goes over TLS too when the connection did.
    tls: PgTls,
    /// A statement is in flight; if the connection is dropped now (deadline), the server is asked
    /// to cancel it so that it stops holding locks and a backend.
    busy: bool,
    /// An error left this connection unusable; the pool closes it.
    broken: bool,
    last_used: Instant,
}

impl Drop for PgConnection {
    fn drop(&mut self) {
        if !self.busy {
            return;
        }
        let cancel = self.cancel.clone();
        let tls = self.tls.clone();
        // Without a runtime (shutdown) there is nothing to send the cancel with; the server ends
        // the statement on its own when it notices the closed connection.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(e) = cancel.cancel_query(tls).await {
                    tracing::debug!("postgresql cancel request failed: {e}");
                }
            });
        }
    }
}

impl PgConnection {
    async fn simple(&mut self, sql: &'static str) -> Result<(), Error> {
        self.busy = true;
        let r = self.client.batch_execute(sql).await.map_err(|e| server_error(&e, &self.client));
        self.done(r)
    }

    /// Bookkeeping after every statement.
    fn done<T>(&mut self, r: Result<T, Error>) -> Result<T, Error> {
        self.busy = false;
        self.last_used = Instant::now();
        if let Err(e) = &r {
            self.broken |= e.broken;
        }
        r
    }

    /// Lost, or cut off in the middle of a statement (the deadline dropped the call).
    fn unusable(&self) -> bool {
        self.broken || self.busy || self.client.is_closed()
    }

    async fn execute(&mut self, args: Vec<Value>) -> Result<Value, Error> {
        let mut args = args.into_iter();
        let sql = match args.next() {
            Some(Value::Str(bytes)) => String::from_utf8(bytes).map_err(|_| Error::new("execute: the SQL text is not UTF-8"))?,
            Some(other) => return Err(Error::new(format!("execute: the first argument is the SQL text, got {}", other.type_name()))),
            None => return Err(Error::new("execute: the SQL text is missing (execute(sql, ...parameters))")),
        };
        let values: Vec<Value> = args.collect();
        self.busy = true;
        let r = self.run(&sql, &values).await;
        self.done(r)
    }

    async fn run(&self, sql: &str, values: &[Value]) -> Result<Value, Error> {
        let stmt = self.client.prepare(sql).await.map_err(|e| server_error(&e, &self.client))?;
        let types = stmt.params();
        if types.len() != values.len() {
            return Err(Error::new(format!(
                "execute: the statement has {} parameter{} ($1..${}), {} value{} given",
                types.len(),
                if types.len() == 1 { "" } else { "s" },
                types.len(),
                values.len(),
                if values.len() == 1 { " was" } else { "s were" }
            )));
        }
        let params =
            values.iter().zip(types).enumerate().map(|(i, (v, ty))| params::convert(i + 1, v, ty)).collect::<Result<Vec<_>, _>>().map_err(Error::new)?;
        let stream = self.client.query_raw(&stmt, params.iter()).await.map_err(|e| server_error(&e, &self.client))?;
        pin_mut!(stream);
        let mut rows = Vec::new();
        while let Some(row) = stream.try_next().await.map_err(|e| server_error(&e, &self.client))? {
            rows.push(decode::row(&row).map_err(Error::new)?);
        }
        let affected = stream.rows_affected().unwrap_or(rows.len() as u64);
        Ok(Value::Map(vec![(Value::str("rows"), Value::Array(rows)), (Value::str("affected"), Value::Int(i64::try_from(affected).unwrap_or(i64::MAX)))]))
    }
}

/// A tokio-postgres error as a resource error: a server error keeps its SQLSTATE and leaves the
/// connection usable (the transaction is rolled back); anything else means the connection's
/// state is unknown.
fn server_error(e: &tokio_postgres::Error, client: &Client) -> Error {
    if let Some(db) = e.as_db_error() {
        let mut message = db.message().to_string();
        let mut extra = Vec::new();
        if let Some(detail) = db.detail() {
            extra.push(format!("detail: {detail}"));
        }
        if let Some(hint) = db.hint() {
            extra.push(format!("hint: {hint}"));
        }
        if !extra.is_empty() {
            message = format!("{message} ({})", extra.join("; "));
        }
        // FATAL and PANIC end the session on the server's side.
        let fatal = matches!(db.severity(), "FATAL" | "PANIC");
        let error = if fatal || client.is_closed() { Error::broken(message) } else { Error::new(message) };
        return error.with_code(db.code().code());
    }
    if e.is_closed() || client.is_closed() {
        return Error::broken(format!("the connection to the server was lost ({})", error_chain(e)));
    }
    Error::broken(error_chain(e))
}

impl Connection for PgConnection {
    fn begin(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(self.simple("BEGIN"))
    }

    fn call<'a>(&'a mut self, method: &'a str, args: Vec<Value>) -> LocalBoxFuture<'a, Result<Value, Error>> {
        Box::pin(async move {
            match method {
                "execute" => self.execute(args).await,
                _ => Err(Error::new(format!("postgresql has no method {method} (methods: {})", METHODS.join(", ")))),
            }
        })
    }

    fn commit(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            if self.unusable() {
                return Err(Error::broken("cannot commit: the connection was lost or cut off mid-statement"));
            }
            self.simple("COMMIT").await
        })
    }

    fn rollback(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            if self.unusable() {
                // Its call already failed as broken, so the pool closes this connection, and the
                // server rolls back the transaction of a closed connection. Sending ROLLBACK
                // would only wait for a statement still running (or fail on a dead socket) and
                // hide the call's own error behind "rollback failed".
                return Ok(());
            }
            self.simple("ROLLBACK").await
        })
    }

    fn is_healthy(&mut self) -> LocalBoxFuture<'_, bool> {
        Box::pin(async move {
            if self.unusable() {
                return false;
            }
            if self.last_used.elapsed() < PING_AFTER_IDLE {
                return true;
            }
            let ok = matches!(tokio::time::timeout(PING_TIMEOUT, self.client.simple_query("SELECT 1")).await, Ok(Ok(_)));
            if ok {
                self.last_used = Instant::now();
            }
            ok
        })
    }
}
