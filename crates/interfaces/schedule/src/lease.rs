//! The claim of one firing: a row per schedule in `queue_leases` of the cage's SQLite file
//! holding the time of the last firing run; a copy runs a firing only when it moves that time
//! forward, under SQLite's write lock (BEGIN IMMEDIATE), so copies sharing the file run each
//! firing once.

use std::path::Path;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use rustomnic_resource_state::store::sql_error;

/// When the last firing of `name` ran, if ever.
pub fn last_fired(conn: &Connection, path: &Path, name: &str) -> Result<Option<DateTime<Utc>>, String> {
    conn.query_row("SELECT last_fired_ms FROM queue_leases WHERE name = ?1", [name], |r| r.get::<_, i64>(0))
        .optional()
        .map(|o| o.map(crate::utc_ms))
        .map_err(|e| sql_error(path, "schedule: cannot read its lease", e).message)
}

/// Claims the firing at `at`; false when a copy already ran it (or a later one).
pub fn claim(conn: &mut Connection, path: &Path, name: &str, holder: &str, at: DateTime<Utc>) -> Result<bool, String> {
    let fail = |e| sql_error(path, "schedule: cannot claim a firing", e).message;
    let at = at.timestamp_millis();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(fail)?;
    let last: Option<i64> = tx.query_row("SELECT last_fired_ms FROM queue_leases WHERE name = ?1", [name], |r| r.get(0)).optional().map_err(fail)?;
    if last.is_some_and(|l| l >= at) {
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO queue_leases (name, holder, until_ms, last_fired_ms) VALUES (?1, ?2, ?3, ?3)
         ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms, last_fired_ms = excluded.last_fired_ms",
        params![name, holder, at],
    )
    .map_err(fail)?;
    tx.commit().map_err(fail)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_firing_is_claimed_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let mut a = rustomnic_resource_state::store::open(&path, std::time::Duration::from_secs(5)).unwrap();
        let mut b = rustomnic_resource_state::store::open(&path, std::time::Duration::from_secs(5)).unwrap();
        let t = crate::utc_ms(1_000_000);
        assert!(claim(&mut a, &path, "schedule:x", "a", t).unwrap());
        assert!(!claim(&mut b, &path, "schedule:x", "b", t).unwrap());
        assert!(claim(&mut b, &path, "schedule:x", "b", crate::utc_ms(2_000_000)).unwrap());
        assert_eq!(last_fired(&a, &path, "schedule:x").unwrap(), Some(crate::utc_ms(2_000_000)));
    }
}
