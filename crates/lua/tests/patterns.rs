//! The pattern functions module code gets (string.find/match/gmatch/gsub on our resumable
//! matcher) against the C implementation shipped with Lua: the same results and the same
//! errors over many generated subjects and patterns.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use rustomnic_core::Value;
use rustomnic_lua::{compile, CageVm, CompiledModule, RequestCtx};

/// Serialises the outcome of pcall(f, ...) identically in both VMs.
const CASES: &str = r##"
local function ser(ok, ...)
  local out = { tostring(ok) }
  for i = 1, select("#", ...) do
    local v = select(i, ...)
    if type(v) == "string" then out[#out + 1] = string.format("%q", v)
    else out[#out + 1] = tostring(v) end
  end
  return table.concat(out, " ")
end
local function all(it)
  local out, n = {}, 0
  for a, b, c in it do
    n = n + 1
    out[#out + 1] = ser(true, a, b, c)
    if n > 50 then break end
  end
  return table.concat(out, "|")
end
local M = {}
function M.run(s, p, init, repl)
  local r = {}
  r[1] = ser(pcall(string.find, s, p, init))
  r[2] = ser(pcall(string.find, s, p, init, true))
  r[3] = ser(pcall(string.match, s, p, init))
  local ok, it = pcall(string.gmatch, s, p, init)
  r[4] = ok and select(2, pcall(all, it)) or ser(false, it)
  r[5] = ser(pcall(string.gsub, s, p, repl))
  r[6] = ser(pcall(string.gsub, s, p, repl, 2))
  r[7] = ser(pcall(string.gsub, s, p, function(a, b) if a == "a" then return nil end return "<" .. tostring(a) .. tostring(b) .. ">" end))
  r[8] = ser(pcall(string.gsub, s, p, { a = "A", b = false, ["("] = 7 }))
  return table.concat(r, "\n")
end
return M
"##;

fn module(name: &str, source: &str) -> CompiledModule {
    let display = format!("test/{name}.lua");
    let bytecode = compile(name, Path::new(&display), &display, source.as_bytes()).unwrap();
    CompiledModule { name: name.into(), path: display.clone().into(), display, bytecode, functions: vec![], version: 1, source_hash: 0 }
}

/// Error messages carry the position of the call, which differs between the two VMs.
fn without_positions(text: &str) -> String {
    text.lines()
        .map(|line| {
            let mut l = line.to_string();
            while let Some(i) = l.find("test/cases.lua:").or_else(|| l.find("[string \"")) {
                let rest = &l[i..];
                let Some(end) = rest.find(": ") else { break };
                l = format!("{}{}", &l[..i], &rest[end + 2..]);
            }
            l
        })
        .collect::<Vec<_>>()
        .join("\n")
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

#[test]
fn results_and_errors_agree_with_the_c_implementation() {
    let reference = mlua::Lua::new();
    let cases: mlua::Table = reference.load(CASES).set_name("=test/cases.lua").eval().unwrap();
    let reference_run: mlua::Function = cases.get("run").unwrap();

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let vm = CageVm::new("patterns").unwrap();
        vm.install(&module("cases", CASES)).unwrap();
        let subjects = ["", "a", "ab", "aab", "(a(b)c)", "hello world", "x = 10, y = 20", "a.b-c", "%a", "aaa", "[]", "\0a\0", "abcabc ab", "  trim  "];
        let atoms = [
            "a", "b", ".", "%a", "%d", "%s", "%w", "%A", "[ab]", "[^a]", "[a-c]", "[%a_]", "[]]", "(", ")", "()", "%1", "%b()", "%f[%a]", "%f[%A]", "^", "$",
            "%", "[", "%.", "x", "=", " ", "%z",
        ];
        let suffixes = ["", "", "", "*", "+", "-", "?"];
        let repls = ["%0", "%1", "<%1>", "x", "%%", "%2", "%", "[%0]", "%a"];
        let inits = [Value::Nil, Value::Int(1), Value::Int(2), Value::Int(-2), Value::Int(0), Value::Int(30)];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut compared = 0;
        let letters = ["a", "b", "(", ")", " ", "1", "x", "%", ".", "[", "]", "A", "\n"];
        for round in 0..20_000 {
            let s = if round % 2 == 0 { rng.pick(&subjects).to_string() } else { (0..rng.next() % 12).map(|_| rng.pick(&letters)).collect::<String>() };
            let mut p = String::new();
            for _ in 0..(1 + rng.next() % 5) {
                p.push_str(rng.pick(&atoms));
                p.push_str(rng.pick(&suffixes));
            }
            let init = inits[(rng.next() % inits.len() as u64) as usize].clone();
            let repl = rng.pick(&repls).to_string();
            let ours = vm
                .call(
                    RequestCtx::new("patterns", "test", Duration::from_secs(10)),
                    "cases",
                    "run",
                    vec![Value::Str(s.clone().into_bytes()), Value::Str(p.clone().into_bytes()), init.clone(), Value::Str(repl.clone().into_bytes())],
                )
                .await
                .unwrap_or_else(|e| panic!("s={s:?} p={p:?}: {e}"));
            let Value::Str(ours) = &ours[0] else { panic!("not a string") };
            let init_lua = match &init {
                Value::Int(i) => mlua::Value::Integer(*i),
                _ => mlua::Value::Nil,
            };
            let theirs: mlua::LuaString = reference_run.call((s.as_str(), p.as_str(), init_lua, repl.as_str())).unwrap();
            let ours = without_positions(&String::from_utf8_lossy(ours));
            let theirs = without_positions(&theirs.to_string_lossy());
            assert_eq!(ours, theirs, "subject {s:?}, pattern {p:?}, init {init:?}, replacement {repl:?}");
            compared += 1;
        }
        assert_eq!(compared, 20_000);
    });
}

/// string.rep, upper, lower, reverse and table.concat over big inputs (done in pieces) give what
/// the C functions give.
#[test]
fn big_inputs_done_in_pieces_agree_with_the_c_implementation() {
    const BIG: &str = r#"
local M = {}
function M.run()
  local s = ("aBc\0xY"):rep(350000)
  local t = {}
  for i = 1, 200003 do t[i] = i % 7 == 0 and i or ("v" .. i) end
  return string.rep("ab", 3000001), string.rep("ab", 1048577, "--"), s:upper(), s:lower(), s:reverse(),
    table.concat(t, ","), table.concat(t, "", 5, 150000), string.rep("x", 0), string.rep("x", -3), string.rep("", 1e7)
end
return M
"#;
    let reference = mlua::Lua::new();
    let m: mlua::Table = reference.load(BIG).eval().unwrap();
    let theirs: mlua::MultiValue = m.get::<mlua::Function>("run").unwrap().call(()).unwrap();
    let theirs: Vec<Vec<u8>> = theirs
        .into_iter()
        .map(|v| match v {
            mlua::Value::String(s) => s.as_bytes().to_vec(),
            other => panic!("{other:?}"),
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    tokio::task::LocalSet::new().block_on(&rt, async {
        let vm = CageVm::new("big").unwrap();
        vm.install(&module("big", BIG)).unwrap();
        let ours = vm.call(RequestCtx::new("big", "test", Duration::from_secs(60)), "big", "run", vec![]).await.unwrap();
        assert_eq!(ours.len(), theirs.len());
        for (i, (o, t)) in ours.iter().zip(&theirs).enumerate() {
            let Value::Str(o) = o else { panic!("result {i} is not a string") };
            assert!(o == t, "result {}: {} bytes against {} bytes", i + 1, o.len(), t.len());
        }
    });
}

/// table.move over long ranges (done in pieces) moves what the C function moves, overlapping
/// ranges included.
#[test]
fn long_table_moves_agree_with_the_c_implementation() {
    const MOVES: &str = r#"
local M = {}
local function fill(n) local t = {} for i = 1, n do t[i] = i end return t end
function M.run()
  local out = {}
  local cases = { {1, 200000, 3}, {3, 200000, 1}, {1, 150000, 100000}, {100000, 250000, 1}, {5, 70000, 70001} }
  for _, c in ipairs(cases) do
    local t = fill(250000)
    table.move(t, c[1], c[2], c[3])
    local sum, n = 0, #t
    for i = 1, n do sum = (sum * 31 + (t[i] or 0)) % 1000000007 end
    out[#out + 1] = n .. ":" .. sum
  end
  local t2 = table.move(fill(200000), 1, 200000, 5, {})
  out[#out + 1] = #t2 .. ":" .. tostring(t2[5]) .. ":" .. tostring(t2[200004])
  return table.concat(out, " ")
end
return M
"#;
    let reference = mlua::Lua::new();
    let m: mlua::Table = reference.load(MOVES).eval().unwrap();
    let theirs: String = m.get::<mlua::Function>("run").unwrap().call(()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    tokio::task::LocalSet::new().block_on(&rt, async {
        let vm = CageVm::new("moves").unwrap();
        vm.install(&module("moves", MOVES)).unwrap();
        let ours = vm.call(RequestCtx::new("moves", "test", Duration::from_secs(60)), "moves", "run", vec![]).await.unwrap();
        assert_eq!(ours, vec![Value::Str(theirs.into_bytes())]);
    });
}
