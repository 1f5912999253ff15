//! A hello-world server in pure hyper on the same worker layout (one current-thread runtime per
//! thread, connections handed round robin), used only by the benchmark that compares it with a
//! Lua handler.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// Serves "Hello, world!" on `addr` with `workers` threads until the process is killed.
pub fn serve(addr: SocketAddr, workers: usize) -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind(addr)?;
    println!("raw hyper listening on {}", listener.local_addr()?);
    let mut senders = Vec::new();
    for _ in 0..workers.max(1) {
        let (tx, rx) = std::sync::mpsc::channel::<std::net::TcpStream>();
        senders.push(tx);
        std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("raw-http: cannot start a worker runtime: {e}");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            let (atx, mut arx) = tokio::sync::mpsc::unbounded_channel();
            std::thread::spawn(move || {
                while let Ok(s) = rx.recv() {
                    if atx.send(s).is_err() {
                        break;
                    }
                }
            });
            local.block_on(&rt, async move {
                while let Some(s) = arx.recv().await {
                    let _ = s.set_nonblocking(true);
                    let Ok(s) = tokio::net::TcpStream::from_std(s) else { continue };
                    tokio::task::spawn_local(async move {
                        let svc = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"Hello, world!"))))
                        });
                        let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
                    });
                }
            });
        });
    }
    let mut next = 0;
    for s in listener.incoming() {
        let Ok(s) = s else { continue };
        let _ = s.set_nodelay(true);
        next = (next + 1) % senders.len();
        let _ = senders[next].send(s);
    }
    Ok(())
}
