//! Lua transactions against a resource double: recording, parallel run, commit or rollback of
//! every participant, the error table, accept, the one-participant shortcut.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_util::future::LocalBoxFuture;
use rustomnic_core::Value;
use rustomnic_lua::{compile, worker, CageVm, CompiledModule, Participant, ParticipantError, Prepared, RequestCtx, Resources, RunError};

/// What the double saw: "run db.get", "commit 1", "rollback 2", ...
type Journal = Rc<RefCell<Vec<String>>>;

struct Double {
    journal: Journal,
}

struct DoublePrepared {
    journal: Journal,
    outcomes: Vec<Result<Value, ParticipantError>>,
}

impl Resources for Double {
    fn run(&self, _cage: &str, participants: Vec<Participant>, _deadline: Instant) -> LocalBoxFuture<'static, Result<Box<dyn Prepared>, ParticipantError>> {
        let journal = self.journal.clone();
        Box::pin(async move {
            let mut outcomes = Vec::new();
            for (i, p) in participants.iter().enumerate() {
                journal.borrow_mut().push(format!("run {}.{}", p.resource, p.method));
                if p.resource == "nope" {
                    return Err(ParticipantError {
                        resource: p.resource.clone(),
                        participant: i + 1,
                        code: None,
                        message: "no such resource".into(),
                        recoverable: true,
                    });
                }
                outcomes.push(match p.method.as_str() {
                    "fail" => Err(ParticipantError {
                        resource: p.resource.clone(),
                        participant: i + 1,
                        code: Some("42P01".into()),
                        message: "relation does not exist".into(),
                        recoverable: true,
                    }),
                    _ => Ok(Value::Array(p.args.clone())),
                });
            }
            Ok(Box::new(DoublePrepared { journal, outcomes }) as Box<dyn Prepared>)
        })
    }
}

impl Prepared for DoublePrepared {
    fn outcomes(&self) -> &[Result<Value, ParticipantError>] {
        &self.outcomes
    }

    fn finish(self: Box<Self>, commit: bool, wait: bool, _deadline: Instant) -> LocalBoxFuture<'static, Result<(), ParticipantError>> {
        Box::pin(async move {
            for (i, o) in self.outcomes.iter().enumerate() {
                let what = if commit && o.is_ok() { "commit" } else { "rollback" };
                self.journal.borrow_mut().push(format!("{what} {}{}", i + 1, if wait { "" } else { " nowait" }));
            }
            Ok(())
        })
    }
}

fn module(name: &str, source: &str) -> CompiledModule {
    let display = format!("test/{name}.lua");
    let bytecode = compile(name, Path::new(&display), &display, source.as_bytes()).unwrap();
    CompiledModule { name: name.into(), path: display.clone().into(), display, bytecode, functions: vec![], version: 1, source_hash: 0 }
}

fn run(source: &str, f: &str) -> (Result<Vec<Value>, RunError>, Vec<String>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let journal: Journal = Rc::default();
        rustomnic_lua::transaction::set_resources(Rc::new(Double { journal: journal.clone() }));
        let vm = CageVm::new("web").unwrap();
        vm.install(&module("t", source)).unwrap();
        let r = vm.call(RequestCtx::new("web", "test", Duration::from_secs(5)), "t", f, vec![]).await;
        worker::clear();
        let seen = journal.borrow().clone();
        (r, seen)
    })
}

const SOURCE: &str = r#"local M = {}
function M.ok()
  local xa = pmnc.transaction.create()
  xa.db.execute("select $1", 1)
  xa.cache.set("k", "v")
  local r1, r2 = xa.execute()
  return r1, r2
end
function M.one_fails()
  local xa = pmnc.transaction.create()
  xa.db.execute("insert")
  xa.db.fail("select * from nope")
  local ok, e = pcall(xa.execute)
  return ok, e.resource, e.participant, e.recoverable, e.code, e.message, tostring(e)
end
function M.accept_first()
  local xa = pmnc.transaction.create{accept = function(results)
    for _, r in ipairs(results) do if r.ok then return true end end
  end}
  xa.a.fail()
  xa.b.get("x")
  local r1, r2 = xa.execute()
  return r1 == nil, r2
end
function M.shortcut() return pmnc.transaction.db.execute("select 1", nil, 3) end
function M.twice()
  local xa = pmnc.transaction.create()
  xa.db.x()
  xa.execute()
  xa.execute()
end
function M.bad_option() pmnc.transaction.create{acept = true} end
function M.no_resource() pmnc.transaction.nope.get() end
function M.nowait()
  local xa = pmnc.transaction.create{sync_commit = false}
  xa.db.x()
  return xa.execute()
end
function M.uncaught() pmnc.transaction.db.fail() end
function M.state() return pmnc.state.get("k") end
return M"#;

#[test]
fn all_participants_commit_and_results_come_in_order() {
    let (r, seen) = run(SOURCE, "ok");
    assert_eq!(r.unwrap(), vec![Value::Array(vec![Value::str("select $1"), Value::Int(1)]), Value::Array(vec![Value::str("k"), Value::str("v")])]);
    assert_eq!(seen, ["run db.execute", "run cache.set", "commit 1", "commit 2"]);
}

#[test]
fn one_failure_rolls_back_every_participant_and_raises_a_table() {
    let (r, seen) = run(SOURCE, "one_fails");
    assert_eq!(seen, ["run db.execute", "run db.fail", "rollback 1", "rollback 2"]);
    assert_eq!(
        r.unwrap(),
        vec![
            Value::Bool(false),
            Value::str("db"),
            Value::Int(2),
            Value::Bool(true),
            Value::str("42P01"),
            Value::str("relation does not exist"),
            Value::str("resource db (participant 2): relation does not exist [42P01]"),
        ]
    );
}

#[test]
fn accept_can_commit_a_partial_success() {
    let (r, seen) = run(SOURCE, "accept_first");
    assert_eq!(r.unwrap(), vec![Value::Bool(true), Value::Array(vec![Value::str("x")])]);
    assert_eq!(seen, ["run a.fail", "run b.get", "rollback 1", "commit 2"]);
}

#[test]
fn the_shortcut_runs_one_participant() {
    let (r, seen) = run(SOURCE, "shortcut");
    assert_eq!(r.unwrap(), vec![Value::Array(vec![Value::str("select 1"), Value::Nil, Value::Int(3)])]);
    assert_eq!(seen, ["run db.execute", "commit 1"]);
}

#[test]
fn misuse_is_reported_at_the_callers_line() {
    for (f, want) in
        [("twice", "test/t.lua:30: this transaction was executed already"), ("bad_option", "test/t.lua:32: pmnc.transaction.create: unknown option acept")]
    {
        match run(SOURCE, f).0 {
            Err(RunError::Failed { message, .. }) => assert!(message.contains(want), "{f}: {message}"),
            other => panic!("{f}: {other:?}"),
        }
    }
    match run(SOURCE, "no_resource").0 {
        Err(RunError::Failed { message, .. }) => assert!(message.contains("resource nope (participant 1): no such resource"), "{message}"),
        other => panic!("{other:?}"),
    }
    match run(SOURCE, "uncaught").0 {
        Err(RunError::Failed { message, .. }) => assert_eq!(message, "resource db (participant 1): relation does not exist [42P01]"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn sync_commit_false_does_not_wait() {
    let (_, seen) = run(SOURCE, "nowait");
    assert_eq!(seen, ["run db.x", "commit 1 nowait"]);
}

#[test]
fn pmnc_state_is_a_shortcut_to_the_state_resource() {
    let (r, seen) = run(SOURCE, "state");
    assert_eq!(r.unwrap(), vec![Value::Array(vec![Value::str("k")])]);
    assert_eq!(seen, ["run state.get", "commit 1"]);
}
