//! A workflow's bytes from outside a process (crates/queue/src/workflow.rs, holder.rs): parts
//! of joins as they arrive on a holder's subject `pmnc.<flock>.join.<cage>.<holder>` (anything
//! that can publish on the flock's subjects could have sent them), continuations as the state
//! file's `cont` column or a clustered queue's stream message keeps them, the steps those
//! carry, and a chord's body as its join keeps it (a damaged or older state file). Properties:
//! the runtime's reading never asks for far more memory than the input; what reads writes back
//! as the runtime writes it and reads again as the same; a refusal is a reason naming what was
//! wrong (a field the format has, or the part that could not be read), one short line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_fuzz::bounded;
use rustomnic_queue::workflow::fuzzing::{body_trips, cont_trips, part_trips, read_chord_body, read_cont, read_part_message, Trip};

/// The fields the readers know, by format: a refusal about a field names one of these.
const FIELDS: &[&str] = &[
    "v queue id module function args created_ms due_ms expires_ms max_attempts trace cont", // a forwarded call
    "join index member status value error",                                                 // a part
    "wf origin next on_error alias join.index cage holder",                                 // a continuation, its join
    "from fn expires_in expires_at delay at",                                               // a step
    "body",                                                                                 // a chord's body
];

/// What a refusal that names no field says it could not read.
const WHOLES: &[&str] = &[
    "stored value",
    "a forwarded call is one map",
    "of forwarded calls is not known",
    "a part of a join",
    "a continuation is a map",
    "workflow ids are",
    "a workflow step is a map",
    "a chord's body is a map",
];

fn check(trips: Vec<Trip>, len: usize) {
    for trip in trips {
        match trip {
            Trip::Same { .. } => {}
            Trip::Broken { what, how } => panic!("a {what} read but did not write back as itself: {how}"),
            Trip::Refused { what, why } => {
                assert!(!why.is_empty(), "a {what} was refused without a reason");
                assert!(!why.chars().any(char::is_control), "a {what}'s refusal is not one clean line: {why:?}");
                // The reason may quote a little of the peer's text (escaped, in quotes), never
                // all of it.
                assert!(why.len() <= 512, "a {what}'s refusal of {len} bytes is {} bytes long: {why:?}", why.len());
                let ours = why.split('"').next().unwrap_or_default();
                match ours.split("field ").nth(1) {
                    Some(rest) => {
                        let name = rest.split(' ').next().unwrap_or_default();
                        assert!(FIELDS.iter().flat_map(|f| f.split(' ')).any(|f| f == name), "a {what}'s refusal names an unknown field {name:?}: {why}");
                    }
                    None => assert!(WHOLES.iter().any(|w| ours.contains(w)), "a {what}'s refusal names neither a field nor what could not be read: {why}"),
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The budget holds the runtime's reading; the round trips' own copies are not counted.
    let part = bounded("part of a join", data.len(), || read_part_message(data));
    check(part_trips(data, part), data.len());
    let cont = bounded("continuation", data.len(), || read_cont(data));
    check(cont_trips(cont), data.len());
    let body = bounded("chord body", data.len(), || read_chord_body(data));
    check(body_trips(body), data.len());
});
