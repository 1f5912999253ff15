//! XML-RPC method calls (what the xmlrpc interface reads) and method responses (what the
//! xmlrpc resource reads). Properties: bounded allocation; a DTD is always refused; a call or a
//! response that reads, written back, reads back the same (but for the documented one-member
//! typed tables and nil struct members); a fault has a code and a message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_fuzz::bounded;
use rustomnic_resource_rpc::xmlrpc::{decode_call, decode_response, round_trip, Limits};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::new(1 << 20, 10_000);
    let call = bounded("xmlrpc call", data.len(), || decode_call(data, limits));
    let reply = bounded("xmlrpc response", data.len(), || decode_response(data, limits));
    if has_doctype(data) {
        assert!(call.is_err() && reply.is_err(), "a DTD was read");
    }
    if let Err(e) = round_trip(data) {
        panic!("{e}");
    }
});

/// Whether an XML tokenizer meets a DTD in `data`. Not a search for the bytes `<!DOCTYPE`: inside a
/// processing instruction, a comment or CDATA they are text, which the reader rightly skips or
/// keeps as text (a first campaign stopped on `<?x<!DOCTYPE...?>`).
fn has_doctype(data: &[u8]) -> bool {
    let mut reader = quick_xml::Reader::from_reader(data);
    let mut buf = Vec::new();
    loop {
        match reader.read_event_into(&mut buf) {
            Ok(quick_xml::events::Event::DocType(_)) => return true,
            Ok(quick_xml::events::Event::Eof) | Err(_) => return false,
            Ok(_) => buf.clear(),
        }
    }
}
