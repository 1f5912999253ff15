//! SMPP 3.4 PDUs as an SMSC sends them, through the smpp resource's and interface's decoder
//! and the interface's reading of a deliver_sm or data_sm (text codings, UDH, receipt text).
//! Properties: bounded allocation; a PDU that decodes encodes back to exactly its bytes and
//! decodes again to itself; a malformed body skips exactly its command_length (the stream
//! stays in step) and a bad command_length stops it; what a handler would get never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_fuzz::bounded;
use rustomnic_resource_smpp::pdu::{self, decode, Pdu};

/// Every PDU of `input` in order, and where reading stopped.
fn read_all(input: &[u8]) -> (Vec<(Pdu, std::ops::Range<usize>)>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while at < input.len() {
        match decode(&input[at..]) {
            Ok(Some((p, n))) => {
                out.push((p, at..at + n));
                at += n;
            }
            Ok(None) => break,
            Err(e) if e.fatal => break,
            Err(e) => {
                // The length was good: the reader skips the PDU and answers generic_nack.
                let n = pdu::peek_length(&input[at..]).ok().flatten().expect("a body error has a good length");
                assert!(e.sequence.is_some() && !e.message.is_empty());
                at += n;
            }
        }
    }
    (out, at)
}

fuzz_target!(|data: &[u8]| {
    let (pdus, _) = bounded("smpp_pdu", data.len(), || read_all(data));
    for (p, range) in pdus {
        let bytes = p.encode().unwrap_or_else(|e| panic!("{p:?} decoded but does not encode: {e}"));
        assert_eq!(bytes, &data[range], "re-encoded bytes differ");
        let (again, n) = decode(&bytes).expect("decodes again").expect("whole");
        assert_eq!(n, bytes.len());
        assert_eq!(again, p);
        if matches!(p.command_id, pdu::DELIVER_SM | pdu::DATA_SM | pdu::SUBMIT_SM) {
            let _ = rustomnic_smpp::message(&p);
        }
    }
});
