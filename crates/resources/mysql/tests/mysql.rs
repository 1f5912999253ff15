//! The mysql resource against a real MariaDB or MySQL server (PMNC_TEST_MYSQL_URL, default
//! mysql://root@127.0.0.1:3306/test): results and type mapping, parameters, commit and rollback
//! of several participants, deadlines, an unreachable server, pool exhaustion, errors and config.
//! When the server is not running, each test says how to start it and passes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use rustomnic_core::Value;
use rustomnic_lua::RunError;
use rustomnic_resource::testing::{configure, run_lua, SqlServer};
use rustomnic_resource::ResourceConfig;
use rustomnic_resource_mysql::Mysql;

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

-- Statements one after the other, each its own transaction (with pool_size = 1, on one
-- connection); the result of the last.
function M.seq(...)
  local r
  for _, sql in ipairs({...}) do r = pmnc.transaction.db.execute(sql) end
  return r
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

-- Kills its own connection (pool_size = 1), then needs a new one.
function M.kill_self()
  local id = pmnc.transaction.db.execute("select connection_id() as id").rows[1].id
  local ok, e = pcall(pmnc.transaction.db.execute, "kill " .. id)
  return ok, fields(e), pmnc.transaction.db.execute("select 2 as two")
end

function M.other(method)
  local ok, e = pcall(pmnc.transaction.db[method], "select 1")
  return ok, fields(e)
end

return M
"#;

/// The server of these tests, its URL, skip banner and tables (shared with the other SQL tests).
static SERVER: SqlServer = SqlServer {
    protocol: &Mysql,
    product: "MariaDB/MySQL",
    tests: "mysql",
    url_env: "PMNC_TEST_MYSQL_URL",
    default_url: "mysql://root@127.0.0.1:3306/test",
    start: "start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd",
    create_suffix: " engine = InnoDB",
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

const TYPES: &str = "id int primary key, ti tinyint, si smallint, mi mediumint, i int, bi bigint, ubi bigint unsigned, \
     f float, d double, de decimal(10,4), c char(3), vc varchar(10), t text, bl blob, vb varbinary(4), dt date, \
     dtm datetime(6), ts timestamp(3) null, tm time(1), yr year, js json, en enum('a','b'), b bool, n int";

/// The JSON column: MySQL marks it as JSON and it comes back as a table; MariaDB stores JSON as
/// LONGTEXT and its result metadata does not say JSON, so it comes back as the JSON text.
fn assert_json(got: Option<&Value>, expected: &Value) {
    match got {
        Some(Value::Str(s)) => assert_eq!(&Value::parse_json(s).unwrap(), expected, "{got:?}"),
        other => assert_eq!(other, Some(expected)),
    }
}

#[test]
fn select_maps_every_type() {
    if !server_up() {
        return;
    }
    let t = SERVER.table(TYPES);
    exec(
        &format!(
            "insert into {} values (1, 1, -2, 3, 4, 3000000000, 18446744073709551615, 0.1, 2.25, 123.45, 'c', 'vc', 'txt', \
             x'00ff', x'0102', '2024-02-29', '2024-02-29 13:14:15.25', '2024-02-29 13:14:15.5', '-26:03:04.5', 2024, \
             '{{\"a\": [1, 2.5, \"x\"]}}', 'b', true, null)",
            t.name
        ),
        vec![],
    );
    let r = exec(&format!("select * from {}", t.name), vec![]);
    assert_eq!(r.get("affected"), Some(&Value::Int(1)), "{r:?}");
    let got = rows(&r);
    let row = &got[0];
    let expect: Vec<(&str, Value)> = vec![
        ("id", Value::Int(1)),
        ("ti", Value::Int(1)),
        ("si", Value::Int(-2)),
        ("mi", Value::Int(3)),
        ("i", Value::Int(4)),
        ("bi", Value::Int(3_000_000_000)),
        ("ubi", Value::str("18446744073709551615")),
        ("f", Value::Float(0.1)),
        ("d", Value::Float(2.25)),
        ("de", Value::str("123.4500")),
        ("c", Value::str("c")),
        ("vc", Value::str("vc")),
        ("t", Value::str("txt")),
        ("bl", Value::Str(vec![0, 255])),
        ("vb", Value::Str(vec![1, 2])),
        ("dt", Value::str("2024-02-29")),
        ("dtm", Value::str("2024-02-29T13:14:15.25")),
        ("ts", Value::str("2024-02-29T13:14:15.5")),
        ("tm", Value::str("-26:03:04.5")),
        ("yr", Value::Int(2024)),
        ("en", Value::str("b")),
        ("b", Value::Int(1)),
    ];
    for (column, value) in &expect {
        assert_eq!(row.get(column), Some(value), "column {column} of {row:?}");
    }
    assert_json(row.get("js"), &Value::Map(vec![(Value::str("a"), Value::Array(vec![Value::Int(1), Value::Float(2.5), Value::str("x")]))]));
    // NULL is left out of the row.
    assert_eq!(row.get("n"), None, "{row:?}");

    // Expressions too, and the text protocol (statements that cannot be prepared) maps alike.
    let r = run(
        vec![db("pool_size = 1\n")],
        "seq",
        vec![
            Value::str("prepare rtest_s from 'select 7 as seven, 1.5e0 as dbl, cast(''2024-01-02 03:04:05'' as datetime) as dtm, ''x'' as s, null as n'"),
            Value::str("execute rtest_s"),
        ],
        Duration::from_secs(10),
    )
    .unwrap();
    let got = rows(&r[0]);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].get("seven"), Some(&Value::Int(7)), "{got:?}");
    assert_eq!(got[0].get("dbl"), Some(&Value::Float(1.5)), "{got:?}");
    assert_eq!(got[0].get("dtm"), Some(&Value::str("2024-01-02T03:04:05")), "{got:?}");
    assert_eq!(got[0].get("s"), Some(&Value::str("x")), "{got:?}");
    assert_eq!(got[0].get("n"), None, "{got:?}");
}

#[test]
fn parameters_fill_the_placeholders() {
    if !server_up() {
        return;
    }
    let t = SERVER.table(TYPES);
    let params = vec![
        Value::Int(1),
        Value::Int(5),
        Value::Float(6.0),
        Value::Int(7),
        Value::Int(8),
        Value::Int(3_000_000_000),
        Value::str("18446744073709551615"),
        Value::Int(2),
        Value::Float(2.5),
        Value::str("12.5"),
        Value::str("c"),
        Value::str("vc"),
        Value::str("text"),
        Value::Str(vec![0, 1, 2, 255]),
        Value::Str(vec![9]),
        Value::str("2024-01-02"),
        Value::str("2024-01-02T03:04:05.123456"),
        Value::str("2024-01-02 03:04:05"),
        Value::str("12:00:00"),
        Value::Int(1999),
        Value::Map(vec![(Value::str("k"), Value::Array(vec![Value::Int(1), Value::Int(2)]))]),
        Value::str("a"),
        Value::Bool(true),
        Value::Nil,
    ];
    let placeholders = vec!["?"; params.len()].join(", ");
    let r = exec(&format!("insert into {} values ({placeholders})", t.name), params);
    assert_eq!(r.get("affected"), Some(&Value::Int(1)), "{r:?}");
    exec(&format!("insert into {} (id, de) values (?, ?), (?, ?)", t.name), vec![Value::Int(2), Value::Float(7.25), Value::Int(3), Value::Int(5)]);
    let r = exec(&format!("select * from {} where id >= ? order by id", t.name), vec![Value::Int(1)]);
    assert_eq!(r.get("affected"), Some(&Value::Int(3)), "{r:?}");
    let rows = rows(&r);
    let row = &rows[0];
    let expect: Vec<(&str, Value)> = vec![
        ("ti", Value::Int(5)),
        ("si", Value::Int(6)),
        ("bi", Value::Int(3_000_000_000)),
        ("ubi", Value::str("18446744073709551615")),
        ("f", Value::Float(2.0)),
        ("d", Value::Float(2.5)),
        ("de", Value::str("12.5000")),
        ("t", Value::str("text")),
        ("bl", Value::Str(vec![0, 1, 2, 255])),
        ("vb", Value::Str(vec![9])),
        ("dt", Value::str("2024-01-02")),
        ("dtm", Value::str("2024-01-02T03:04:05.123456")),
        ("ts", Value::str("2024-01-02T03:04:05")),
        ("tm", Value::str("12:00:00")),
        ("yr", Value::Int(1999)),
        ("en", Value::str("a")),
        ("b", Value::Int(1)),
    ];
    for (column, value) in &expect {
        assert_eq!(row.get(column), Some(value), "column {column} of {row:?}");
    }
    assert_json(row.get("js"), &Value::Map(vec![(Value::str("k"), Value::Array(vec![Value::Int(1), Value::Int(2)]))]));
    assert_eq!(row.get("n"), None);
    assert_eq!(rows[1].get("de"), Some(&Value::str("7.2500")));
    assert_eq!(rows[2].get("de"), Some(&Value::str("5.0000")));
    let r = exec(&format!("update {} set t = ? where id >= ?", t.name), vec![Value::str("u"), Value::Int(2)]);
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
        vec![Value::str(format!("insert into {} values (1, 'a')", a.name)), Value::str(format!("insert into {} values (2, 'b')", b.name))],
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(r[0], Value::Bool(true), "{r:?}");
    assert_eq!(r[1].get("affected"), Some(&Value::Int(1)));
    assert_eq!(r[2].get("affected"), Some(&Value::Int(1)));
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
    assert_eq!(e.get("code"), Some(&Value::str("1064")), "{e:?}");
    assert_eq!(e.get("recoverable"), Some(&Value::Bool(true)), "{e:?}");
    assert!(text(e.get("message")).starts_with("You have an error in your SQL syntax"), "{e:?}");
    assert!(text(e.get("text")).starts_with("resource db (participant 2): You have an error"), "{e:?}");
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
    let r = run(vec![db("")], "exec", vec![Value::str("select sleep(5)")], Duration::from_millis(500));
    assert_eq!(r, Err(RunError::Deadline));
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

/// Dropping a connection in the middle of a statement (what the deadline does) has the server
/// kill the statement, so it does not run on for nothing.
#[test]
fn a_statement_cut_off_by_the_deadline_is_killed_on_the_server() {
    if !server_up() {
        return;
    }
    let tag = format!("kill_test_{}", std::process::id());
    let resource = db("").resource;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = tokio::task::LocalSet::new();
    let still_running = local.block_on(&rt, async {
        let mut conn = resource.connect().await.unwrap();
        conn.begin().await.unwrap();
        let slow = conn.call("execute", vec![Value::str(format!("select sleep(20) as {tag}"))]);
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
                    vec![Value::str("select count(*) as n from information_schema.processlist where info like ?"), Value::str(format!("%as {tag}"))],
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

#[test]
fn an_unreachable_server_fails_clearly_before_the_deadline() {
    let started = Instant::now();
    let r = run(vec![db_with("mysql://root@127.0.0.1:1/test", "")], "try", vec![Value::str("select 1")], Duration::from_secs(10)).unwrap();
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
    let r = run(vec![db("pool_size = 1\n")], "two", vec![Value::str("select sleep(5)"), Value::str("select 1")], Duration::from_millis(500));
    // Each participant needs its own connection; waiting for a second one could never end.
    let r = r.unwrap();
    let e = failure(&r);
    let message = text(e.get("message"));
    assert!(message.contains("more participants on db than its pool gives one worker (1)"), "{e:?}");
    assert_eq!(e.get("participant"), Some(&Value::Int(2)), "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
}

#[test]
fn malformed_sql_and_missing_tables_carry_their_code() {
    if !server_up() {
        return;
    }
    let r = run(vec![db("")], "fail_then", vec![Value::str("selec 1"), Value::str("select 2 as two")], Duration::from_secs(10)).unwrap();
    assert_eq!(r[0], Value::Bool(false));
    assert_eq!(r[1].get("code"), Some(&Value::str("1064")), "{r:?}");
    assert!(text(r[1].get("message")).contains("near 'selec 1'"), "{r:?}");
    // The failed transaction was rolled back; its connection serves the next call.
    assert_eq!(rows(&r[2]), vec![Value::Map(vec![(Value::str("two"), Value::Int(2))])]);

    let r = run(vec![db("")], "try", vec![Value::str("select * from no_such_table_at_all")], Duration::from_secs(10)).unwrap();
    let e = failure(&r);
    assert_eq!(e.get("code"), Some(&Value::str("1146")), "{e:?}");
    assert!(text(e.get("message")).contains("no_such_table_at_all' doesn't exist"), "{e:?}");
}

#[test]
fn wrong_parameters_are_refused_clearly() {
    if !server_up() {
        return;
    }
    let t = SERVER.table("id int primary key");
    let r = run(vec![db("")], "try", vec![Value::str(format!("insert into {} values (?)", t.name)), Value::str("abc")], Duration::from_secs(10)).unwrap();
    let e = failure(&r);
    assert_eq!(e.get("code"), Some(&Value::str("1366")), "{e:?}");
    assert!(text(e.get("message")).starts_with("Incorrect integer value: 'abc' for column"), "{e:?}");

    let r = run(vec![db("")], "try", vec![Value::str("select ? + ? as n"), Value::Int(1)], Duration::from_secs(10)).unwrap();
    let e = failure(&r);
    assert_eq!(text(e.get("message")), "execute: the statement has 2 parameters (?), 1 value was given", "{e:?}");

    let r = run(vec![db("")], "try", vec![Value::Int(5)], Duration::from_secs(10)).unwrap();
    let e = failure(&r);
    assert_eq!(text(e.get("message")), "execute: the first argument is the SQL text, got integer", "{e:?}");
}

#[test]
fn a_lost_connection_is_replaced_and_unknown_methods_are_named() {
    if !server_up() {
        return;
    }
    let r = run(vec![db("pool_size = 1\n")], "kill_self", vec![], Duration::from_secs(10)).unwrap();
    assert_eq!(r[0], Value::Bool(false), "{r:?}");
    assert!(!text(r[1].get("message")).starts_with("rollback failed"), "{r:?}");
    // MariaDB: "Connection was killed" [1927].
    assert!(matches!(r[1].get("code"), Some(Value::Str(_))), "{r:?}");
    // The only connection of the pool was dropped and a new one made.
    assert_eq!(rows(&r[2]), vec![Value::Map(vec![(Value::str("two"), Value::Int(2))])]);

    let r = run(vec![db("")], "other", vec![Value::str("query")], Duration::from_secs(10)).unwrap();
    let e = failure(&r);
    assert_eq!(text(e.get("message")), "mysql has no method query (methods: execute)", "{e:?}");
}

#[test]
fn bad_config_is_refused_with_file_line_and_key() {
    let errors = configure(&Mysql, "db", "pool_size = 2\n").unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("cage.toml:1: resources.db.url: missing"), "{errors:?}");

    let errors = configure(&Mysql, "db", "url = \"this is no url\"\n").unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("cage.toml:2: resources.db.url: not a MySQL connection URL"), "{errors:?}");

    let errors = configure(&Mysql, "db", "url = \"postgresql://u@h/db\"\n").unwrap_err();
    assert!(errors[0].starts_with("cage.toml:2: resources.db.url: not a MySQL connection URL"), "{errors:?}");

    let errors = configure(&Mysql, "db", "url = \"mysql://u@h/db\"\nbogus = 1\n").unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("cage.toml:3: resources.db.bogus: unknown key"), "{errors:?}");

    // ${ENV} in the url is expanded; an unset variable is named.
    let errors = configure(&Mysql, "db", "url = \"mysql://u:${PMNC_TEST_SURELY_UNSET_VARIABLE}@h/db\"\n").unwrap_err();
    assert!(errors[0].starts_with("cage.toml:2: resources.db.url: environment variable PMNC_TEST_SURELY_UNSET_VARIABLE is not set"), "{errors:?}");

    assert!(configure(&Mysql, "db", "url = \"mysql://u@h:3306/db\"\npool_size = 3\n").is_ok());
}
