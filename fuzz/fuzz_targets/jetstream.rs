//! JetStream's answers to a claim (a schedule firing that one process of the flock may run).
//! The property is the decision itself, restated: a claim is won only on an acknowledgement
//! from the flock's claims stream with a positive sequence and no error; it is lost only on
//! error 10071; every other answer is an error naming the key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_cluster::claims::{claim_reply, stream};
use serde_json::Value as Json;

fuzz_target!(|data: &[u8]| {
    let flock = "f";
    let outcome = claim_reply(flock, "sched.k", data);
    let json = serde_json::from_slice::<Json>(data).ok();
    let error = json.as_ref().and_then(|j| j.get("error"));
    let acked = json.as_ref().is_some_and(|j| {
        j.get("stream").and_then(Json::as_str) == Some(stream(flock).as_str())
            && j.get("seq").and_then(Json::as_u64).is_some_and(|n| n > 0)
    });
    let code = error.and_then(|e| e.get("err_code")).and_then(Json::as_u64);
    match outcome {
        Ok(true) => assert!(error.is_none() && acked, "won on {json:?}"),
        Ok(false) => assert_eq!(code, Some(10071), "lost on {json:?}"),
        Err(e) => {
            assert!(e.contains("sched.k"), "{e}");
            assert!(
                !(error.is_none() && acked) && code != Some(10071),
                "{e} on {json:?}"
            );
        }
    }
});
