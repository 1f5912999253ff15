//! WebSocket sessions: `request.upgrade()` answers 101 and turns the request's coroutine into the
//! connection's session, with `ws.receive`, `ws.send` and `ws.close` (our framing, ws.rs, over
//! the connection our HTTP/1 side hands over; docs/decisions/022-websocket.md).

use std::time::{Duration, Instant};

use crate::ws::{Deflate, Message, WsConn, WsError};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, UPGRADE};
use hyper::StatusCode;
use rustomnic_lua::events;
use rustomnic_lua::mlua::{Lua, MultiValue, Table, Value as LuaValue};

use crate::stream::{ok, Body, Slot};

type Ws = WsConn;

/// How long closing waits for the client's half of the close handshake.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// The WebSocket of a request, if it has one.
pub(crate) enum WsState {
    None,
    Open(Box<Ws>),
    /// Taken by a `ws.*` call that is waiting (only one runs at a time: one coroutine).
    Busy,
    Closed,
}

fn fail(lua: &Lua, message: impl AsRef<str>) -> rustomnic_lua::mlua::Result<MultiValue> {
    Ok(MultiValue::from_iter([LuaValue::Boolean(false), LuaValue::String(lua.create_string(message.as_ref())?)]))
}

fn closed(lua: &Lua, code: Option<u16>) -> rustomnic_lua::mlua::Result<MultiValue> {
    Ok(ok([LuaValue::Nil, LuaValue::String(lua.create_string("closed")?), code.map(|c| LuaValue::Integer(c as i64)).unwrap_or(LuaValue::Nil)]))
}

/// The request's WebSocket, taken out of its slot for one call; `Err` with the Lua result when
/// there is none to use.
fn take(lua: &Lua, what: &str) -> Result<(std::rc::Rc<Slot>, Box<Ws>), rustomnic_lua::mlua::Result<MultiValue>> {
    let Some(slot) = Slot::current(lua) else { return Err(fail(lua, format!("{what} may only be called by the handler that upgraded the request"))) };
    let state = std::mem::replace(&mut *slot.ws.borrow_mut(), WsState::Busy);
    match state {
        WsState::Open(ws) => Ok((slot, ws)),
        WsState::Closed => {
            *slot.ws.borrow_mut() = WsState::Closed;
            Err(closed(lua, None))
        }
        WsState::None => {
            *slot.ws.borrow_mut() = WsState::None;
            Err(fail(lua, format!("{what}: this request was not upgraded (call request.upgrade() first)")))
        }
        WsState::Busy => Err(fail(lua, format!("{what}: another ws call of this request is still waiting"))),
    }
}

fn put_back(slot: &Slot, ws: Box<Ws>) {
    *slot.ws.borrow_mut() = WsState::Open(ws);
}

/// `request.upgrade()`: sends 101 (with the headers the handler set on `response`) and waits for
/// the connection to be handed over. A plain struct rather than an `async fn`: Lua keeps a
/// finished call's future until its garbage collector runs, so it should be small.
pub(crate) fn upgrade(lua: Lua, response: Table) -> Upgrading {
    match start_upgrade(&lua, response) {
        Ok((slot, rx, deflate)) => Upgrading { lua, state: Some(Ok((slot, rx, deflate))) },
        Err(r) => Upgrading { lua, state: Some(Err(Box::new(r))) },
    }
}

type Handover = tokio::sync::oneshot::Receiver<crate::Prefixed>;

fn start_upgrade(lua: &Lua, response: Table) -> Result<(std::rc::Rc<Slot>, Handover, Option<Deflate>), rustomnic_lua::mlua::Result<MultiValue>> {
    let what = "request.upgrade";
    let Some(slot) = Slot::current(lua) else { return Err(fail(lua, format!("{what} may only be called by the HTTP handler of the request"))) };
    if slot.replied() || slot.sender.borrow().is_some() {
        return Err(fail(lua, format!("{what}: the response was already started")));
    }
    let Some((on_upgrade, key, deflate)) = slot.upgrade.borrow_mut().take().map(|u| *u) else {
        return Err(fail(lua, format!("{what}: this request is not a WebSocket upgrade (check request.websocket first)")));
    };
    let mut r = match crate::handler::response_head(&response, Body::Full(None), &slot.id) {
        Ok(r) => r,
        Err(e) => return Err(fail(lua, format!("{what}: {e}"))),
    };
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let accept = tungstenite::handshake::derive_accept_key(&key);
    let h = r.headers_mut();
    h.remove(CONTENT_TYPE);
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    match HeaderValue::from_str(&accept) {
        Ok(v) => h.insert("sec-websocket-accept", v),
        Err(_) => return Err(fail(lua, format!("{what}: cannot make the accept key"))),
    };
    let deflate = match deflate.map(|d| *d) {
        Some((reply, d)) => match HeaderValue::from_str(&reply) {
            Ok(v) => {
                h.insert("sec-websocket-extensions", v);
                Some(d)
            }
            Err(_) => None,
        },
        None => None,
    };
    slot.reply(r);
    Ok((slot, on_upgrade, deflate))
}

/// The slot and the connection to come, or the answer when the upgrade was refused.
type UpgradeStart = Result<(std::rc::Rc<Slot>, Handover, Option<Deflate>), Box<rustomnic_lua::mlua::Result<MultiValue>>>;

pub(crate) struct Upgrading {
    lua: Lua,
    state: Option<UpgradeStart>,
}

impl std::future::Future for Upgrading {
    type Output = rustomnic_lua::mlua::Result<MultiValue>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = self.get_mut();
        let upgraded = match &mut this.state {
            Some(Ok((_, rx, _))) => Some(std::task::ready!(std::pin::Pin::new(rx).poll(cx))),
            Some(Err(_)) => None,
            None => return Poll::Pending,
        };
        let lua = &this.lua;
        let (slot, upgraded, deflate) = match (this.state.take(), upgraded) {
            (Some(Err(r)), _) => return Poll::Ready(*r),
            (Some(Ok((slot, _, deflate))), Some(Ok(u))) => (slot, u, deflate),
            (Some(Ok((slot, _, _))), _) => {
                *slot.ws.borrow_mut() = WsState::Closed;
                return Poll::Ready(fail(lua, "request.upgrade: the connection could not be upgraded: the client went away before the 101"));
            }
            (None, _) => return Poll::Pending,
        };
        let ws = WsConn::new(upgraded, slot.max_message_size, deflate);
        *slot.ws.borrow_mut() = WsState::Open(Box::new(ws));
        Poll::Ready(Ok(ok([])))
    }
}

/// `ws.receive(timeout, topic)`: the next message (data, "text"|"binary"), an event of `topic`
/// (value, "event"), nil, "timeout", or nil, "closed", code once the connection is over.
/// Answered by [`Receive`], a plain struct: an idle session holds it as long as it waits.
pub(crate) fn receive(lua: Lua, timeout: LuaValue, topic: Option<String>) -> Receive {
    let what = "ws.receive";
    let ready = |r| Receive { lua: lua.clone(), state: ReceiveState::Ready(Box::new(r)) };
    let timeout = match rustomnic_lua::events_seconds(what, &timeout) {
        Ok(t) => t,
        Err(e) => return ready(fail(&lua, e)),
    };
    let (slot, ws) = match take(&lua, what) {
        Ok(x) => x,
        Err(r) => return ready(r),
    };
    // The session stays subscribed to its topic between calls, so nothing published while it
    // handles a message (its own publish included) is missed.
    let mut sub = slot.subscription.borrow_mut().take();
    if let (Some(t), Some(ctx)) = (&topic, rustomnic_lua::current_request(&lua)) {
        if sub.as_ref().map(|s| s.topic()) != Some(t.as_str()) {
            sub = match events::subscribe(&ctx.cage, t) {
                Ok(s) => Some(Box::new(s)),
                Err(e) => {
                    put_back(&slot, ws);
                    return ready(fail(&lua, e.to_string()));
                }
            };
        }
    }
    let listen = topic.is_some();
    if !listen {
        // Not listening this time, but still subscribed for the next call that names it.
        *slot.subscription.borrow_mut() = sub.take();
    }
    let until = timeout.map(|s| Instant::now() + Duration::from_secs_f64(s.min(1e9)));
    Receive { lua, state: ReceiveState::Waiting { slot, ws, sub, until } }
}

pub(crate) struct Receive {
    lua: Lua,
    state: ReceiveState,
}

enum ReceiveState {
    Waiting {
        slot: std::rc::Rc<Slot>,
        ws: Box<Ws>,
        sub: Option<Box<events::Subscription>>,
        until: Option<Instant>,
    },
    /// Closing after a message that ends the session (rare, so boxed).
    Closing(std::pin::Pin<Box<dyn std::future::Future<Output = rustomnic_lua::mlua::Result<MultiValue>>>>),
    /// Answered without waiting; boxed, as it is rare and large.
    Ready(Box<rustomnic_lua::mlua::Result<MultiValue>>),
    Done,
}

/// What ended a wait of `ws.receive`.
enum Received {
    Message(Message),
    Failed(WsError),
    Gone,
    Event(Option<std::sync::Arc<rustomnic_core::Value>>),
    Timeout,
}

impl std::future::Future for Receive {
    type Output = rustomnic_lua::mlua::Result<MultiValue>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = self.get_mut();
        let received = match &mut this.state {
            ReceiveState::Waiting { ws, sub, until, .. } => match ws.poll_next(cx) {
                // Pings and pongs are answered inside ws.rs; only messages come out.
                Poll::Ready(Some(Ok(m))) => Received::Message(m),
                Poll::Ready(Some(Err(e))) => Received::Failed(e),
                Poll::Ready(None) => Received::Gone,
                Poll::Pending => match sub.as_mut().map(|s| s.poll_recv(cx)) {
                    Some(Poll::Ready(v)) => Received::Event(v),
                    _ => match until {
                        Some(u) if Instant::now() >= *u => Received::Timeout,
                        Some(u) => {
                            rustomnic_lua::wake_request_at(&this.lua, *u);
                            return Poll::Pending;
                        }
                        None => return Poll::Pending,
                    },
                },
            },
            ReceiveState::Closing(f) => {
                let r = std::task::ready!(f.as_mut().poll(cx));
                this.state = ReceiveState::Done;
                return Poll::Ready(r);
            }
            ReceiveState::Ready(_) => Received::Gone,
            ReceiveState::Done => return Poll::Pending,
        };
        let (slot, ws, sub) = match std::mem::replace(&mut this.state, ReceiveState::Done) {
            ReceiveState::Waiting { slot, ws, sub, .. } => (slot, ws, sub),
            ReceiveState::Ready(r) => return Poll::Ready(*r),
            _ => return Poll::Pending,
        };
        if let Some(s) = sub {
            *slot.subscription.borrow_mut() = Some(s);
        }
        let lua = &this.lua;
        let string = |b: &[u8]| lua.create_string(b).map(LuaValue::String);
        // Closes with `code`: our close frame with `reason`, or (none) the queued echo of the
        // client's close; then the session reports `code`.
        let closing = |ws: Box<Ws>, reason: Option<&'static str>, code: u16| -> ReceiveState {
            let lua = lua.clone();
            ReceiveState::Closing(Box::pin(async move {
                let mut ws = ws;
                match reason {
                    Some(reason) => ws.close(code, reason, CLOSE_WAIT).await,
                    // The echo of the client's close is queued; send it.
                    None => ws.flush(CLOSE_WAIT).await,
                }
                closed(&lua, Some(code))
            }))
        };
        let result = match received {
            Received::Message(Message::Text(t)) => {
                put_back(&slot, ws);
                string(&t).and_then(|d| Ok(ok([d, string(b"text")?])))
            }
            Received::Message(Message::Binary(b)) => {
                put_back(&slot, ws);
                string(&b).and_then(|d| Ok(ok([d, string(b"binary")?])))
            }
            Received::Message(Message::Close(code)) => {
                *slot.ws.borrow_mut() = WsState::Closed;
                this.state = closing(ws, None, code.unwrap_or(1005));
                return std::pin::Pin::new(this).poll(cx);
            }
            Received::Failed(e) => match e.close() {
                Some((code, reason)) => {
                    tracing::info!(request = %slot.id, "closing a WebSocket with {code}: {e}");
                    *slot.ws.borrow_mut() = WsState::Closed;
                    this.state = closing(ws, Some(reason), code);
                    return std::pin::Pin::new(this).poll(cx);
                }
                None => {
                    tracing::debug!(request = %slot.id, "WebSocket ended: {e}");
                    *slot.ws.borrow_mut() = WsState::Closed;
                    closed(lua, Some(1006))
                }
            },
            Received::Gone => {
                *slot.ws.borrow_mut() = WsState::Closed;
                closed(lua, Some(1006))
            }
            Received::Event(v) => {
                put_back(&slot, ws);
                let v = match v {
                    Some(v) => rustomnic_lua::convert::to_lua(lua, &v),
                    None => Ok(LuaValue::Nil),
                };
                v.and_then(|v| Ok(ok([v, string(b"event")?])))
            }
            Received::Timeout => {
                put_back(&slot, ws);
                string(b"timeout").map(|t| ok([LuaValue::Nil, t]))
            }
        };
        Poll::Ready(result)
    }
}

/// `ws.send(data, kind)`: text when `data` is UTF-8 (or kind is "text"), else binary.
pub(crate) async fn send(lua: &Lua, data: LuaValue, kind: Option<String>) -> rustomnic_lua::mlua::Result<MultiValue> {
    let what = "ws.send";
    let bytes = match &data {
        LuaValue::String(s) => s.as_bytes().to_vec(),
        LuaValue::Integer(_) | LuaValue::Number(_) => data.to_string()?.into_bytes(),
        other => return fail(lua, format!("{what}: data must be a string, got {} (use pmnc.json.encode for tables)", other.type_name())),
    };
    let utf8 = std::str::from_utf8(&bytes).is_ok();
    let text = match kind.as_deref() {
        Some("binary") => false,
        None => utf8,
        Some("text") if utf8 => true,
        Some("text") => return fail(lua, format!("{what}: a text message must be UTF-8")),
        Some(k) => return fail(lua, format!("{what}: kind must be \"text\" or \"binary\", got {k:?}")),
    };
    let (slot, mut ws) = match take(lua, what) {
        Ok(x) => x,
        Err(r) => {
            // Sending on a closed WebSocket is an error: the handler should stop.
            return match Slot::current(lua).map(|s| matches!(*s.ws.borrow(), WsState::Closed)) {
                Some(true) => fail(lua, format!("{what}: the WebSocket is closed")),
                _ => r,
            };
        }
    };
    match tokio::time::timeout(slot.write_timeout, ws.send(text, &bytes)).await {
        Ok(Ok(())) => {
            put_back(&slot, ws);
            Ok(ok([]))
        }
        Ok(Err(e)) => {
            *slot.ws.borrow_mut() = WsState::Closed;
            fail(lua, format!("{what}: the WebSocket is closed ({e})"))
        }
        Err(_) => {
            *slot.ws.borrow_mut() = WsState::Closed;
            fail(lua, format!("{what}: the client did not read for {:?} (write_timeout); the connection is dropped", slot.write_timeout))
        }
    }
}

/// `ws.close(code, reason)`: the close handshake, waiting briefly for the client's reply.
pub(crate) async fn close(lua: &Lua, code: Option<u16>, reason: Option<String>) -> rustomnic_lua::mlua::Result<MultiValue> {
    let what = "ws.close";
    let code = code.unwrap_or(1000);
    if !(code == 1000 || (1002..=1003).contains(&code) || (1007..=1014).contains(&code) || (3000..=4999).contains(&code)) {
        return fail(lua, format!("{what}: {code} is not a close code a server may send (1000, 1002-1003, 1007-1014, 3000-4999)"));
    }
    let reason = reason.unwrap_or_default();
    if reason.len() > 123 {
        return fail(lua, format!("{what}: the reason is {} bytes, the limit is 123", reason.len()));
    }
    let (slot, mut ws) = match take(lua, what) {
        Ok(x) => x,
        Err(r) => return r,
    };
    ws.close(code, &reason, CLOSE_WAIT).await;
    *slot.ws.borrow_mut() = WsState::Closed;
    Ok(ok([]))
}

/// A WebSocket its handler returned without closing: closed normally, off the request's path.
pub(crate) fn close_in_background(mut ws: Box<Ws>) {
    tokio::task::spawn_local(async move { ws.close(1000, "", CLOSE_WAIT).await });
}
