//! The postgresql resource against a real server (PMNC_TEST_POSTGRES_URL, default
//! postgresql://postgres@127.0.0.1:5432/test): results and type mapping, parameters, commit and
//! rollback of several participants, deadlines, an unreachable server, pool exhaustion, errors
//! and config. When the server is not running, each test says how to start it and passes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use rustomnic_core::Value;
use rustomnic_lua::RunError;
use rustomnic_resource::testing::{configure, run_lua, SqlServer};
use rustomnic_resource::ResourceConfig;
use rustomnic_resource_postgresql::Postgresql;

const MODULE: &str = r#"
local M = {}

local function fields(e)
  if type(e) ~= "table" then return { text = tostring(e) } end
  return { resource = e.resource, participant = e.participant, code = e.code, message = e.message,
           recoverable = e.recoverable, text = tostring(e) }
end

function M.exec(sql, ...)
  return pmnc.transaction.db.execute(sql, ...)
end

function M.try(sql, ...)
  local ok, r = pcall(pmnc.transaction.db.execute, sql, ...)
  if ok then return true, r end
  return false, fields(r)
end

-- Two participants on the same resource, one transaction.
function M.two(sql1, sql2)
  local xa = pmnc.transaction.create()
  xa.db.execute(sql1)
  xa.db.execute(sql2)
  local ok, a, b = pcall(xa.execute)
  if ok then return true, a, b end
  return false, fields(a)
end

-- A failing call, then another on the same pool: the connection must come back clean.
function M.fail_then(bad, good)
  local ok, e = pcall(pmnc.transaction.db.execute, bad)
  return ok, fields(e), pmnc.transaction.db.execute(good)
end

function M.other(method)
  local ok, e = pcall(pmnc.transaction.db[method], "select 1")
  return ok, fields(e)
end

return M
"#;

/// The server of these tests, its URL, skip banner and tables (shared with the other SQL tests).
static SERVER: SqlServer = SqlServer {
    protocol: &Postgresql,
    product: "PostgreSQL",
    tests: "postgresql",
    url_env: "PMNC_TEST_POSTGRES_URL",
    default_url: "postgresql://postgres@127.0.0.1:5432/test",
    start: "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    create_suffix: "",
};

fn db_with(url: &str, extra: &str) -> ResourceConfig {
    SERVER.db_with(url, extra)
}

fn db(extra: &str) -> ResourceConfig {
    SERVER.db(extra)
}

fn run(resources: Vec<ResourceConfig>, function: &str, args: Vec<Value>, timeout: Duration) -> Result<Vec<Value>, RunError> {
    run_lua(resources, MODULE, function, args, timeout)
}

fn exec(sql: &str, params: Vec<Value>) -> Value {
    SERVER.exec(sql, params)
}

/// Whether the server answers; says loudly how to start it when it does not.
fn server_up() -> bool {
    SERVER.up()
}

fn rows(result: &Value) -> Vec<Value> {
    match result.get("rows") {
        Some(Value::Array(rows)) => rows.clone(),
        other => panic!("no rows in {result:?}: {other:?}"),
    }
}

fn text(v: Option<&Value>) -> &str {
    v.and_then(|v| v.as_str()).unwrap_or("<none>")
}

fn failure(r: &[Value]) -> &Value {
    assert_eq!(r.first(), Some(&Value::Bool(false)), "expected a failure: {r:?}");
    &r[1]
}

#[test]
fn select_maps_every_type() {
    if !server_up() {
        return;
    }
    let r = exec(
        r#"select 1::int2 as i2, 2::int4 as i4, 3000000000::int8 as i8, 1.5::float4 as f4, 0.1::float4 as f4b,
                  2.25::float8 as f8, '123.4500'::numeric as num, 'NaN'::numeric as num_nan, -0.001::numeric as num_small,
                  12345678901234567890.123::numeric as num_big, 'txt'::text as t, 'vc'::varchar as vc, 'nm'::name as nm,
                  'c'::char(3) as ch, 'x'::"char" as qc, '\x00ff'::bytea as by, true as b, false as bf, null::int as n,
                  '2024-02-29 13:14:15.25'::timestamp as ts, '2024-02-29 13:14:15+02'::timestamptz as tstz,
                  '2024-02-29'::date as d, '13:14:15.5'::time as tm, '13:14:15+05:30'::timetz as ttz,
                  '1 year 2 mons 3 days 04:05:06.5'::interval as iv, '{"a":[1,2.5,"x"]}'::json as js,
                  '[1,{"b":true}]'::jsonb as jb, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid as u,
                  array[1,2,null]::int4[] as arr, array['a','b c']::text[] as tarr, 5::oid as o,
                  pg_sleep(0) as v"#,
        vec![],
    );
    assert_eq!(r.get("affected"), Some(&Value::Int(1)), "{r:?}");
    let rows = rows(&r);
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    let expect: Vec<(&str, Value)> = vec![
        ("i2", Value::Int(1)),
        ("i4", Value::Int(2)),
        ("i8", Value::Int(3_000_000_000)),
        ("f4", Value::Float(1.5)),
        ("f4b", Value::Float(0.1)),
        ("f8", Value::Float(2.25)),
        ("num", Value::str("123.4500")),
        ("num_nan", Value::str("NaN")),
        ("num_small", Value::str("-0.001")),
        ("num_big", Value::str("12345678901234567890.123")),
        ("t", Value::str("txt")),
        ("vc", Value::str("vc")),
        ("nm", Value::str("nm")),
        ("ch", Value::str("c  ")),
        ("qc", Value::str("x")),
        ("by", Value::Str(vec![0, 255])),
        ("b", Value::Bool(true)),
        ("bf", Value::Bool(false)),
        ("ts", Value::str("2024-02-29T13:14:15.25")),
        ("tstz", Value::str("2024-02-29T11:14:15Z")),
        ("d", Value::str("2024-02-29")),
        ("tm", Value::str("13:14:15.5")),
        ("ttz", Value::str("13:14:15+05:30")),
        ("iv", Value::str("P1Y2M3DT4H5M6.5S")),
        ("js", Value::Map(vec![(Value::str("a"), Value::Array(vec![Value::Int(1), Value::Float(2.5), Value::str("x")]))])),
        ("jb", Value::Array(vec![Value::Int(1), Value::Map(vec![(Value::str("b"), Value::Bool(true))])])),
        ("u", Value::str("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
        ("arr", Value::Array(vec![Value::Int(1), Value::Int(2), Value::Nil])),
        ("tarr", Value::Array(vec![Value::str("a"), Value::str("b c")])),
        ("o", Value::Int(5)),
    ];
    for (column, value) in &expect {
        assert_eq!(row.get(column), Some(value), "column {column} of {row:?}");
    }
    // NULL is left out of the row.
    assert_eq!(row.get("n"), None, "{row:?}");
    assert_eq!(row.get("v"), None, "a void result has no value: {row:?}");
}

#[test]
fn parameters_are_bound_by_the_declared_type() {
    if !server_up() {
        return;
    }
    let t = SERVER.table(
        "id int4 primary key, s int2, b int8, r float4, d float8, n numeric(10,2), t text, v varchar(10), f bool, \
         y bytea, j json, jb jsonb, ts timestamp, tz timestamptz, dt date, u uuid, a int4[], nul text",
    );
    let params = vec![
        Value::Int(1),
        Value::Float(4.0),
        Value::Int(3_000_000_000),
        Value::Int(2),
        Value::Float(2.5),
        Value::str("12.5"),
        Value::str("text"),
        Value::str("vc"),
        Value::Bool(true),
        Value::Str(vec![0, 1, 2, 255]),
        Value::Map(vec![(Value::str("k"), Value::Array(vec![Value::Int(1), Value::Int(2)]))]),
        Value::str("{\"x\": 1}"),
        Value::str("2024-01-02T03:04:05.123456"),
        Value::str("2024-01-02T03:04:05+01:00"),
        Value::str("2024-01-02"),
        Value::str("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        Value::Array(vec![Value::Int(1), Value::Nil, Value::Int(3)]),
        Value::Nil,
    ];
    let placeholders: Vec<String> = (1..=params.len()).map(|i| format!("${i}")).collect();
    let r = exec(&format!("insert into {} values ({})", t.name, placeholders.join(", ")), params);
    assert_eq!(r.get("affected"), Some(&Value::Int(1)), "{r:?}");
    // numeric from a float and from an integer.
    exec(&format!("insert into {} (id, n) values ($1, $2), ($3, $4)", t.name), vec![Value::Int(2), Value::Float(7.25), Value::Int(3), Value::Int(5)]);
    let r = exec(&format!("select * from {} order by id", t.name), vec![]);
    assert_eq!(r.get("affected"), Some(&Value::Int(3)), "{r:?}");
    let rows = rows(&r);
    let row = &rows[0];
    let expect: Vec<(&str, Value)> = vec![
        ("id", Value::Int(1)),
        ("s", Value::Int(4)),
        ("b", Value::Int(3_000_000_000)),
        ("r", Value::Float(2.0)),
        ("d", Value::Float(2.5)),
        ("n", Value::str("12.50")),
        ("t", Value::str("text")),
        ("v", Value::str("vc")),
        ("f", Value::Bool(true)),
        ("y", Value::Str(vec![0, 1, 2, 255])),
        ("j", Value::Map(vec![(Value::str("k"), Value::Array(vec![Value::Int(1), Value::Int(2)]))])),
        ("jb", Value::Map(vec![(Value::str("x"), Value::Int(1))])),
        ("ts", Value::str("2024-01-02T03:04:05.123456")),
        ("tz", Value::str("2024-01-02T02:04:05Z")),
        ("dt", Value::str("2024-01-02")),
        ("u", Value::str("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
        ("a", Value::Array(vec![Value::Int(1), Value::Nil, Value::Int(3)])),
    ];
    for (column, value) in &expect {
        assert_eq!(row.get(column), Some(value), "column {column} of {row:?}");
    }
    assert_eq!(row.get("nul"), None);
    assert_eq!(rows[1].get("n"), Some(&Value::str("7.25")));
    assert_eq!(rows[2].get("n"), Some(&Value::str("5.00")));
    // affected counts rows of UPDATE and DELETE.
    let r = exec(&format!("update {} set t = $1 where id >= $2", t.name), vec![Value::str("u"), Value::Int(2)]);
    assert_eq!(r.get("affected"), Some(&Value::Int(2)), "{r:?}");
    let r = exec(&format!("delete from {}", t.name), vec![]);
    assert_eq!(r.get("affected"), Some(&Value::Int(3)), "{r:?}");
}

#[test]
fn two_participants_commit_together() {
    if !server_up() {
        return;
    }
    let a = SERVER.table("id int primary key, v text");
    let b = SERVER.table("id int primary key, v text");
    let r = run(
        vec![db("")],
        "two",
        vec![Value::str(format!("insert into {} values (1, 'a')", a.name)), Value::str(format!("insert into {} values (2, 'b') returning id", b.name))],
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(r[0], Value::Bool(true), "{r:?}");
    assert_eq!(r[1].get("affected"), Some(&Value::Int(1)));
    assert_eq!(rows(&r[2]), vec![Value::Map(vec![(Value::str("id"), Value::Int(2))])]);
    // Read back in new transactions, on new connections.
    let read = exec(&format!("select v from {} union all select v from {}", a.name, b.name), vec![]);
    let mut got: Vec<String> = rows(&read).iter().map(|r| text(r.get("v")).to_string()).collect();
    got.sort();
    assert_eq!(got, ["a", "b"]);
}

#[test]
fn a_failing_participant_rolls_back_every_participant() {
    if !server_up() {
        return;
    }
    let a = SERVER.table("id int primary key, v text");
    let r = run(
        vec![db("")],
        "two",
        vec![Value::str(format!("insert into {} values (1, 'a')", a.name)), Value::str("insert into nowhere values (oops")],
        Duration::from_secs(10),
    )
    .unwrap();
    let e = failure(&r);
    assert_eq!(e.get("resource"), Some(&Value::str("db")), "{e:?}");
    assert_eq!(e.get("participant"), Some(&Value::Int(2)), "{e:?}");
    assert_eq!(e.get("code"), Some(&Value::str("42601")), "{e:?}");
    assert_eq!(e.get("recoverable"), Some(&Value::Bool(true)), "{e:?}");
    assert!(text(e.get("message")).starts_with("syntax error at end of input"), "{e:?}");
    assert!(text(e.get("text")).starts_with("resource db (participant 2): syntax error"), "{e:?}");
    // The first participant's insert was rolled back.
    let count = exec(&format!("select count(*) as n from {}", a.name), vec![]);
    assert_eq!(rows(&count)[0].get("n"), Some(&Value::Int(0)), "{count:?}");
}

#[test]
fn a_deadline_in_the_middle_of_a_slow_query() {
    if !server_up() {
        return;
    }
    let started = Instant::now();
    let r = run(vec![db("")], "exec", vec![Value::str("select pg_sleep(5)")], Duration::from_millis(500));
    assert_eq!(r, Err(RunError::Deadline));
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[test]
fn statement_timeout_stops_slow_statements() {
    if !server_up() {
        return;
    }
    let started = Instant::now();
    let r = run(vec![db("statement_timeout = \"200ms\"\n")], "try", vec![Value::str("select pg_sleep(3)")], Duration::from_secs(10)).unwrap();
    let e = failure(&r);
    assert_eq!(e.get("code"), Some(&Value::str("57014")), "{e:?}");
    assert!(text(e.get("message")).contains("statement timeout"), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[test]
fn an_unreachable_server_fails_clearly_before_the_deadline() {
    let started = Instant::now();
    let r = run(vec![db_with("postgresql://postgres@127.0.0.1:1/test", "")], "try", vec![Value::str("select 1")], Duration::from_secs(10)).unwrap();
    let e = failure(&r);
    let message = text(e.get("message"));
    assert!(message.starts_with("cannot connect: "), "{e:?}");
    assert!(message.to_lowercase().contains("refused"), "{e:?}");
    assert_eq!(e.get("recoverable"), Some(&Value::Bool(true)), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
}

#[test]
fn more_participants_than_the_pool_fail_at_once() {
    if !server_up() {
        return;
    }
    let started = Instant::now();
    let r = run(vec![db("pool_size = 1\n")], "two", vec![Value::str("select pg_sleep(5)"), Value::str("select 1")], Duration::from_millis(500));
    // Each participant needs its own connection; waiting for a second one could never end.
    let r = r.unwrap();
    let e = failure(&r);
    let message = text(e.get("message"));
    assert!(message.contains("more participants on db than its pool gives one worker (1)"), "{e:?}");
    assert_eq!(e.get("participant"), Some(&Value::Int(2)), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
}

#[test]
fn malformed_sql_and_missing_tables_carry_their_sqlstate() {
    if !server_up() {
        return;
    }
    let r = run(vec![db("")], "fail_then", vec![Value::str("selec 1"), Value::str("select 2 as two")], Duration::from_secs(10)).unwrap();
    assert_eq!(r[0], Value::Bool(false));
    assert_eq!(r[1].get("code"), Some(&Value::str("42601")), "{r:?}");
    assert_eq!(text(r[1].get("message")), "syntax error at or near \"selec\"");
    // The failed transaction was rolled back; its connection serves the next call.
    assert_eq!(rows(&r[2]), vec![Value::Map(vec![(Value::str("two"), Value::Int(2))])]);

    let r = run(vec![db("")], "try", vec![Value::str("select * from no_such_table_at_all")], Duration::from_secs(10)).unwrap();
    let e = failure(&r);
    assert_eq!(e.get("code"), Some(&Value::str("42P01")), "{e:?}");
    assert_eq!(text(e.get("message")), "relation \"no_such_table_at_all\" does not exist");
}

#[test]
fn wrong_parameters_are_refused_clearly() {
    if !server_up() {
        return;
    }
    let r = run(vec![db("")], "try", vec![Value::str("select $1::int as n"), Value::str("abc")], Duration::from_secs(10)).unwrap();
    let e = failure(&r);
    assert_eq!(text(e.get("message")), "parameter $1: a string (\"abc\") cannot be passed as int4 (give a number)", "{e:?}");
    assert_eq!(e.get("participant"), Some(&Value::Int(1)));

    let r = run(vec![db("")], "try", vec![Value::str("select $1::int + $2::int as n"), Value::Int(1)], Duration::from_secs(10)).unwrap();
    let e = failure(&r);
    assert_eq!(text(e.get("message")), "execute: the statement has 2 parameters ($1..$2), 1 value was given", "{e:?}");

    // A string the server cannot read as the declared type: the server's own message and code.
    let r = run(vec![db("")], "try", vec![Value::str("select $1::timestamp as t"), Value::str("not a time")], Duration::from_secs(10)).unwrap();
    let e = failure(&r);
    assert_eq!(e.get("code"), Some(&Value::str("22007")), "{e:?}");

    let r = run(vec![db("")], "try", vec![Value::Int(5)], Duration::from_secs(10)).unwrap();
    let e = failure(&r);
    assert_eq!(text(e.get("message")), "execute: the first argument is the SQL text, got integer", "{e:?}");
}

#[test]
fn unmapped_types_and_unknown_methods_are_named() {
    if !server_up() {
        return;
    }
    let r = run(vec![db("")], "try", vec![Value::str("select point(1, 2) as p")], Duration::from_secs(10)).unwrap();
    let e = failure(&r);
    assert_eq!(text(e.get("message")), "column p is of type point, which has no mapping to a Lua value; cast it in SQL, e.g. p::text", "{e:?}");
    let r = run(vec![db("")], "try", vec![Value::str("select point(1, 2)::text as p")], Duration::from_secs(10)).unwrap();
    assert_eq!(rows(&r[1])[0].get("p"), Some(&Value::str("(1,2)")));

    let r = run(vec![db("")], "other", vec![Value::str("query")], Duration::from_secs(10)).unwrap();
    let e = failure(&r);
    assert_eq!(text(e.get("message")), "postgresql has no method query (methods: execute)", "{e:?}");
}

#[test]
fn bad_config_is_refused_with_file_line_and_key() {
    let errors = configure(&Postgresql, "db", "pool_size = 2\n").unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("cage.toml:1: resources.db.url: missing"), "{errors:?}");

    let errors = configure(&Postgresql, "db", "url = \"this is no url\"\n").unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("cage.toml:2: resources.db.url: not a PostgreSQL connection URL"), "{errors:?}");

    let errors = configure(&Postgresql, "db", "url = \"postgresql://u@h:notaport/db\"\n").unwrap_err();
    assert!(errors[0].starts_with("cage.toml:2: resources.db.url: not a PostgreSQL connection URL"), "{errors:?}");

    let errors = configure(&Postgresql, "db", "url = \"postgresql://u@h/db\"\nbogus = 1\nstatement_timeout = \"soon\"\n").unwrap_err();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().any(|e| e.starts_with("cage.toml:3: resources.db.bogus: unknown key")), "{errors:?}");
    assert!(errors.iter().any(|e| e.starts_with("cage.toml:4: resources.db.statement_timeout:")), "{errors:?}");

    // ${ENV} in the url is expanded; an unset variable is named.
    let errors = configure(&Postgresql, "db", "url = \"postgresql://u:${PMNC_TEST_SURELY_UNSET_VARIABLE}@h/db\"\n").unwrap_err();
    assert!(errors[0].starts_with("cage.toml:2: resources.db.url: environment variable PMNC_TEST_SURELY_UNSET_VARIABLE is not set"), "{errors:?}");

    assert!(configure(&Postgresql, "db", "url = \"postgresql://u@h/db\"\nstatement_timeout = \"5s\"\npool_size = 3\n").is_ok());
}

#[test]
fn a_lost_connection_is_replaced() {
    if !server_up() {
        return;
    }
    let r = run(
        vec![db("pool_size = 1\n")],
        "fail_then",
        vec![Value::str("select pg_terminate_backend(pg_backend_pid())"), Value::str("select 2 as two")],
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(r[0], Value::Bool(false), "{r:?}");
    // The server's own reason, not "rollback failed".
    assert_eq!(r[1].get("code"), Some(&Value::str("57P01")), "{r:?}");
    assert!(text(r[1].get("message")).starts_with("terminating connection"), "{r:?}");
    // The only connection of the pool was dropped and a new one made.
    assert_eq!(rows(&r[2]), vec![Value::Map(vec![(Value::str("two"), Value::Int(2))])]);
}

/// Dropping a connection in the middle of a statement (what the deadline does) asks the server
/// to cancel the statement, so it does not run on for nothing.
#[test]
fn a_statement_cut_off_by_the_deadline_is_cancelled_on_the_server() {
    if !server_up() {
        return;
    }
    let tag = format!("cancel_test_{}", std::process::id());
    let resource = db("").resource;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = tokio::task::LocalSet::new();
    let still_running = local.block_on(&rt, async {
        let mut conn = resource.connect().await.unwrap();
        conn.begin().await.unwrap();
        let slow = conn.call("execute", vec![Value::str(format!("select pg_sleep(20) as {tag}"))]);
        assert!(tokio::time::timeout(Duration::from_millis(300), slow).await.is_err());
        drop(conn);
        // Poll: the statement sleeps 20 s, so gone within 5 s means it was stopped.
        let mut other = resource.connect().await.unwrap();
        let waited = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let r = other
                .call(
                    "execute",
                    vec![Value::str("select count(*) as n from pg_stat_activity where state = 'active' and query like $1"), Value::str(format!("%as {tag}"))],
                )
                .await
                .unwrap();
            let n = rows(&r)[0].get("n").cloned();
            if n == Some(Value::Int(0)) || waited.elapsed() > Duration::from_secs(5) {
                break n;
            }
        }
    });
    assert_eq!(still_running, Some(Value::Int(0)));
}
