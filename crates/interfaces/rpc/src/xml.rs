//! The XML-RPC service: a `<methodCall>` POSTed as text/xml runs its exposed function; its
//! value, or a fault, is the `<methodResponse>`. Faults use the JSON-RPC codes (the
//! interoperability codes of XML-RPC servers: -32700 parse error, -32601, -32602, -32603,
//! -32000 for the deadline); a Lua error table `{code = ..., message = ...}` is the fault.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use hyper::StatusCode;
use rustomnic_core::Value;
use rustomnic_http::service::{Service, ServiceRequest, ServiceResponse};
use rustomnic_resource_rpc::jsonrpc::{RpcError, INTERNAL_ERROR, PARSE_ERROR};
use rustomnic_resource_rpc::xmlrpc::{self, Fault, Limits};

use crate::run::{self, Args};
use crate::Common;

pub(crate) struct XmlInner {
    pub(crate) common: Arc<Common>,
    pub(crate) max_elements: usize,
}

pub(crate) struct XmlService(pub(crate) Arc<XmlInner>);

const XML_TYPES: &[&str] = &["text/xml", "application/xml"];

impl Service for XmlService {
    fn call(&self, req: ServiceRequest) -> LocalBoxFuture<'static, ServiceResponse> {
        let me = self.0.clone();
        Box::pin(async move {
            if let Some(refused) = me.common.refusal(&req, XML_TYPES) {
                return refused;
            }
            let ServiceRequest { body, ctx, .. } = req;
            let limits = Limits::new(body.len(), me.max_elements);
            let read = crate::off_worker(body.len(), move || xmlrpc::decode_call(&body, limits)).await;
            let (method, args) = match read.unwrap_or_else(|| Err("the body could not be read".into())) {
                Ok(c) => c,
                Err(e) => {
                    tracing::info!(cage = %me.common.cage, interface = %me.common.name, request = %ctx.id, "not an XML-RPC call: {e}");
                    return fault(&Fault { code: PARSE_ERROR, message: format!("parse error: {e}") });
                }
            };
            let id = ctx.id.clone();
            match run::call(&me.common, &method, Args::Positional(args), ctx).await {
                Ok(v) => match xmlrpc::encode_response(&v) {
                    Ok(text) => xml(text),
                    Err(e) => {
                        tracing::error!(cage = %me.common.cage, interface = %me.common.name, request = %id, "method {method} returned a value XML-RPC cannot carry: {e}");
                        fault(&Fault { code: INTERNAL_ERROR, message: format!("internal error (request id {id})") })
                    }
                },
                Err(e) => fault(&to_fault(e)),
            }
        })
    }
}

/// The fault of an error object: its data is not sent (a fault has none) but for the request id
/// of an internal error or a deadline, which goes into the message.
fn to_fault(e: RpcError) -> Fault {
    let id = match &e.data {
        Some(Value::Map(entries)) if entries.len() == 1 => {
            entries.iter().find(|(k, _)| k.as_str() == Some("request_id")).and_then(|(_, v)| v.as_str()).map(str::to_string)
        }
        _ => None,
    };
    let message = match id {
        Some(id) if e.code == INTERNAL_ERROR || e.code == rustomnic_resource_rpc::jsonrpc::DEADLINE_EXCEEDED => {
            format!("{} (request id {id})", e.message.to_lowercase())
        }
        _ => e.message,
    };
    Fault { code: e.code, message }
}

fn xml(text: String) -> ServiceResponse {
    ServiceResponse::new(StatusCode::OK, "text/xml; charset=utf-8", Bytes::from(text))
}

fn fault(f: &Fault) -> ServiceResponse {
    xml(xmlrpc::encode_fault(f))
}
