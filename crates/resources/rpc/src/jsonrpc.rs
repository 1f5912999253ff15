//! JSON-RPC 2.0 envelopes (https://www.jsonrpc.org/specification): requests and batches as a
//! server reads them, responses as it writes them, and the client's side of one call. Values are
//! the value model's ([`Value`]); the JSON text is read with its depth limit.

use rustomnic_core::Value;

/// Parse error: the body is not JSON.
pub const PARSE_ERROR: i64 = -32700;
/// Not a request object (or an empty or oversized batch).
pub const INVALID_REQUEST: i64 = -32600;
/// The method is not exposed.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// The params are neither an array nor an object, or the function refused them.
pub const INVALID_PARAMS: i64 = -32602;
/// The function failed with an error that is not an error object.
pub const INTERNAL_ERROR: i64 = -32603;
/// The request's deadline (request_timeout) passed before the function returned.
pub const DEADLINE_EXCEEDED: i64 = -32000;

/// An error object: `{code, message, data}`.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError { code, message: message.into(), data: None }
    }

    pub fn with_data(mut self, data: Value) -> RpcError {
        self.data = Some(data);
        self
    }
}

/// A call's params: none, by position, or by name (an object, kept as a map).
#[derive(Debug, Clone, PartialEq)]
pub enum Params {
    None,
    Positional(Vec<Value>),
    Named(Vec<(Value, Value)>),
}

/// One request of an envelope: its id (`None`: a notification, which gets no response), method
/// and params.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub id: Option<Value>,
    pub method: String,
    pub params: Params,
}

/// A request that cannot be run: the id to answer with (null when it could not be read), and
/// the error; `notification`: it had no id, so it gets no response.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub id: Value,
    pub error: RpcError,
    pub notification: bool,
}

/// What a body holds: one request, or a batch of them in their order.
#[derive(Debug, Clone, PartialEq)]
pub enum Envelope {
    Single(Result<Call, Refused>),
    Batch(Vec<Result<Call, Refused>>),
}

/// Reads a request body. Err: the one error response the whole body gets (not JSON, not a
/// request or batch, an empty batch, a batch of more than `max_batch` requests).
pub fn decode_request(body: &[u8], max_batch: usize) -> Result<Envelope, RpcError> {
    let value = Value::parse_json(body).map_err(|e| RpcError::new(PARSE_ERROR, format!("Parse error: {e}")))?;
    match value {
        Value::Array(items) if items.is_empty() => Err(RpcError::new(INVALID_REQUEST, "Invalid Request: an empty batch")),
        Value::Array(items) if items.len() > max_batch => {
            Err(RpcError::new(INVALID_REQUEST, format!("Invalid Request: a batch of {} requests, over the limit of {max_batch}", items.len())))
        }
        Value::Array(items) => Ok(Envelope::Batch(items.into_iter().map(request).collect())),
        Value::Map(_) => Ok(Envelope::Single(request(value))),
        other => Err(RpcError::new(INVALID_REQUEST, format!("Invalid Request: a {} is not a request object", json_type(&other)))),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Nil => "null",
        Value::Bool(_) => "boolean",
        Value::Int(_) | Value::Float(_) => "number",
        Value::Str(_) => "string",
        Value::Array(_) => "array",
        Value::Map(_) => "object",
    }
}

/// One request object of an envelope.
fn request(value: Value) -> Result<Call, Refused> {
    let Value::Map(entries) = value else {
        let what = json_type(&value);
        return Err(Refused {
            id: Value::Nil,
            error: RpcError::new(INVALID_REQUEST, format!("Invalid Request: a {what} is not a request object")),
            notification: false,
        });
    };
    let (mut version, mut method, mut params, mut id) = (None, None, None, None);
    for (k, v) in entries {
        match k.as_str() {
            Some("jsonrpc") => version = Some(v),
            Some("method") => method = Some(v),
            Some("params") => params = Some(v),
            Some("id") => id = Some(v),
            _ => {}
        }
    }
    let (id, id_error) = match id {
        None => (None, None),
        Some(v @ (Value::Nil | Value::Int(_) | Value::Float(_) | Value::Str(_))) => (Some(v), None),
        Some(other) => (Some(Value::Nil), Some(format!("Invalid Request: the id is a {}, not a string, number or null", json_type(&other)))),
    };
    // Only a request that is valid but for its params is a notification: any other invalid
    // request without an id still gets an error (with a null id), as the specification's
    // examples answer `{"foo": "boo"}`.
    let refuse = |code: i64, message: String| Refused {
        id: id.clone().unwrap_or(Value::Nil),
        error: RpcError::new(code, message),
        notification: id.is_none() && code == INVALID_PARAMS,
    };
    if let Some(m) = id_error {
        return Err(refuse(INVALID_REQUEST, m));
    }
    if !matches!(&version, Some(Value::Str(v)) if v == b"2.0") {
        return Err(refuse(INVALID_REQUEST, "Invalid Request: \"jsonrpc\" must be \"2.0\"".into()));
    }
    let method = match method {
        Some(Value::Str(m)) => String::from_utf8(m).map_err(|_| refuse(INVALID_REQUEST, "Invalid Request: the method is not UTF-8".into()))?,
        Some(other) => return Err(refuse(INVALID_REQUEST, format!("Invalid Request: the method is a {}, not a string", json_type(&other)))),
        None => return Err(refuse(INVALID_REQUEST, "Invalid Request: no method".into())),
    };
    let params = match params {
        None => Params::None,
        Some(Value::Array(items)) => Params::Positional(items),
        Some(Value::Map(entries)) => Params::Named(entries),
        Some(other) => return Err(refuse(INVALID_PARAMS, format!("Invalid params: params is a {}, not an array or object", json_type(&other)))),
    };
    Ok(Call { id, method, params })
}

/// The response object of a call: `result` or `error`. A result that cannot be written as JSON
/// (a string that is not UTF-8, NaN) becomes an internal error.
pub fn response(id: &Value, outcome: Result<&Value, &RpcError>) -> serde_json::Value {
    let id_json = id.to_json().unwrap_or(serde_json::Value::Null);
    let mut m = serde_json::Map::with_capacity(3);
    m.insert("jsonrpc".into(), serde_json::Value::String("2.0".into()));
    match outcome.map(|v| v.to_json()) {
        Ok(Ok(result)) => {
            m.insert("result".into(), result);
        }
        Ok(Err(e)) => {
            m.insert("error".into(), error_object(&RpcError::new(INTERNAL_ERROR, format!("Internal error: the result cannot be written as JSON: {e}"))));
        }
        Err(error) => {
            m.insert("error".into(), error_object(error));
        }
    }
    m.insert("id".into(), id_json);
    serde_json::Value::Object(m)
}

/// `{code, message, data}`; data that cannot be written as JSON is left out.
pub fn error_object(e: &RpcError) -> serde_json::Value {
    let mut m = serde_json::Map::with_capacity(3);
    m.insert("code".into(), serde_json::Value::from(e.code));
    m.insert("message".into(), serde_json::Value::String(e.message.clone()));
    if let Some(data) = e.data.as_ref().and_then(|d| d.to_json().ok()) {
        m.insert("data".into(), data);
    }
    serde_json::Value::Object(m)
}

/// A request object as a client writes it (also the fuzz target's way back to text).
pub fn encode_call(call: &Call) -> Result<serde_json::Value, String> {
    let mut m = serde_json::Map::with_capacity(4);
    m.insert("jsonrpc".into(), serde_json::Value::String("2.0".into()));
    m.insert("method".into(), serde_json::Value::String(call.method.clone()));
    match &call.params {
        Params::None => {}
        Params::Positional(items) => {
            m.insert("params".into(), Value::Array(items.clone()).to_json()?);
        }
        Params::Named(entries) => {
            m.insert("params".into(), Value::Map(entries.clone()).to_json()?);
        }
    }
    if let Some(id) = &call.id {
        m.insert("id".into(), id.to_json()?);
    }
    Ok(serde_json::Value::Object(m))
}

/// The client's reading of the response to its call `id`: the result, or the error object the
/// server sent. Err: the body is not a response to that call.
pub fn decode_reply(body: &[u8], id: i64) -> Result<Result<Value, RpcError>, String> {
    let value = Value::parse_json(body).map_err(|e| format!("the response is not JSON: {e}"))?;
    let Value::Map(entries) = value else {
        return Err(format!("the response is a JSON {}, not a response object", json_type(&value)));
    };
    let (mut version, mut result, mut error, mut got_id) = (None, None, None, None);
    for (k, v) in entries {
        match k.as_str() {
            Some("jsonrpc") => version = Some(v),
            Some("result") => result = Some(v),
            Some("error") => error = Some(v),
            Some("id") => got_id = Some(v),
            _ => {}
        }
    }
    if !matches!(&version, Some(Value::Str(v)) if v == b"2.0") {
        return Err("the response has no \"jsonrpc\": \"2.0\"".into());
    }
    match (result, error) {
        (Some(r), None) => {
            if got_id != Some(Value::Int(id)) {
                return Err(format!("the response's id is not {id}, the id of the call"));
            }
            Ok(Ok(r))
        }
        (None, Some(Value::Map(fields))) => {
            // An error about the request itself may come with a null id.
            if !matches!(got_id, Some(Value::Int(n)) if n == id) && !matches!(got_id, Some(Value::Nil)) {
                return Err(format!("the error response's id is not {id}, the id of the call"));
            }
            let mut e = RpcError::new(0, "");
            let mut code = None;
            for (k, v) in fields {
                match (k.as_str(), v) {
                    (Some("code"), Value::Int(c)) => code = Some(c),
                    (Some("message"), Value::Str(m)) => e.message = String::from_utf8_lossy(&m).into_owned(),
                    (Some("data"), d) => e.data = Some(d),
                    _ => {}
                }
            }
            e.code = code.ok_or("the error object has no integer code")?;
            Ok(Err(e))
        }
        (None, Some(other)) => Err(format!("the error member is a {}, not an error object", json_type(&other))),
        (Some(_), Some(_)) => Err("the response has both result and error".into()),
        (None, None) => Err("the response has neither result nor error".into()),
    }
}

/// For the fuzz target: every request a body holds, written back as JSON text, reads back as
/// the same request; Err names the first that does not.
pub fn round_trip(body: &[u8]) -> Result<(), String> {
    let Ok(envelope) = decode_request(body, 1000) else { return Ok(()) };
    let calls = match envelope {
        Envelope::Single(c) => vec![c],
        Envelope::Batch(cs) => cs,
    };
    for call in calls.into_iter().flatten() {
        let Ok(json) = encode_call(&call) else { continue };
        let text = json.to_string();
        match decode_request(text.as_bytes(), 1) {
            Ok(Envelope::Single(Ok(again))) if normalized(again.clone()) == normalized(call.clone()) => {}
            other => return Err(format!("{text} read back as {other:?}, not {call:?}")),
        }
    }
    Ok(())
}

/// Map entries sorted by key (JSON objects are read with sorted keys).
fn normalized(mut call: Call) -> Call {
    if let Params::Named(entries) = &mut call.params {
        entries.sort_by(|a, b| format!("{:?}", a.0).cmp(&format!("{:?}", b.0)));
    }
    call
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn requests_batches_and_errors() {
        let Envelope::Single(Ok(c)) = decode_request(br#"{"jsonrpc":"2.0","method":"a.b","params":[1,"x"],"id":7}"#, 10).unwrap() else { panic!() };
        assert_eq!(c, Call { id: Some(Value::Int(7)), method: "a.b".into(), params: Params::Positional(vec![Value::Int(1), Value::str("x")]) });
        let Envelope::Single(Ok(n)) = decode_request(br#"{"jsonrpc":"2.0","method":"m","params":{"k":1}}"#, 10).unwrap() else { panic!() };
        assert_eq!(n.id, None);
        assert_eq!(decode_request(b"{", 10).unwrap_err().code, PARSE_ERROR);
        assert_eq!(decode_request(b"[]", 10).unwrap_err().code, INVALID_REQUEST);
        assert_eq!(decode_request(b"[1,2,3]", 2).unwrap_err().code, INVALID_REQUEST);
        assert_eq!(decode_request(b"5", 2).unwrap_err().code, INVALID_REQUEST);
        let Envelope::Batch(b) =
            decode_request(br#"[1, {"jsonrpc":"2.0","method":"m","params":3,"id":"a"}, {"jsonrpc":"1.0","method":"m","id":2}]"#, 10).unwrap()
        else {
            panic!()
        };
        assert_eq!(b[0].as_ref().unwrap_err().error.code, INVALID_REQUEST);
        let r = b[1].as_ref().unwrap_err();
        assert_eq!((r.error.code, &r.id), (INVALID_PARAMS, &Value::str("a")));
        assert_eq!(b[2].as_ref().unwrap_err().id, Value::Int(2));
        let r = response(&Value::Int(1), Ok(&Value::Str(vec![0xff])));
        assert_eq!(r["error"]["code"], INTERNAL_ERROR);
    }

    #[test]
    fn client_replies() {
        assert_eq!(decode_reply(br#"{"jsonrpc":"2.0","result":[1],"id":3}"#, 3).unwrap(), Ok(Value::Array(vec![Value::Int(1)])));
        let e = decode_reply(br#"{"jsonrpc":"2.0","error":{"code":-32601,"message":"nope","data":{"x":1}},"id":3}"#, 3).unwrap().unwrap_err();
        assert_eq!((e.code, e.message.as_str()), (-32601, "nope"));
        assert!(decode_reply(br#"{"jsonrpc":"2.0","result":1,"id":4}"#, 3).is_err());
        assert!(decode_reply(b"<html>", 3).is_err());
        assert_eq!(round_trip(br#"[{"jsonrpc":"2.0","method":"m","params":{"b":1,"a":[null,2.5]},"id":null}]"#), Ok(()));
    }
}
