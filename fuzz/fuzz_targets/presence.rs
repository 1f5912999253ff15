//! Heartbeats and status answers from other processes of the flock. The input is a sequence
//! of length-prefixed messages, each a heartbeat or a status answer. Properties: the roster
//! never holds more than its limit nor an instance whose heartbeat it refused; each instance it
//! reports is one it heard with its latest heartbeat's state; merged answers hold each instance
//! once, an instance's own answer winning; the status table has a row per cage (at least one
//! per instance), and no control character from a peer reaches the terminal.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use rustomnic_cluster::presence::{table, Merged, Roster, MAX_INSTANCES};
use rustomnic_fuzz::Choices;
use serde_json::Value as Json;

fuzz_target!(|data: &[u8]| {
    let mut c = Choices::new(data);
    let roster = Roster::default();
    let mut heard: BTreeMap<String, bool> = BTreeMap::new();
    let mut merged = Merged::default();
    let mut answers: Vec<Json> = Vec::new();
    while !c.data.is_empty() {
        let kind = c.byte();
        let len = c.u16() as usize;
        let message = c.take(len);
        if kind & 1 == 0 {
            let accepted = roster.hear(message).is_ok();
            // Whatever a heartbeat announces as held (queues_held), asking about it never
            // panics, and this process's own instance never counts as a holder.
            assert_ne!(roster.held_elsewhere("c", "q", "id", "me").as_deref(), Some("me"));
            let parsed = serde_json::from_slice::<Json>(message).ok();
            let instance = parsed
                .as_ref()
                .and_then(|j| j.get("instance"))
                .and_then(Json::as_str)
                .map(str::to_string);
            assert!(
                !(accepted && instance.is_none()),
                "a heartbeat without an instance was kept"
            );
            if let (true, Some(id)) = (accepted, instance) {
                let leaving = parsed
                    .as_ref()
                    .and_then(|j| j.get("state"))
                    .and_then(Json::as_str)
                    == Some("leaving");
                heard.insert(id, leaving);
            }
        } else {
            merged.add(message);
            if let Ok(j) = serde_json::from_slice::<Json>(message) {
                answers.push(j);
            }
        }
    }
    assert!(roster.len() <= MAX_INSTANCES);
    let snapshot = roster.snapshot();
    assert_eq!(
        snapshot.len(),
        heard.len(),
        "the roster holds exactly the instances it accepted"
    );
    for entry in &snapshot {
        let id = entry
            .get("instance")
            .and_then(Json::as_str)
            .expect("every roster entry names its instance");
        let leaving = *heard
            .get(id)
            .unwrap_or_else(|| panic!("{id} is in the roster but was never accepted"));
        // "down (left)" when the last beat said it was leaving; otherwise "up", or "down
        // (silent)" if this process was descheduled past three heartbeat intervals.
        let state = entry.get("state").and_then(Json::as_str);
        let reason = entry.get("down_reason").and_then(Json::as_str);
        match (leaving, state, reason) {
            (true, Some("down"), Some("left"))
            | (false, Some("up"), None)
            | (false, Some("down"), Some("silent")) => {}
            other => panic!("{id}: leaving {leaving}, shown as {other:?}"),
        }
    }
    let instances = merged.instances();
    let mut seen = std::collections::BTreeSet::new();
    for inst in &instances {
        let id = inst
            .get("instance")
            .and_then(Json::as_str)
            .expect("merged entries name their instance");
        assert!(seen.insert(id.to_string()), "{id} merged twice");
        // An instance's own answer wins over what others said about it.
        let own: Vec<&Json> = answers
            .iter()
            .filter(|a| a.get("from").and_then(Json::as_str) == Some(id))
            .flat_map(|a| {
                a.get("instances")
                    .and_then(Json::as_array)
                    .into_iter()
                    .flatten()
            })
            .filter(|i| i.get("instance").and_then(Json::as_str) == Some(id))
            .collect();
        if !own.is_empty() {
            assert!(own.contains(&inst), "{id}: its own answer did not win");
        }
    }
    let shown = table(&instances);
    let rows = shown.lines().count();
    let cages: usize = instances
        .iter()
        .map(|i| {
            i.get("cages")
                .and_then(Json::as_array)
                .map(|a| {
                    a.iter()
                        .filter(|c| c.get("name").and_then(Json::as_str).is_some())
                        .count()
                })
                .unwrap_or(0)
                .max(1)
        })
        .sum();
    assert_eq!(rows, 1 + cages, "{shown}");
    assert!(
        !shown.chars().any(|ch| ch.is_control() && ch != '\n'),
        "a control character reaches the terminal: {shown:?}"
    );
});
