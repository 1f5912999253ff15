//! What arrives from other processes: MessagePack values, calls and replies. Properties: no
//! decode asks for far more memory than the message (docs/decisions/060); whatever decodes
//! encodes to bytes that decode and encode to the same bytes; and every decoded value, put in
//! a call and in a reply with envelope fields taken from the input, survives their round trip
//! (so the envelopes are exercised even by inputs that are not whole calls).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_cluster::wire::{decode_value, encode_value, Call, Failure, Reply};
use rustomnic_core::Value;
use rustomnic_fuzz::bounded;

fn encoded(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    encode_value(&mut out, v).unwrap_or_else(|e| panic!("a decoded value does not encode: {e}"));
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fuzz_target!(|data: &[u8]| {
    let value = bounded("decode_value", data.len(), || decode_value(data));
    if let Ok(call) = bounded("Call::decode", data.len(), || Call::decode(data)) {
        let bytes = call.encode().expect("a decoded call encodes");
        let again = Call::decode(&bytes).expect("our own call decodes");
        assert_eq!(again.encode().ok(), Some(bytes));
    }
    if let Ok(reply) = bounded("Reply::decode", data.len(), || Reply::decode(data)) {
        let bytes = reply.encode().expect("a decoded reply encodes");
        let again = Reply::decode(&bytes).expect("our own reply decodes");
        assert_eq!(again.encode().ok(), Some(bytes));
    }
    let Ok(v) = value else { return };
    // Floats: NaN != NaN, so the bytes of a second round are compared, not the values.
    let first = encoded(&v);
    let second = encoded(&decode_value(&first).expect("our own encoding decodes"));
    assert_eq!(first, second);

    let head = &data[..data.len().min(8)];
    let call = Call {
        from_cage: text(&head[..head.len().min(3)]),
        request_id: text(head),
        timeout_us: u64::from(head.first().copied().unwrap_or(0)) << 20,
        cage: "c".into(),
        module: text(&head[head.len() / 2..]),
        function: "f".into(),
        args: vec![v.clone(), Value::Nil],
    };
    let bytes = call.encode().expect("a call of decoded values encodes");
    let back = Call::decode(&bytes).unwrap_or_else(|e| panic!("our own call does not decode: {e}"));
    assert_eq!(
        (
            &back.from_cage,
            &back.request_id,
            back.timeout_us,
            &back.module
        ),
        (
            &call.from_cage,
            &call.request_id,
            call.timeout_us,
            &call.module
        )
    );
    assert_eq!(back.encode().ok(), Some(bytes));
    let ok = Reply::Ok(vec![v])
        .encode()
        .expect("a reply of a decoded value encodes");
    assert!(matches!(Reply::decode(&ok), Ok(Reply::Ok(values)) if values.len() == 1));
    let err = Reply::Err {
        failure: Failure::BadCall,
        message: text(head),
        instance: "i".into(),
    };
    assert_eq!(
        Reply::decode(&err.encode().expect("an error reply encodes")).ok(),
        Some(err)
    );
});
