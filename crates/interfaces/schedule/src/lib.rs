//! The `schedule` interface: fires a module function on a cron expression (with seconds and a
//! time zone, via croner). Several copies of a cage sharing one folder fire each firing once:
//! before running, a copy claims the firing in the `queue_leases` row of the schedule in the
//! cage's SQLite file (a compare-and-set on the last fired time, under SQLite's write lock).
//! See docs/interfaces/schedule.md.

mod lease;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use futures_util::future::LocalBoxFuture;
use rustomnic_core::{Section, Value};
use rustomnic_interface::{Host, Interface, InterfaceProtocol, InterfaceSpec};
use rustomnic_lua::{worker, RequestCtx};

/// The most missed firings run at start with `missed = "catch_up"`.
pub const MAX_CATCH_UP: usize = 100;

/// What to do with firings missed while no copy of the cage ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missed {
    Skip,
    CatchUp,
}

/// The `schedule` protocol.
pub struct ScheduleProtocol;

impl InterfaceProtocol for ScheduleProtocol {
    fn name(&self) -> &'static str {
        "schedule"
    }

    fn configure(&self, spec: InterfaceSpec, section: &Section) -> Option<Arc<dyn Interface>> {
        // Every key is read before giving up, so that all problems are listed at once.
        let cron_text = section.string("cron");
        if cron_text.is_none() && !section.has("cron") {
            section.table_error("cron is required (such as \"0 0 3 * * *\": seconds, minutes, hours, day of month, month, day of week)");
        }
        let cron = cron_text.as_ref().and_then(|c| match parse_cron(&c.value) {
            Ok(c) => Some(c),
            Err(e) => {
                section.error("cron", format!("{:?} is not a cron expression: {e}", c.value));
                None
            }
        });
        let tz = match section.string("timezone") {
            Some(t) => match t.value.parse::<Tz>() {
                Ok(tz) => Some(tz),
                Err(_) => {
                    section.error("timezone", format!("{:?} is not a time zone name (such as \"Europe/Berlin\" or \"UTC\")", t.value));
                    None
                }
            },
            None => Some(Tz::UTC),
        };
        let missed = match section.string("missed") {
            Some(m) if m.value == "skip" => Some(Missed::Skip),
            Some(m) if m.value == "catch_up" => Some(Missed::CatchUp),
            Some(m) => {
                section.error("missed", format!("{:?} is not \"skip\" or \"catch_up\"", m.value));
                None
            }
            None => Some(Missed::Skip),
        };
        let (Some(cron_text), Some(cron), Some(tz), Some(missed)) = (cron_text, cron, tz, missed) else { return None };
        let state_file = spec.state_file.clone();
        Some(Arc::new(Schedule { spec, cron, cron_text: cron_text.value, tz, missed, state_file }))
    }
}

/// Parses a cron expression with optional seconds (5 or 6 fields).
pub fn parse_cron(text: &str) -> Result<Cron, String> {
    croner::parser::CronParser::builder().seconds(croner::parser::Seconds::Optional).build().parse(text).map_err(|e| e.to_string())
}

/// A configured schedule of a cage.
pub struct Schedule {
    spec: InterfaceSpec,
    cron: Cron,
    cron_text: String,
    tz: Tz,
    missed: Missed,
    state_file: PathBuf,
}

impl Schedule {
    /// The first firing strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Firings are whole seconds; croner keeps the fraction of the start time, and copies
        // started at different fractions must agree on the firing instants they claim.
        let whole = Utc.timestamp_opt(after.timestamp(), 0).single()?;
        let local = whole.with_timezone(&self.tz);
        self.cron.find_next_occurrence(&local, false).ok().map(|t| t.with_timezone(&Utc))
    }

    fn lease_name(&self) -> String {
        format!("schedule:{}", self.spec.name)
    }

    /// Runs the handler once for the firing at `at`, on a worker thread.
    fn fire(&self, host: &Host, at: DateTime<Utc>) {
        let (cage, name, timeout) = (self.spec.cage.clone(), self.spec.name.clone(), self.spec.request_timeout);
        let (module, function) = self.spec.handler.value.clone();
        let scheduled = at.timestamp_millis() as f64 / 1000.0;
        host.spawn(Box::new(move || {
            Box::pin(async move {
                let Some(vm) = worker::cage(&cage) else { return };
                let mut ctx = RequestCtx::new(&cage, &name, timeout);
                let firing = Value::Map(vec![(Value::str("interface"), Value::str(name.clone())), (Value::str("scheduled_at"), Value::Float(scheduled))]);
                ctx.parameters = Some(firing.clone());
                if let Err(e) = worker::run_traced(&vm, ctx, &module, &function, vec![firing], rustomnic_lua::trace::SpanKind::Consumer).await {
                    tracing::error!(cage = %cage, interface = %name, "schedule firing of {scheduled}: {module}.{function} failed: {}", e.log_text());
                }
            }) as LocalBoxFuture<'static, ()>
        }));
    }

    /// Copies of the cage in other processes (other hosts, other state files) see the same
    /// firing: when clustered, the first process of the flock to claim it runs it. When the
    /// claim cannot be made (no JetStream), the firing runs here: at least once rather than
    /// not at all, said once in the log.
    fn won_in_flock(&self, host: &Host, at: DateTime<Utc>, failed_before: &mut bool) -> bool {
        let key = format!("{}.{}.{}", self.spec.cage, self.spec.name, at.timestamp_millis());
        let Some(claimed) = host.claim_in_flock(&key) else { return true };
        match claimed {
            Ok(won) => {
                *failed_before = false;
                won
            }
            Err(e) => {
                if !*failed_before {
                    tracing::warn!(cage = %self.spec.cage, interface = %self.spec.name, "cannot claim firings across the flock ({e}); running them here, so copies on other hosts may run them too");
                }
                *failed_before = true;
                true
            }
        }
    }

    /// The timing loop of this schedule (its own thread): claims and fires every firing until
    /// shutdown.
    fn run(self: Arc<Self>, host: Host) {
        let shutdown = host.shutdown();
        let who = format!("{}-{}", std::process::id(), rustomnic_lua::new_request_id());
        let mut conn = match rustomnic_resource_state::store::open(&self.state_file, Duration::from_secs(10)) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(cage = %self.spec.cage, interface = %self.spec.name, "schedule stopped: {}", e.message);
                return;
            }
        };
        let lease = self.lease_name();
        let now = Utc::now();
        let mut from = now;
        if self.missed == Missed::CatchUp {
            match lease::last_fired(&conn, &self.state_file, &lease) {
                Ok(Some(last)) if last < now => from = last,
                Ok(_) => {}
                Err(e) => tracing::error!(cage = %self.spec.cage, interface = %self.spec.name, "{e}"),
            }
        }
        let mut caught_up = 0usize;
        let mut claim_failed = false;
        let Some(mut next) = self.next_after(from) else {
            tracing::warn!(cage = %self.spec.cage, interface = %self.spec.name, "cron {:?} never fires", self.cron_text);
            return;
        };
        loop {
            // Sleep until the firing in short steps, so shutdown is seen soon.
            loop {
                if *shutdown.borrow() {
                    return;
                }
                let left = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                if left.is_zero() {
                    break;
                }
                std::thread::sleep(left.min(Duration::from_millis(100)));
            }
            let now = Utc::now();
            let late = now - next > chrono::Duration::seconds(1);
            let skip = late && self.missed == Missed::Skip;
            if late && self.missed == Missed::CatchUp {
                caught_up += 1;
            }
            if !skip && caught_up <= MAX_CATCH_UP {
                match lease::claim(&mut conn, &self.state_file, &lease, &who, next) {
                    Ok(true) if !self.won_in_flock(&host, next, &mut claim_failed) => {
                        tracing::debug!(cage = %self.spec.cage, interface = %self.spec.name, "firing {next} ran in another process of the flock")
                    }
                    Ok(true) => self.fire(&host, next),
                    Ok(false) => tracing::debug!(cage = %self.spec.cage, interface = %self.spec.name, "firing {next} ran in another copy"),
                    Err(e) => tracing::error!(cage = %self.spec.cage, interface = %self.spec.name, "firing {next} skipped: {e}"),
                }
            }
            let after = if skip { now } else { next };
            match self.next_after(after) {
                Some(n) => next = n,
                None => return,
            }
            if next > now {
                caught_up = 0;
            }
        }
    }
}

impl Interface for Schedule {
    fn spec(&self) -> &InterfaceSpec {
        &self.spec
    }

    fn start(self: Arc<Self>, host: Host) {
        let name = format!("pmnc-schedule-{}", self.spec.name);
        let s = self.clone();
        if let Err(e) = std::thread::Builder::new().name(name).spawn(move || s.run(host)) {
            tracing::error!(cage = %self.spec.cage, interface = %self.spec.name, "cannot start the schedule: {e}");
        }
    }
}

/// A fixed instant for tests: `Utc.timestamp_millis_opt` without the Option.
pub fn utc_ms(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_else(Utc::now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_with_seconds_and_time_zones() {
        assert!(parse_cron("0 0 3 * * *").is_ok());
        assert!(parse_cron("*/5 * * * *").is_ok());
        assert!(parse_cron("61 * * * * *").is_err());
        let cron = parse_cron("0 0 3 * * *").unwrap();
        // 2026-07-01 00:00 UTC; 03:00 in Berlin (UTC+2 in summer) is 01:00 UTC.
        let from = utc_ms(1_782_864_000_000);
        let berlin: Tz = "Europe/Berlin".parse().unwrap();
        let next = cron.find_next_occurrence(&from.with_timezone(&berlin), false).unwrap().with_timezone(&Utc);
        assert_eq!(next.timestamp_millis() - from.timestamp_millis(), 3_600_000);
    }
}
