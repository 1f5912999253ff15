//! The cmdexec resource through Lua transactions: arguments, input, exit codes, signals and
//! output limits; a deadline kills the command and what it started; config problems are clear.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use rustomnic_core::Value;
use rustomnic_lua::RunError;
use rustomnic_resource::testing::{configure, run_lua};
use rustomnic_resource::ResourceConfig;
use rustomnic_resource_cmdexec::CmdexecProtocol;

fn cmd(toml: &str) -> ResourceConfig {
    configure(&CmdexecProtocol, "cmd", toml).unwrap()
}

fn run(resource: ResourceConfig, body: &str) -> Result<Vec<Value>, RunError> {
    run_lua(vec![resource], &format!("local C = pmnc.transaction.cmd\nreturn {{ f = function() {body} end }}"), "f", vec![], Duration::from_secs(20))
}

/// The `{exit=, stdout=, stderr=}` table of one run.
fn result(resource: ResourceConfig, body: &str) -> Value {
    run(resource, body).unwrap().remove(0)
}

fn text(v: &Value, key: &str) -> String {
    String::from_utf8(match v.get(key) {
        Some(Value::Str(b)) => b.clone(),
        other => panic!("{key}: {other:?}"),
    })
    .unwrap()
}

#[test]
fn echo_with_fixed_and_given_arguments() {
    let r = result(cmd("executable = \"/bin/echo\"\nargs = [\"-n\", \"fixed one\"]\n"), r#"return C.run({ "a b", 42 })"#);
    assert_eq!(r.get("exit"), Some(&Value::Int(0)));
    assert_eq!(text(&r, "stdout"), "fixed one a b 42");
    assert_eq!(text(&r, "stderr"), "");
    assert_eq!(r.get("signal"), None);
    // The older form, one string split into words, gives the same arguments.
    let r = result(cmd("executable = \"/bin/echo\"\nargs = \"-n 'fixed one'\"\n"), r#"return C.run({ "a b", 42 })"#);
    assert_eq!(text(&r, "stdout"), "fixed one a b 42");
    // No shell: metacharacters are plain text.
    let r = result(cmd("executable = \"echo\"\n"), r#"return C.run({ "$HOME", "*", "; rm -rf /", "`id`" })"#);
    assert_eq!(text(&r, "stdout"), "$HOME * ; rm -rf / `id`\n");
}

#[test]
fn stdin_goes_in_and_comes_back_through_cat() {
    let r = run(
        cmd("executable = \"cat\"\n"),
        r#"local small = C.run(nil, "bytes\0and\255more")
           local big = string.rep("0123456789abcdef", 4 * 65536)
           local back = C.run{ stdin = big }
           local none = C.run()
           return small.stdout, back.stdout == big, #back.stdout, none.stdout, none.exit"#,
    )
    .unwrap();
    assert_eq!(r, vec![Value::Str(b"bytes\0and\xffmore".to_vec()), Value::Bool(true), Value::Int(4 << 20), Value::str(""), Value::Int(0)]);
}

#[test]
fn exit_codes_stderr_and_signals() {
    let sh = || cmd("executable = \"/bin/sh\"\nargs = [\"-c\"]\n");
    let r = result(sh(), r#"return C.run{ args = { "echo out; echo oops >&2; exit 3" } }"#);
    assert_eq!((r.get("exit"), text(&r, "stdout"), text(&r, "stderr")), (Some(&Value::Int(3)), "out\n".into(), "oops\n".into()));
    let r = result(sh(), r#"return C.run({ "kill -TERM $$" })"#);
    assert_eq!(r.get("exit"), None, "{r:?}");
    assert_eq!(r.get("signal"), Some(&Value::Int(15)));
    // $0 and $1 of sh -c: the run's own arguments follow the fixed ones.
    let r = result(sh(), r#"return C.run({ "echo $0-$1", "zero", "one" })"#);
    assert_eq!(text(&r, "stdout"), "zero-one\n");
}

#[test]
fn env_and_cwd_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "executable = \"/bin/sh\"\nargs = [\"-c\", 'echo \"$GREETING|$OTHER\"; pwd']\ncwd = {:?}\nenv = {{ GREETING = \"hi there\", OTHER = \"2\" }}\n",
        dir.path().display().to_string()
    );
    let r = result(cmd(&toml), "return C.run()");
    let canonical = dir.path().canonicalize().unwrap();
    assert_eq!(text(&r, "stdout"), format!("hi there|2\n{}\n", canonical.display()));
    // env as a table of its own, its values expanded like every config string.
    std::env::set_var("RUSTOMNIC_CMDEXEC_TEST_VAR", "from the runtime");
    let toml = "executable = \"/bin/sh\"\nargs = [\n  \"-c\",\n  \"echo \\\"$B|$A\\\"\",\n]\n\n[resources.cmd.env]\nB = \"${RUSTOMNIC_CMDEXEC_TEST_VAR}\"\nA = \"$${NOT_EXPANDED}\"\n";
    let r = result(cmd(toml), "return C.run()");
    assert_eq!(text(&r, "stdout"), "from the runtime|${NOT_EXPANDED}\n");
}

/// Whether process `pid` still runs (a zombie has ended, it only waits to be reaped).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next()).unwrap_or("?");
            state != "Z" && state != "X"
        }
    }
}

#[test]
fn the_deadline_kills_the_command_and_what_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("slow.sh");
    std::fs::write(&script, "#!/bin/sh\necho $$ > \"$1/self.pid\"\nsleep 10 &\necho $! > \"$1/child.pid\"\nwait\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let resource = cmd(&format!("executable = {:?}\n", script.display().to_string()));
    let started = Instant::now();
    let r = run_lua(
        vec![resource],
        &format!("return {{ f = function() return pmnc.transaction.cmd.run({{ {:?} }}) end }}", dir.path().display().to_string()),
        "f",
        vec![],
        Duration::from_millis(300),
    );
    assert_eq!(r, Err(RunError::Deadline));
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    let pid = |name: &str| -> u32 { std::fs::read_to_string(dir.path().join(name)).unwrap().trim().parse().unwrap() };
    let (script_pid, sleep_pid) = (pid("self.pid"), pid("child.pid"));
    let limit = Instant::now() + Duration::from_secs(3);
    while (running(script_pid) || running(sleep_pid)) && Instant::now() < limit {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!running(script_pid), "the command {script_pid} still runs");
    assert!(!running(sleep_pid), "the command's child {sleep_pid} still runs");
    // The command itself was reaped, not left as a zombie.
    assert!(!Path::new(&format!("/proc/{script_pid}")).exists(), "the command {script_pid} was not reaped");
}

#[test]
fn sleep_as_the_executable_is_cut_quickly() {
    let started = Instant::now();
    let r = run_lua(
        vec![cmd("executable = \"sleep\"\nargs = [\"10\"]\n")],
        "return { f = function() return pmnc.transaction.cmd.run() end }",
        "f",
        vec![],
        Duration::from_millis(300),
    );
    assert_eq!(r, Err(RunError::Deadline));
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

#[test]
fn output_over_max_output_fails_clearly_and_at_once() {
    let started = Instant::now();
    let r = run(cmd("executable = \"yes\"\nmax_output = 1000\n"), "local ok, e = pcall(C.run) return tostring(e), e.code").unwrap();
    assert_eq!(
        r,
        vec![
            Value::str("resource cmd (participant 1): run: the command wrote more than max_output (1000 bytes) to stdout; it was killed [OUTPUT_LIMIT]"),
            Value::str("OUTPUT_LIMIT")
        ]
    );
    assert!(started.elapsed() < Duration::from_secs(3), "endless output must not wait for the deadline");
    let r = run(
        cmd("executable = \"/bin/sh\"\nargs = [\"-c\", \"head -c 1001 /dev/zero >&2\"]\nmax_output = 1000\n"),
        "local ok, e = pcall(C.run) return e.message",
    )
    .unwrap();
    assert_eq!(r[0], Value::str("run: the command wrote more than max_output (1000 bytes) to stderr; it was killed"));
    let r = result(cmd("executable = \"/bin/sh\"\nargs = [\"-c\", \"head -c 1000 /dev/zero\"]\nmax_output = 1000\n"), "return C.run()");
    assert_eq!(r.get("stdout"), Some(&Value::Str(vec![0; 1000])));
}

#[test]
fn the_command_runs_during_execute_and_is_not_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let r = run(
        cmd("executable = \"touch\"\n"),
        &format!(
            r#"local xa = pmnc.transaction.create()
               xa.cmd.run({{ {:?} }})
               xa.cmd.run({{ {{}} }})
               local ok, e = pcall(xa.execute)
               return tostring(e)"#,
            marker.display().to_string()
        ),
    )
    .unwrap();
    assert_eq!(r[0], Value::str("resource cmd (participant 2): run: argument 1 must be a string or a number, got map"));
    assert!(marker.exists(), "participant 1 ran although the transaction failed");
}

#[test]
fn bad_calls_fail_clearly() {
    let cases = [
        (r#"C.run("ls")"#, "run: args must be an array of strings, got string"),
        (r#"C.run({}, 5)"#, "run: stdin must be a string, got integer"),
        (r#"C.run{ arg = {} }"#, "run: unknown field \"arg\" (fields: args, stdin)"),
        (r#"C.run({}, "", 3)"#, "run: expected run(args, stdin) or run{args = {...}, stdin = \"...\"}"),
        (r#"C.run({ "a\0b" })"#, "run: argument 1 contains a NUL byte"),
        (r#"C.start()"#, "no method start (methods: run)"),
    ];
    for (body, expected) in cases {
        let r = run(cmd("executable = \"true\"\n"), &format!("local ok, e = pcall(function() {body} end) return tostring(e)")).unwrap();
        assert_eq!(r[0], Value::str(format!("resource cmd (participant 1): {expected}")), "{body}");
    }
    // The executable went away after configure.
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("gone");
    std::fs::copy("/bin/true", &gone).unwrap();
    let resource = cmd(&format!("executable = {:?}\n", gone.display().to_string()));
    std::fs::remove_file(&gone).unwrap();
    let r = run(resource, "local ok, e = pcall(C.run) return e.message").unwrap();
    assert_eq!(r[0], Value::str(format!("run: cannot start {}: No such file or directory", gone.display())));
}

#[test]
fn config_problems_are_clear() {
    let one = |toml: &str| {
        let errors = configure(&CmdexecProtocol, "cmd", toml).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors[0].clone()
    };
    assert_eq!(one(""), "cage.toml:1: resources.cmd: executable is required (an absolute path, or a name looked up in PATH)");
    assert!(one("executable = \"surely-no-such-command-xyz\"\n")
        .starts_with("cage.toml:2: resources.cmd.executable: surely-no-such-command-xyz was not found in PATH ("));
    assert_eq!(one("executable = \"/nonexistent/run\"\n"), "cage.toml:2: resources.cmd.executable: /nonexistent/run: No such file or directory");
    assert_eq!(
        one("executable = \"bin/run\"\n"),
        "cage.toml:2: resources.cmd.executable: \"bin/run\" must be an absolute path, or a bare name looked up in PATH"
    );
    assert_eq!(one("executable = \"/etc/passwd\"\n"), "cage.toml:2: resources.cmd.executable: /etc/passwd is not executable");
    assert_eq!(one("executable = \"true\"\ncwd = \"/nonexistent\"\n"), "cage.toml:3: resources.cmd.cwd: /nonexistent: No such file or directory");
    assert_eq!(one("executable = \"true\"\nargs = \"'open\"\n"), "cage.toml:3: resources.cmd.args: a ' quote is not closed");
    assert_eq!(one("executable = \"true\"\nargs = \"a\\u0000b\"\n"), "cage.toml:3: resources.cmd.args: an argument contains a NUL byte");
    assert_eq!(one("executable = \"true\"\nargs = 5\n"), "cage.toml:3: resources.cmd.args: expected an array of strings, found integer");
    assert_eq!(one("executable = \"true\"\nargs = [\n  \"-l\",\n  2,\n]\n"), "cage.toml:5: resources.cmd.args[1]: expected a string, found integer");
    assert_eq!(one("executable = \"true\"\nargs = [\"ok\", \"a\\u0000b\"]\n"), "cage.toml:3: resources.cmd.args[1]: contains a NUL byte");
    assert_eq!(one("executable = \"true\"\nenv = { A = 1 }\n"), "cage.toml:3: resources.cmd.env.A: expected a string, found integer");
    assert_eq!(one("executable = \"true\"\nenv = \"A=1\"\n"), "cage.toml:3: resources.cmd.env: expected a table of strings, found string");
    assert_eq!(
        one("executable = \"true\"\n[resources.cmd.env]\nOK = \"1\"\n\"A=B\" = \"x\"\n"),
        "cage.toml:5: resources.cmd.env.A=B: is not a valid environment variable name"
    );
    assert_eq!(one("executable = \"true\"\nenv = { A = \"x\\u0000y\" }\n"), "cage.toml:3: resources.cmd.env.A: the value contains a NUL byte");
    assert_eq!(one("executable = \"true\"\nmax_output = 0\n"), "cage.toml:3: resources.cmd.max_output: must be greater than zero");
    assert_eq!(one("executable = \"true\"\nshell = true\n"), "cage.toml:3: resources.cmd.shell: unknown key");
    // Problems of other keys survive the reading of args and env.
    let errors =
        configure(&CmdexecProtocol, "cmd", "max_output = \"lots\"\nexecutable = \"true\"\nenv = { B = \"x\", C = 2 }\nargs = [\"-a\", true]\n").unwrap_err();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(errors[0].starts_with("cage.toml:2: resources.cmd.max_output:"), "{errors:?}");
    assert_eq!(errors[1], "cage.toml:4: resources.cmd.env.C: expected a string, found integer");
    assert_eq!(errors[2], "cage.toml:5: resources.cmd.args[1]: expected a string, found boolean");
    let ok = cmd("executable = \"true\"\nenv = { B = \"x\" }\n");
    assert_eq!(ok.pool.size, 4);
}

/// Issue 22 #9: a command that started may have acted and nothing undoes it, so a transaction
/// that then fails is not recoverable; a call refused before anything started leaves nothing.
#[test]
fn a_failure_after_a_started_command_is_not_recoverable() {
    let r = run(
        cmd("executable = \"true\"\n"),
        r#"local function outcome(build)
             local xa = pmnc.transaction.create()
             build(xa)
             local ok, e = pcall(xa.execute)
             return tostring(e.recoverable)
           end
           return outcome(function(xa) xa.cmd.run() xa.cmd.run({ {} }) end),
                  outcome(function(xa) xa.cmd.run({ {} }) end)"#,
    )
    .unwrap();
    assert_eq!(r, vec![Value::str("false"), Value::str("true")]);
}
