//! The `mysql` resource (MySQL and MariaDB): `xa.db.execute(sql, ...params)` with `?`
//! placeholders on a real transaction per participant (START TRANSACTION, the call, then COMMIT
//! or ROLLBACK), through mysql_async, over TLS (rustls on ring) when `ssl_mode` asks for it.
//!
//! ```toml
//! [resources.db]
//! protocol = "mysql"
//! url = "mysql://app:${DB_PASSWORD}@db.internal:3306/app"
//! ssl_mode = "verify_identity"       # optional, default "disabled"
//! ca = "certs/db-ca.pem"             # optional: the CA of the server's certificate (PEM)
//! ```
//!
//! `ssl_mode` takes the values of MySQL's `--ssl-mode` (in lower or upper case): `disabled`
//! (plain), `preferred` (TLS when the server offers it, certificate not checked, plain
//! otherwise), `required` (TLS, certificate not checked), `verify_ca` (TLS, certificate signed
//! by a trusted CA) and `verify_identity` (that, and issued for the host of the url). mysql_async's
//! own url parameters for TLS (`require_ssl`, `verify_ca`, ...) are refused in favour of it.
//!
//! `ca` is a PEM file of one or more CA certificates, relative to the cage folder; with it the
//! server's certificate must chain to one of them and to nothing else. Without it verify_ca and
//! verify_identity trust the public (webpki) CAs. It is read at config time, and only with
//! verify_ca or verify_identity: with preferred or required nothing would check against it.

mod convert;
mod verify_ca;

/// Entry points for the fuzz targets (`fuzz/`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::convert::cell;
    pub use mysql_async::consts::ColumnType;
    pub use mysql_async::{Column, Value};
}

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::LocalBoxFuture;
use mysql_async::prelude::{Protocol as WireProtocol, Queryable};
use mysql_async::{Conn, Opts, OptsBuilder, Params, QueryResult, SslOpts};
use rustomnic_core::{Section, Value};
use rustomnic_resource::tls::{self as rtls, CaFile};
use rustomnic_resource::{error_chain, Connection, Error, Resource, ResourceProtocol};

/// The keys this protocol reads itself (the pool keys are read by the runtime).
pub const KEYS: &[&str] = &["url", "ssl_mode", "ca"];

/// MySQL's --ssl-mode values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SslMode {
    Disabled,
    Preferred,
    Required,
    VerifyCa,
    VerifyIdentity,
}

const SSL_MODES: &str = "\"disabled\", \"preferred\", \"required\", \"verify_ca\", \"verify_identity\"";

impl SslMode {
    fn parse(text: &str) -> Result<SslMode, String> {
        Ok(match text.to_ascii_lowercase().as_str() {
            "disabled" => SslMode::Disabled,
            "preferred" => SslMode::Preferred,
            "required" => SslMode::Required,
            "verify_ca" => SslMode::VerifyCa,
            "verify_identity" => SslMode::VerifyIdentity,
            _ => return Err(format!("{text:?} is not an ssl_mode; use one of {SSL_MODES}")),
        })
    }

    fn name(self) -> &'static str {
        match self {
            SslMode::Disabled => "disabled",
            SslMode::Preferred => "preferred",
            SslMode::Required => "required",
            SslMode::VerifyCa => "verify_ca",
            SslMode::VerifyIdentity => "verify_identity",
        }
    }

    fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyIdentity)
    }

    /// mysql_async's TLS settings for this mode; `None` without TLS.
    fn ssl_opts(self, ca: Option<&CaFile>) -> Option<SslOpts> {
        let verified = |ca: Option<&CaFile>| {
            let opts = SslOpts::default();
            match ca {
                // Only the CA of `ca`: a private CA is not widened to every public one.
                Some(ca) => opts.with_root_certs(vec![ca.pem.clone().into()]).with_disable_built_in_roots(true),
                None => opts,
            }
        };
        match self {
            SslMode::Disabled => None,
            SslMode::Preferred | SslMode::Required => Some(SslOpts::default().with_danger_accept_invalid_certs(true)),
            // The name is set per connection: see verify_ca.rs.
            SslMode::VerifyCa | SslMode::VerifyIdentity => Some(verified(ca)),
        }
    }
}

/// Methods of a connection, for "unknown method" messages.
const METHODS: &[&str] = &["execute"];

/// An idle connection unused for longer than this is pinged before it is handed out again (the
/// server drops connections idle past its wait_timeout); a shorter idle time trusts the cheap
/// "not disconnected" check alone.
const PING_AFTER_IDLE: Duration = Duration::from_secs(30);

/// How long that ping may take before the connection is given up as dead.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// ER_UNSUPPORTED_PS: this statement cannot be prepared; without parameters it is sent as text.
const UNSUPPORTED_PS: u16 = 1295;

/// Server errors after which the server closes the connection.
const FATAL_CODES: &[u16] = &[
    1053, // ER_SERVER_SHUTDOWN
    1152, // ER_ABORTING_CONNECTION
    1927, // ER_CONNECTION_KILLED (MariaDB)
    4031, // ER_CLIENT_INTERACTION_TIMEOUT (MySQL 8)
];

/// The protocol plugin; register it with the runtime's resource protocols.
pub struct Mysql;

/// The protocol as the runtime's registry takes it.
pub fn protocol() -> Arc<dyn ResourceProtocol> {
    Arc::new(Mysql)
}

impl ResourceProtocol for Mysql {
    fn name(&self) -> &'static str {
        "mysql"
    }

    fn configure(&self, _resource: &str, section: &Section) -> Option<Arc<dyn Resource>> {
        let url = section.string("url");
        let ssl_mode = section.string("ssl_mode").map(|m| SslMode::parse(&m.value).map_err(|e| section.error("ssl_mode", e)));
        let ca = rtls::read_ca(section, "ca");
        let Some(url) = url else {
            if !section.has("url") {
                section.error("url", "missing: the server to connect to, e.g. url = \"mysql://app:${DB_PASSWORD}@127.0.0.1:3306/app\"");
            }
            return None;
        };
        // The text of the url is left out of messages: it may hold a password.
        let opts = match Opts::from_url(&url.value) {
            Ok(opts) => opts,
            Err(e) => {
                section.error("url", format!("not a MySQL connection URL (mysql://user:password@host:port/database): {e}"));
                return None;
            }
        };
        if opts.ssl_opts().is_some() {
            section.error("url", "TLS is set with the key ssl_mode (and ca), not with url parameters such as require_ssl");
            return None;
        }
        let ssl_mode = match ssl_mode {
            Some(Ok(m)) => m,
            Some(Err(())) => return None,
            // As today and unlike the mysql client's preferred, so that no connection looks
            // protected when it is not; see docs/decisions/080-database-tls.md.
            None => SslMode::Disabled,
        };
        let ca = match ca {
            Some(Ok(_)) if !ssl_mode.verifies() => {
                section.error(
                    "ca",
                    format!(
                        "is only read with ssl_mode \"verify_ca\" or \"verify_identity\"; with {:?} the server's certificate is not checked",
                        ssl_mode.name()
                    ),
                );
                return None;
            }
            Some(Ok(ca)) => Some(ca),
            Some(Err(())) => return None,
            None => None,
        };
        // mysql_async builds its rustls settings with the process's default provider.
        rtls::install_default_provider();
        let mut tls_opts = OptsBuilder::from_opts(opts.clone()).ssl_opts(ssl_mode.ssl_opts(ca.as_ref()));
        if ssl_mode != SslMode::Disabled {
            // mysql_async would otherwise move a connection to a local server onto its Unix
            // socket, without TLS, which is not what the config asked for.
            tls_opts = tls_opts.prefer_socket(false);
        }
        let tls_opts = tls_opts.into();
        Some(Arc::new(MysqlResource { tls_opts, plain_opts: opts, ssl_mode, ca: ca.map(Arc::new) }))
    }
}

struct MysqlResource {
    /// The options with the TLS settings of `ssl_mode` (the same as `plain_opts` when disabled).
    tls_opts: Opts,
    /// Without TLS: preferred falls back to these when the server has no TLS.
    plain_opts: Opts,
    ssl_mode: SslMode,
    /// For messages about a certificate its CA did not sign.
    ca: Option<Arc<CaFile>>,
}

impl Resource for MysqlResource {
    fn connect(&self) -> LocalBoxFuture<'static, Result<Box<dyn Connection>, Error>> {
        let tls_opts = self.tls_opts.clone();
        let plain_opts = self.plain_opts.clone();
        let ssl_mode = self.ssl_mode;
        let ca = self.ca.clone();
        Box::pin(async move {
            let tls_opts = if ssl_mode == SslMode::VerifyCa {
                let name = verify_ca::certificate_name(tls_opts.ip_or_hostname(), tls_opts.tcp_port(), ca.as_deref()).await.map_err(Error::new)?;
                let ssl = tls_opts.ssl_opts().cloned().map(|s| s.with_danger_tls_hostname_override(Some(name)));
                OptsBuilder::from_opts(tls_opts).ssl_opts(ssl).into()
            } else {
                tls_opts
            };
            let (conn, opts) = match Conn::new(tls_opts.clone()).await {
                Ok(conn) => (conn, tls_opts),
                Err(mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer)) if ssl_mode == SslMode::Preferred => {
                    let conn = Conn::new(plain_opts.clone()).await.map_err(|e| Error::new(connect_message(&e, ssl_mode, ca.as_deref())))?;
                    (conn, plain_opts)
                }
                Err(e) => return Err(Error::new(connect_message(&e, ssl_mode, ca.as_deref()))),
            };
            Ok(Box::new(MysqlConnection { conn, opts, busy: false, broken: false, last_used: Instant::now() }) as Box<dyn Connection>)
        })
    }
}

/// What the pool reports after "cannot connect: ".
fn connect_message(e: &mysql_async::Error, ssl_mode: SslMode, ca: Option<&CaFile>) -> String {
    match e {
        mysql_async::Error::Server(s) => format!("{} [{}]", s.message, s.code),
        mysql_async::Error::Driver(mysql_async::DriverError::NoClientSslFlagFromServer) => {
            format!("TLS: the server does not accept TLS connections (have_ssl is not YES on the server), and ssl_mode {:?} requires TLS", ssl_mode.name())
        }
        other => rtls::describe(other, ca).unwrap_or_else(|| describe(other)),
    }
}

/// A client-side error on one line. mysql_async's own text of an I/O error repeats itself
/// ("Input/output error: Input/output error: Connection refused"); the OS error says it all.
fn describe(e: &mysql_async::Error) -> String {
    match e {
        mysql_async::Error::Io(mysql_async::IoError::Io(io)) => io.to_string(),
        other => error_chain(other),
    }
}

struct MysqlConnection {
    conn: Conn,
    /// For the side connection that kills a statement cut off by the deadline: the options this
    /// connection was made with, TLS or not.
    opts: Opts,
    /// A statement is in flight; if the connection is dropped now (deadline), the server is told
    /// to kill it so that it stops holding locks and a thread.
    busy: bool,
    /// An error left this connection unusable; the pool closes it.
    broken: bool,
    last_used: Instant,
}

impl Drop for MysqlConnection {
    fn drop(&mut self) {
        if !self.busy {
            return;
        }
        let id = self.conn.id();
        let opts = self.opts.clone();
        // Without a runtime (shutdown) there is nothing to send the kill with; the server ends
        // the statement on its own.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                match Conn::new(opts).await {
                    Ok(mut side) => {
                        if let Err(e) = side.query_drop(format!("KILL QUERY {id}")).await {
                            tracing::debug!("mysql KILL QUERY {id} failed: {e}");
                        }
                        let _ = side.disconnect().await;
                    }
                    Err(e) => tracing::debug!("mysql: no connection to kill query {id}: {e}"),
                }
            });
        }
    }
}

/// A mysql_async error as a resource error: a server error keeps its code and leaves the
/// connection usable (the transaction is rolled back); I/O and protocol errors mean the
/// connection's state is unknown.
fn call_error(e: mysql_async::Error) -> Error {
    match e {
        mysql_async::Error::Server(s) => {
            let error = if FATAL_CODES.contains(&s.code) { Error::broken(s.message) } else { Error::new(s.message) };
            error.with_code(s.code.to_string())
        }
        mysql_async::Error::Driver(mysql_async::DriverError::StmtParamsMismatch { required, supplied }) => Error::new(format!(
            "execute: the statement has {required} parameter{} (?), {supplied} value{} given",
            if required == 1 { "" } else { "s" },
            if supplied == 1 { " was" } else { "s were" }
        )),
        mysql_async::Error::Io(_) => Error::broken(format!("the connection to the server was lost ({})", describe(&e))),
        other => Error::broken(describe(&other)),
    }
}

impl MysqlConnection {
    async fn simple(&mut self, sql: &'static str) -> Result<(), Error> {
        self.busy = true;
        let r = self.conn.query_drop(sql).await.map_err(call_error);
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
        self.broken || self.busy || self.conn.is_disconnected()
    }

    async fn execute(&mut self, args: Vec<Value>) -> Result<Value, Error> {
        let mut args = args.into_iter();
        let sql = match args.next() {
            Some(Value::Str(bytes)) => String::from_utf8(bytes).map_err(|_| Error::new("execute: the SQL text is not UTF-8"))?,
            Some(other) => return Err(Error::new(format!("execute: the first argument is the SQL text, got {}", other.type_name()))),
            None => return Err(Error::new("execute: the SQL text is missing (execute(sql, ...parameters))")),
        };
        let params = args.enumerate().map(|(i, v)| convert::param(i + 1, &v)).collect::<Result<Vec<_>, _>>().map_err(Error::new)?;
        self.busy = true;
        let r = self.run(&sql, params).await;
        self.done(r)
    }

    async fn run(&mut self, sql: &str, params: Vec<mysql_async::Value>) -> Result<Value, Error> {
        let no_params = params.is_empty();
        let params = if no_params { Params::Empty } else { Params::Positional(params) };
        match self.conn.exec_iter(sql, params).await {
            Ok(result) => collect(result).await,
            // Some statements cannot be prepared; without parameters the text protocol runs them.
            Err(mysql_async::Error::Server(s)) if s.code == UNSUPPORTED_PS && no_params => {
                let result = self.conn.query_iter(sql).await.map_err(call_error)?;
                collect(result).await
            }
            Err(e) => Err(call_error(e)),
        }
    }
}

/// The first result set as `{rows = ..., affected = n}`; further result sets (of a CALL) are
/// read and dropped so the connection is ready for the next statement.
async fn collect<P: WireProtocol>(mut result: QueryResult<'_, 'static, P>) -> Result<Value, Error> {
    let columns = result.columns();
    let raw: Vec<mysql_async::Row> = result.collect().await.map_err(call_error)?;
    let affected = result.affected_rows();
    result.drop_result().await.map_err(call_error)?;
    let mut rows = Vec::with_capacity(raw.len());
    for row in raw {
        rows.push(convert::row(row).map_err(Error::new)?);
    }
    // A statement with a result set counts its rows; one without (INSERT, UPDATE, DELETE)
    // counts what it changed.
    let has_columns = columns.is_some_and(|c| !c.is_empty());
    let affected = if has_columns { rows.len() as u64 } else { affected };
    Ok(Value::Map(vec![(Value::str("rows"), Value::Array(rows)), (Value::str("affected"), Value::Int(i64::try_from(affected).unwrap_or(i64::MAX)))]))
}

impl Connection for MysqlConnection {
    fn begin(&mut self) -> LocalBoxFuture<'_, Result<(), Error>> {
        Box::pin(self.simple("START TRANSACTION"))
    }

    fn call<'a>(&'a mut self, method: &'a str, args: Vec<Value>) -> LocalBoxFuture<'a, Result<Value, Error>> {
        Box::pin(async move {
            match method {
                "execute" => self.execute(args).await,
                _ => Err(Error::new(format!("mysql has no method {method} (methods: {})", METHODS.join(", ")))),
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
            let ok = matches!(tokio::time::timeout(PING_TIMEOUT, self.conn.ping()).await, Ok(Ok(())));
            if ok {
                self.last_used = Instant::now();
            }
            ok
        })
    }
}
