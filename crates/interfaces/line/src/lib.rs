//! The `line` interface: a TCP protocol where each line a client sends is one request to the
//! handler, and what the handler returns is sent back as one line. Small on purpose: it is the
//! interface docs/writing-an-interface.md builds step by step.
//!
//! ```toml
//! [interfaces.echo]
//! protocol = "line"
//! listen = "127.0.0.1:7000"        # required
//! max_line_size = "64KiB"          # a longer line gets "error: line too long" and the connection closes
//! idle_timeout = "60s"             # a connection that sends nothing for this long is closed
//! ```
//!
//! The handler is called as `handler(line, client)`: `line` without its end of line (`\n` or
//! `\r\n`), `client` a table with `remote_addr`. A string or number it returns is sent back with
//! `\n`; `nil` sends nothing; anything else is sent as JSON. A failed handler sends
//! `error: <request id>` (the details are in the log, with that id).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::LocalBoxFuture;
use rustomnic_core::{Located, Section, Value};
use rustomnic_interface::{Interface, InterfaceProtocol, InterfaceSpec, Shutdown};
use rustomnic_lua::{worker, RequestCtx, RunError};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The `line` protocol; registered by the binary with `Protocols::add`.
pub struct LineProtocol;

/// A configured `line` interface.
pub struct LineInterface {
    spec: InterfaceSpec,
    listen: Located<SocketAddr>,
    max_line_size: usize,
    idle_timeout: Duration,
}

impl InterfaceProtocol for LineProtocol {
    fn name(&self) -> &'static str {
        "line"
    }

    fn configure(&self, spec: InterfaceSpec, section: &Section) -> Option<Arc<dyn Interface>> {
        let listen = rustomnic_interface::read_listen(section);
        let max_line_size = section.size("max_line_size", 16 << 20).map(|v| v.value as usize).unwrap_or(64 << 10);
        let idle_timeout = section.duration("idle_timeout", Duration::from_secs(86_400)).map(|v| v.value).unwrap_or(Duration::from_secs(60));
        Some(Arc::new(LineInterface { spec, listen: listen?, max_line_size, idle_timeout }))
    }
}

impl Interface for LineInterface {
    fn spec(&self) -> &InterfaceSpec {
        &self.spec
    }

    fn listen(&self) -> Option<Located<SocketAddr>> {
        Some(self.listen.clone())
    }

    fn serve(self: Arc<Self>, stream: TcpStream, remote: SocketAddr, shutdown: Shutdown) -> LocalBoxFuture<'static, ()> {
        Box::pin(async move {
            if let Err(e) = self.connection(stream, remote, shutdown).await {
                tracing::debug!(cage = %self.spec.cage, interface = %self.spec.name, "connection from {remote}: {e}");
            }
        })
    }
}

/// What reading the next line came to.
enum Read {
    Line(Vec<u8>),
    TooLong,
    Closed,
}

impl LineInterface {
    /// Serves one connection: a request per line, one after the other, until the client closes,
    /// stays idle too long, or the interface stops (the line being handled is answered first).
    async fn connection(&self, stream: TcpStream, remote: SocketAddr, mut shutdown: Shutdown) -> std::io::Result<()> {
        let (reader, mut writer) = stream.into_split();
        let mut reader = BufReader::new(reader);
        loop {
            let read = tokio::select! {
                r = tokio::time::timeout(self.idle_timeout, self.read_line(&mut reader)) => match r {
                    Ok(r) => r?,
                    Err(_) => return Ok(()),
                },
                _ = shutdown.changed() => return Ok(()),
            };
            let line = match read {
                Read::Line(line) => line,
                Read::Closed => return Ok(()),
                Read::TooLong => {
                    writer.write_all(format!("error: line too long (over {} bytes)\n", self.max_line_size).as_bytes()).await?;
                    return Ok(());
                }
            };
            if let Some(answer) = self.handle(line, remote).await {
                writer.write_all(&answer).await?;
            }
        }
    }

    /// The next line without its end of line, refusing one longer than `max_line_size`.
    async fn read_line(&self, reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> std::io::Result<Read> {
        let mut line = Vec::new();
        loop {
            let buf = reader.fill_buf().await?;
            if buf.is_empty() {
                // The client closed; a last line without its end still counts.
                return Ok(if line.is_empty() { Read::Closed } else { Read::Line(line) });
            }
            let (take, done) = match buf.iter().position(|b| *b == b'\n') {
                Some(at) => (at + 1, true),
                None => (buf.len(), false),
            };
            line.extend_from_slice(&buf[..take]);
            reader.consume(take);
            if line.len() > self.max_line_size + 2 {
                return Ok(Read::TooLong);
            }
            if done {
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(if line.len() > self.max_line_size { Read::TooLong } else { Read::Line(line) });
            }
        }
    }

    /// Runs the handler for one line on this worker; the bytes to send back.
    async fn handle(&self, line: Vec<u8>, remote: SocketAddr) -> Option<Vec<u8>> {
        let spec = &self.spec;
        let (module, function) = &spec.handler.value;
        let Some(vm) = worker::cage(&spec.cage) else { return Some(b"error: the cage is not running\n".to_vec()) };
        let ctx = RequestCtx::new(&spec.cage, &spec.name, spec.request_timeout);
        let id = ctx.id.clone();
        let client = Value::Map(vec![(Value::str("remote_addr"), Value::str(remote.to_string()))]);
        match worker::run_traced(&vm, ctx, module, function, vec![Value::Str(line), client], rustomnic_lua::trace::SpanKind::Server).await {
            Ok(values) => answer(values.into_iter().next().unwrap_or(Value::Nil)),
            Err(e) => {
                if !matches!(e, RunError::Failed { .. }) {
                    tracing::error!(cage = %spec.cage, interface = %spec.name, request = %id, "{module}.{function}: {e}");
                }
                Some(format!("error: {id}\n").into_bytes())
            }
        }
    }
}

/// The line sent back for what a handler returned.
fn answer(value: Value) -> Option<Vec<u8>> {
    let mut bytes = match value {
        Value::Nil => return None,
        Value::Str(s) => s,
        Value::Int(i) => i.to_string().into_bytes(),
        Value::Float(f) => f.to_string().into_bytes(),
        other => other.to_json().map(|j| j.to_string().into_bytes()).unwrap_or_else(|e| format!("error: {e}").into_bytes()),
    };
    // One answer is one line: line breaks inside it would read as several answers.
    for b in bytes.iter_mut() {
        if *b == b'\n' || *b == b'\r' {
            *b = b' ';
        }
    }
    bytes.push(b'\n');
    Some(bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn answers_are_one_line() {
        use super::answer;
        use rustomnic_core::Value;
        assert_eq!(answer(Value::str("a\nb")), Some(b"a b\n".to_vec()));
        assert_eq!(answer(Value::Int(7)), Some(b"7\n".to_vec()));
        assert_eq!(answer(Value::Nil), None);
        assert_eq!(answer(Value::Map(vec![(Value::str("k"), Value::Int(1))])), Some(b"{\"k\":1}\n".to_vec()));
    }
}
