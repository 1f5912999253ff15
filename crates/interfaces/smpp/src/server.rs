//! The server side of the smpp interface (`listen = "..."`): ESMEs connect and bind as
//! transmitter or transceiver with the configured credentials; every submit_sm and data_sm is a
//! request, answered after the handler with the message id it returned (or one made here), or
//! ESME_RSUBMITFAIL when it failed. The connection is served on the worker the runtime gave it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use rustomnic_core::Value;
use rustomnic_interface::Shutdown;
use rustomnic_lua::{worker, RequestCtx};
use rustomnic_resource_smpp::pdu::{self, Body, Pdu};
use rustomnic_resource_smpp::session::{Reader, Writer};
use tokio::net::TcpStream;

use crate::{message, SmppInterface};

/// What ESMEs bind with, and the connection's timings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub system_id: String,
    pub password: String,
    pub enquire_link: Duration,
    pub response_timeout: Duration,
    pub window: usize,
}

fn new_message_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("{:x}{:08x}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

impl SmppInterface {
    /// Serves one ESME until it unbinds or closes, the link dies, or the interface stops (the
    /// messages in flight are answered first).
    pub(crate) async fn serve_esme(&self, cfg: &ServerConfig, stream: TcpStream, remote: SocketAddr, mut shutdown: Shutdown) -> Result<(), String> {
        let _ = stream.set_nodelay(true);
        let peer = format!("ESME {remote}");
        let (r, w) = stream.into_split();
        let mut reader = Reader::new(r, peer.clone());
        let mut writer = Writer::new(w, peer.clone());
        let bind = match tokio::time::timeout(cfg.response_timeout, reader.next()).await {
            Ok(p) => p?,
            Err(_) => return Err(format!("{peer}: no bind within {:?}", cfg.response_timeout)),
        };
        let (system_id, password) = match &bind.body {
            Body::Bind(b) if bind.command_id == pdu::BIND_TRANSMITTER || bind.command_id == pdu::BIND_TRANSCEIVER => (b.system_id.clone(), b.password.clone()),
            Body::Bind(_) => {
                let resp = bind.response(pdu::ESME_RBINDFAIL, Body::BindResp(None, vec![]));
                writer.send(&resp).await?;
                return Err(format!("{peer}: {} refused: this interface takes submits (bind as transmitter or transceiver)", bind.name()));
            }
            _ => {
                let nack = Pdu { command_id: pdu::GENERIC_NACK, status: pdu::ESME_RINVBNDSTS, sequence: bind.sequence, body: Body::Empty };
                writer.send(&nack).await?;
                return Err(format!("{peer}: {} before a bind", bind.name()));
            }
        };
        let status = if system_id != cfg.system_id.as_bytes() {
            pdu::ESME_RINVSYSID
        } else if password != cfg.password.as_bytes() {
            pdu::ESME_RINVPASWD
        } else {
            pdu::ESME_ROK
        };
        let body = if status == pdu::ESME_ROK { Body::BindResp(Some(b"pmnc".to_vec()), vec![]) } else { Body::BindResp(None, vec![]) };
        writer.send(&bind.response(status, body)).await?;
        let who = String::from_utf8_lossy(&system_id).into_owned();
        if status != pdu::ESME_ROK {
            return Err(format!("{peer}: {} as {who:?} refused: {}", bind.name(), pdu::status_name(status)));
        }
        tracing::debug!(cage = %self.spec.cage, interface = %self.spec.name, "{peer} bound as {who}");
        let mut running = FuturesUnordered::new();
        let mut heard = tokio::time::Instant::now();
        let mut probe: Option<(u32, tokio::time::Instant)> = None;
        let mut next_seq: u32 = 1;
        let mut stopping = false;
        loop {
            if stopping && running.is_empty() {
                return Ok(());
            }
            let probe_due = match probe {
                Some((_, since)) => since + cfg.response_timeout,
                None => heard + cfg.enquire_link,
            };
            tokio::select! {
                _ = shutdown.changed(), if !stopping => stopping = true,
                Some(resp) = running.next(), if !running.is_empty() => writer.send(&resp).await?,
                _ = tokio::time::sleep_until(probe_due), if !stopping => match probe {
                    Some(_) => return Err(format!("{peer}: no enquire_link_resp within {:?}", cfg.response_timeout)),
                    None => {
                        next_seq = next_seq % 0x7FFF_FFFF + 1;
                        writer.send(&Pdu::new(pdu::ENQUIRE_LINK, next_seq, Body::Empty)).await?;
                        probe = Some((next_seq, tokio::time::Instant::now()));
                    }
                },
                next = reader.next_or_bad(), if !stopping => {
                    heard = tokio::time::Instant::now();
                    let p = match next? {
                        Ok(p) => p,
                        Err(bad) => {
                            tracing::warn!(cage = %self.spec.cage, interface = %self.spec.name, "{peer}: a malformed PDU answered with generic_nack: {bad}");
                            let nack = Pdu { command_id: pdu::GENERIC_NACK, status: bad.status, sequence: bad.sequence.unwrap_or(0), body: Body::Empty };
                            writer.send(&nack).await?;
                            continue;
                        }
                    };
                    match p.command_id {
                        pdu::SUBMIT_SM | pdu::DATA_SM if running.len() >= cfg.window => {
                            writer.send(&p.response(pdu::ESME_RTHROTTLED, Body::SmResp(None, vec![]))).await?;
                        }
                        pdu::SUBMIT_SM | pdu::DATA_SM => running.push(self.submitted(p, who.clone(), remote)),
                        pdu::ENQUIRE_LINK => writer.send(&p.response(pdu::ESME_ROK, Body::Empty)).await?,
                        c if c == pdu::ENQUIRE_LINK | pdu::RESP => {
                            if probe.is_some_and(|(s, _)| s == p.sequence) {
                                probe = None;
                            }
                        }
                        pdu::UNBIND => {
                            // What is in flight is answered first, then unbind_resp.
                            while let Some(resp) = running.next().await {
                                writer.send(&resp).await?;
                            }
                            writer.send(&p.response(pdu::ESME_ROK, Body::Empty)).await?;
                            return Ok(());
                        }
                        c if c & pdu::RESP != 0 => {}
                        _ => {
                            let nack = Pdu { command_id: pdu::GENERIC_NACK, status: pdu::ESME_RINVCMDID, sequence: p.sequence, body: Body::Empty };
                            writer.send(&nack).await?;
                        }
                    }
                }
            }
        }
    }

    /// Runs the handler for one submit_sm or data_sm; gives the response to send.
    fn submitted(&self, p: Pdu, system_id: String, remote: SocketAddr) -> futures_util::future::LocalBoxFuture<'static, Pdu> {
        let spec = self.spec.clone();
        Box::pin(async move {
            let mut m = message(&p);
            if let Value::Map(entries) = &mut m {
                entries.push((Value::str("system_id"), Value::str(system_id)));
                entries.push((Value::str("remote_addr"), Value::str(remote.to_string())));
            }
            let (module, function) = &spec.handler.value;
            let outcome = match worker::cage(&spec.cage) {
                Some(vm) => worker::run_traced(
                    &vm,
                    RequestCtx::new(&spec.cage, &spec.name, spec.request_timeout),
                    module,
                    function,
                    vec![m],
                    rustomnic_lua::trace::SpanKind::Server,
                )
                .await
                .map_err(|e| e.to_string()),
                None => Err("the cage is not running".to_string()),
            };
            match outcome {
                Ok(values) => {
                    let id = match values.into_iter().next() {
                        Some(v @ Value::Str(_)) => {
                            v.as_str().map(str::to_string).filter(|s| s.len() < pdu::MESSAGE_ID && !s.contains('\0')).unwrap_or_else(new_message_id)
                        }
                        Some(Value::Int(i)) => i.to_string(),
                        _ => new_message_id(),
                    };
                    p.response(pdu::ESME_ROK, Body::SmResp(Some(id.into_bytes()), vec![]))
                }
                Err(e) => {
                    tracing::warn!(cage = %spec.cage, interface = %spec.name, "{} #{} failed: {e}; answered ESME_RSUBMITFAIL", p.name(), p.sequence);
                    p.response(0x45, Body::SmResp(None, vec![]))
                }
            }
        })
    }
}
