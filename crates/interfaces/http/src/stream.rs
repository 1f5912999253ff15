//! Responses that outlive the handler's first answer: the per-request slot through which
//! `response.stream` and `request.upgrade` hand the response head to hyper while the handler's
//! coroutine goes on, the response body type, and server-sent event framing.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::Response;
use rustomnic_lua::mlua::{Lua, MultiValue, Table, Value as LuaValue};
use tokio::sync::mpsc;

use crate::upgrade::WsState;

/// Chunks a stream may have queued for a client that is slow to read before `send` waits.
const STREAM_QUEUE: usize = 16;

/// The body of every response: all at once, or chunks from a streaming handler.
pub(crate) enum Body {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl Body {
    pub(crate) fn full(b: impl Into<Bytes>) -> Body {
        Body::Full(Some(b.into()))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(b) => Poll::Ready(b.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b)))),
            Body::Stream(rx) => rx.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            Body::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(b) => SizeHint::with_exact(b.as_ref().map(|b| b.len() as u64).unwrap_or(0)),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

/// What a request's handler may do besides returning: start a stream or upgrade. Found by the
/// Lua functions through the request id (the current request of the VM).
pub(crate) struct Slot {
    /// The response head, once the handler sent one early; taken by [`Replied`].
    reply: RefCell<Option<Box<Response<Body>>>>,
    waker: RefCell<Option<Waker>>,
    /// The sending side of a streamed body; dropped when the handler ends, which ends the body.
    pub(crate) sender: RefCell<Option<mpsc::Sender<Bytes>>>,
    /// For upgrade requests: the connection, handed over once the 101 is sent, and the client's key.
    pub(crate) upgrade: RefCell<Option<Box<crate::handler::Upgrade>>>,
    pub(crate) ws: RefCell<WsState>,
    /// The topic a WebSocket session receives events of (see `ws.receive`).
    pub(crate) subscription: RefCell<Option<Box<rustomnic_lua::events::Subscription>>>,
    pub(crate) sse: Cell<bool>,
    /// The fields and files of a multipart body; the files go when the request ends.
    pub(crate) uploads: RefCell<Option<Box<crate::multipart::Uploads>>>,
    pub(crate) write_timeout: Duration,
    pub(crate) max_message_size: usize,
    pub(crate) id: Rc<str>,
}

thread_local! {
    /// Keyed by request id: ids are made by this process, never by a client, so the map needs no
    /// seeded hash (SipHash was a tenth of the cost of a plain request's bookkeeping here).
    static SLOTS: RefCell<HashMap<Rc<str>, Rc<Slot>, rustomnic_core::fnv::FnvBuild>> = RefCell::new(HashMap::default());
}

impl Slot {
    pub(crate) fn register(id: &str, upgrade: Option<crate::handler::Upgrade>, write_timeout: Duration, max_message_size: usize) -> SlotGuard {
        let slot = Rc::new(Slot {
            reply: RefCell::new(None),
            waker: RefCell::new(None),
            sender: RefCell::new(None),
            upgrade: RefCell::new(upgrade.map(Box::new)),
            ws: RefCell::new(WsState::None),
            subscription: RefCell::new(None),
            sse: Cell::new(false),
            uploads: RefCell::new(None),
            write_timeout,
            max_message_size,
            id: id.into(),
        });
        SLOTS.with(|s| s.borrow_mut().insert(slot.id.clone(), slot.clone()));
        SlotGuard(slot)
    }

    /// The slot of the request running in `lua` now.
    pub(crate) fn current(lua: &Lua) -> Option<Rc<Slot>> {
        let ctx = rustomnic_lua::current_request(lua)?;
        SLOTS.with(|s| s.borrow().get(ctx.id.as_str()).cloned())
    }

    /// Hands the response head to the connection; the handler goes on.
    pub(crate) fn reply(&self, response: Response<Body>) {
        *self.reply.borrow_mut() = Some(Box::new(response));
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    pub(crate) fn replied(&self) -> bool {
        self.reply.borrow().is_some()
    }

    pub(crate) fn take_reply(&self) -> Option<Response<Body>> {
        self.reply.borrow_mut().take().map(|r| *r)
    }

    /// The response head once the handler sent one early; until then the task is woken when
    /// it does.
    pub(crate) fn poll_reply(&self, cx: &mut Context<'_>) -> Poll<Response<Body>> {
        if let Some(r) = self.take_reply() {
            return Poll::Ready(r);
        }
        let mut w = self.waker.borrow_mut();
        if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *w = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// Unregisters the slot when the request is over, ends a streamed body and closes a WebSocket
/// the handler left open.
pub(crate) struct SlotGuard(pub(crate) Rc<Slot>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        SLOTS.with(|s| s.borrow_mut().remove(&self.0.id));
        self.0.sender.borrow_mut().take();
        self.0.subscription.borrow_mut().take();
        let ws = std::mem::replace(&mut *self.0.ws.borrow_mut(), WsState::Closed);
        if let WsState::Open(ws) = ws {
            crate::upgrade::close_in_background(ws);
        }
    }
}

fn fail(lua: &Lua, message: impl AsRef<str>) -> rustomnic_lua::mlua::Result<MultiValue> {
    Ok(MultiValue::from_iter([LuaValue::Boolean(false), LuaValue::String(lua.create_string(message.as_ref())?)]))
}

pub(crate) fn ok(values: impl IntoIterator<Item = LuaValue>) -> MultiValue {
    let mut mv = MultiValue::new();
    mv.push_back(LuaValue::Boolean(true));
    mv.extend(values);
    mv
}

/// `response.stream(content_type)`: sends the head now (status and headers as the handler set
/// them on `response`) and returns; the body is what the handler sends until it returns.
pub(crate) fn start(lua: &Lua, response: Table, content_type: Option<String>) -> rustomnic_lua::mlua::Result<MultiValue> {
    let what = "response.stream";
    let Some(slot) = Slot::current(lua) else { return fail(lua, format!("{what} may only be called by the HTTP handler of the request")) };
    if slot.replied() || slot.sender.borrow().is_some() || !matches!(*slot.ws.borrow(), WsState::None) {
        return fail(lua, format!("{what}: the response was already started"));
    }
    let content_type = content_type.unwrap_or_else(|| "text/event-stream".to_string());
    let Ok(ct) = HeaderValue::from_str(&content_type) else { return fail(lua, format!("{what}: {content_type:?} is not a valid content type")) };
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    let mut r = match crate::handler::response_head(&response, Body::Stream(rx), &slot.id) {
        Ok(r) => r,
        Err(e) => return fail(lua, format!("{what}: {e}")),
    };
    let sse = content_type.starts_with("text/event-stream");
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, ct);
    if !h.contains_key(CACHE_CONTROL) {
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    if sse {
        // Proxies such as nginx would otherwise hold events back in their buffers.
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    }
    h.remove(hyper::header::CONTENT_LENGTH);
    slot.sse.set(sse);
    *slot.sender.borrow_mut() = Some(tx);
    slot.reply(r);
    Ok(ok([]))
}

/// Sends one chunk of a started stream; fails once the client has gone.
pub(crate) async fn send(lua: &Lua, what: &str, data: Bytes) -> rustomnic_lua::mlua::Result<MultiValue> {
    let Some(slot) = Slot::current(lua) else { return fail(lua, format!("{what} may only be called by the HTTP handler of the request")) };
    let Some(tx) = slot.sender.borrow().clone() else { return fail(lua, format!("{what}: no stream was started (call response.stream first)")) };
    match tokio::time::timeout(slot.write_timeout, tx.send(data)).await {
        Ok(Ok(())) => Ok(ok([])),
        Ok(Err(_)) => {
            slot.sender.borrow_mut().take();
            fail(lua, format!("{what}: the client disconnected (request {})", slot.id))
        }
        Err(_) => {
            slot.sender.borrow_mut().take();
            fail(lua, format!("{what}: the client did not read for {:?} (write_timeout); the stream is closed", slot.write_timeout))
        }
    }
}

/// The text/event-stream framing of one event table: `id`, `event`, `retry`, `comment` and
/// `data` (a string, split into one `data:` line per line, or a table sent as JSON).
pub(crate) fn sse_frame(event: &Table) -> Result<Bytes, String> {
    let mut out = Vec::with_capacity(64);
    let field = |name: &str| -> Result<Option<String>, String> {
        match event.raw_get::<LuaValue>(name).map_err(|e| e.to_string())? {
            LuaValue::Nil => Ok(None),
            LuaValue::String(s) => Ok(Some(s.to_str().map_err(|_| format!("event.{name} is not UTF-8 text"))?.to_string())),
            v @ (LuaValue::Integer(_) | LuaValue::Number(_)) => Ok(Some(v.to_string().map_err(|e| e.to_string())?)),
            other => Err(format!("event.{name} must be a string, got {}", other.type_name())),
        }
    };
    if let Some(c) = field("comment")? {
        for line in c.split('\n') {
            out.extend_from_slice(b": ");
            out.extend_from_slice(line.trim_end_matches('\r').as_bytes());
            out.push(b'\n');
        }
    }
    for name in ["id", "event"] {
        if let Some(v) = field(name)? {
            if v.contains(['\n', '\r']) || (name == "id" && v.contains('\0')) {
                return Err(format!("event.{name} must be one line"));
            }
            out.extend_from_slice(format!("{name}: {v}\n").as_bytes());
        }
    }
    if let Some(r) = field("retry")? {
        if r.parse::<u64>().is_err() {
            return Err(format!("event.retry must be a whole number of milliseconds, got {r:?}"));
        }
        out.extend_from_slice(format!("retry: {r}\n").as_bytes());
    }
    let data = match event.raw_get::<LuaValue>("data").map_err(|e| e.to_string())? {
        LuaValue::Nil => None,
        LuaValue::String(s) => Some(s.to_str().map_err(|_| "event.data is not UTF-8 text".to_string())?.to_string()),
        v @ (LuaValue::Integer(_) | LuaValue::Number(_) | LuaValue::Boolean(_)) => Some(v.to_string().map_err(|e| e.to_string())?),
        v @ LuaValue::Table(_) => {
            let value = rustomnic_lua::convert::from_lua(&v).map_err(|e| format!("event.data {e}"))?;
            Some(value.to_json_text().map_err(|e| format!("event.data cannot be sent as JSON: {e}"))?)
        }
        other => return Err(format!("event.data must be a string or a table, got {}", other.type_name())),
    };
    if let Some(d) = data {
        for line in d.split('\n') {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(line.trim_end_matches('\r').as_bytes());
            out.push(b'\n');
        }
    }
    if out.is_empty() {
        return Err("an event needs at least one of data, event, id, retry or comment".into());
    }
    out.push(b'\n');
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use rustomnic_lua::mlua::{Lua, Table};

    #[test]
    fn event_framing() {
        let lua = Lua::new();
        let e: Table = lua.load(r#"return { id = 7, event = "msg", data = "a\nb" }"#).eval().unwrap();
        assert_eq!(&super::sse_frame(&e).unwrap()[..], b"id: 7\nevent: msg\ndata: a\ndata: b\n\n");
        let e: Table = lua.load(r#"return { data = { x = 1 }, retry = 500, comment = "hi" }"#).eval().unwrap();
        assert_eq!(&super::sse_frame(&e).unwrap()[..], b": hi\nretry: 500\ndata: {\"x\":1}\n\n");
        let e: Table = lua.load(r#"return { event = "a\nb", data = "x" }"#).eval().unwrap();
        assert!(super::sse_frame(&e).unwrap_err().contains("one line"));
        let e: Table = lua.load(r#"return {}"#).eval().unwrap();
        assert!(super::sse_frame(&e).is_err());
    }
}
