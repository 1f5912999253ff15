//! Module code is standard Lua 5.4: the same code run as a module and in a plain Lua 5.4 (the
//! one mlua ships) gives the same results and errors, except where decision 004 cuts (named in
//! `CUTS` below and checked separately).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Duration;

use rustomnic_core::Value;
use rustomnic_lua::{compile, CageVm, CompiledModule, RequestCtx};

/// One case per line of the result: `name: outcome`.
const CASES: &str = r##"
local M = {}
local function ser(...)
  local out = {}
  for i = 1, select("#", ...) do
    local v = select(i, ...)
    local t = type(v)
    if t == "string" then out[#out + 1] = string.format("%q", v)
    elseif t == "table" or t == "function" or t == "thread" or t == "userdata" then out[#out + 1] = t
    else out[#out + 1] = tostring(v) end
  end
  return table.concat(out, ", ")
end
local cases = {}
local function case(name, f) cases[#cases + 1] = { name, f } end

case("load sees globals", function() X_GLOBAL = 7 return load("return X_GLOBAL")() end)
case("load with env", function() return load("return y", "c", "t", { y = 3 })() end)
case("load syntax error", function() return load("return +", "=chunk") end)
case("load mode b refuses text", function() return load("return 1", "c", "b") end)
case("load runtime error", function() return pcall(load("error('boom')", "=chunk")) end)
case("globals are _G", function() Z_GLOBAL = 1 return rawget(_G, "Z_GLOBAL"), _G.Z_GLOBAL, _G == _ENV end)
case("_G.x is a global", function() _G.W_GLOBAL = 5 return W_GLOBAL end)
case("wrap error prefix", function() local f = coroutine.wrap(function() error("inner") end) return pcall(f) end)
case("wrap error object", function() local f = coroutine.wrap(function() error({ code = 1 }) end) local ok, e = pcall(f) return ok, type(e), e.code end)
case("wrap close error wins", function()
  local f = coroutine.wrap(function()
    local x <close> = setmetatable({}, { __close = function() error("from close") end })
    error("first")
  end)
  return pcall(f)
end)
case("wrap recursive", function()
  local f
  f = coroutine.wrap(function() local r = f() return r end)
  return pcall(f)
end)
case("wrap dead", function() local f = coroutine.wrap(function() return 1 end) f() return pcall(f) end)
case("resume values", function()
  local co = coroutine.create(function(a, b) local c = coroutine.yield(a + b) return c * 2 end)
  local r1 = { coroutine.resume(co, 1, 2) }
  local r2 = { coroutine.resume(co, 10) }
  return r1[1], r1[2], r2[1], r2[2], coroutine.status(co), coroutine.resume(co)
end)
case("close suspended", function()
  local closed = false
  local co = coroutine.create(function() local x <close> = setmetatable({}, { __close = function() closed = true end }) coroutine.yield() end)
  coroutine.resume(co)
  return coroutine.close(co), closed, coroutine.status(co)
end)
case("isyieldable", function() return coroutine.wrap(function() return coroutine.isyieldable() end)() end)
case("pcall results", function() return pcall(function(...) return ... end, 1, nil, 3) end)
case("pcall error levels", function() local function f() error("lvl", 2) end return pcall(function() f() end) end)
case("xpcall handler", function() return xpcall(function() error("x") end, function(m) return "handled: " .. m end) end)
case("error non-string", function() local ok, e = pcall(error, 42) return ok, e end)
case("error nil", function() return pcall(error) end)
case("tostring", function() return tostring(1), tostring(1.5), tostring(-0.0), tostring(1e100), tostring(nil), tostring(true) end)
case("tostring __tostring", function() return tostring(setmetatable({}, { __tostring = function() return "obj" end })) end)
case("tostring __name", function() local s = tostring(setmetatable({}, { __name = "Thing" })) return s:match("^Thing: ") ~= nil end)
case("tostring bad __tostring", function() return pcall(tostring, setmetatable({}, { __tostring = function() return 1 end })) end)
case("integers", function() return 7 // 2, 7 % -3, -7 // 2, 2^53, math.tointeger(3.0), math.type(1), math.type(1.0), 1 == 1.0 end)
case("string.format", function() return string.format("%5.2f|%d|%x|%q|%s", 3.14159, 42, 255, "a\nb", nil) end)
case("string methods", function() return ("Hello"):upper(), ("Hello"):len(), ("abc"):rep(3, "-"), ("abc"):reverse(), ("abc"):byte(1, -1) end)
case("string.pack", function() return string.unpack("<i4", string.pack("<i4", -2)) end)
case("utf8", function() return utf8.len("héllo"), utf8.char(72, 233), utf8.codepoint("é") end)
case("table functions", function()
  local t = { 5, 3, 8, 1 }
  table.sort(t)
  table.insert(t, 2, 9)
  local removed = table.remove(t)
  return table.concat(t, ","), removed, table.unpack({ 1, 2, 3 }, 2)
end)
case("sort comparator", function() local t = { "b", "C", "a" } table.sort(t, function(a, b) return a:lower() < b:lower() end) return table.concat(t) end)
case("sort invalid", function() local t = {} for i = 1, 100 do t[i] = i % 7 end return pcall(table.sort, t, function(a, b) return true end) end)
case("sort compare error", function() return pcall(table.sort, { 1, "x", 2 }) end)
case("table.move", function() return table.concat(table.move({ 1, 2, 3 }, 1, 3, 2), ",") end)
case("next/pairs order len", function() local t = { 10, 20, 30 } local n = 0 for _ in pairs(t) do n = n + 1 end return n, #t, next({}) end)
case("__index __newindex", function()
  local log = {}
  local p = setmetatable({}, { __index = function(_, k) return k .. "!" end, __newindex = function(_, k, v) log[#log + 1] = k end })
  p.a = 1
  return p.x, log[1], rawget(p, "a")
end)
case("__pairs", function()
  local t = setmetatable({}, { __pairs = function() return function(_, k) if not k then return 1, "one" end end, nil, nil end })
  for k, v in pairs(t) do return k, v end
end)
case("goto", function() local i = 0 ::top:: i = i + 1 if i < 3 then goto top end return i end)
case("varargs", function() local function f(...) return select("#", ...), ... end return f(nil, nil) end)
case("gsub patterns", function() return ("hello world"):gsub("o", "0"), ("x=1, y=2"):gsub("(%w+)=(%w+)", "%2=%1") end)
case("gmatch", function() local out = {} for k, v in ("a=1, b=2"):gmatch("(%w+)=(%w+)") do out[#out + 1] = k .. v end return table.concat(out, ";") end)
case("os.time", function() return os.time({ year = 2020, month = 1, day = 1, hour = 0 }) ~= nil, type(os.clock()) end)
case("os.date", function() return os.date("!%Y-%m-%d %H:%M:%S", 0) end)
case("select negative", function() return select(-1, 1, 2, 3) end)
case("rawequal rawlen", function() return rawequal("a", "a"), rawlen({ 1, 2 }), rawlen("abc") end)
case("require builtins", function() return require("string") == string, require("_G") == _G end)
case("getmetatable __metatable", function() return getmetatable(setmetatable({}, { __metatable = "locked" })) end)
case("setmetatable protected", function() return pcall(setmetatable, setmetatable({}, { __metatable = 1 }), {}) end)
case("collectgarbage count", function() return type(collectgarbage("count")) end)
case("string coercion", function() return "10" + 1, "3" * "4", 10 .. "" end)
case("concat error", function() return pcall(function() return {} .. "x" end) end)
case("arith error", function() return pcall(function() local t = {} return t + 1 end) end)

function M.run()
  local out = {}
  for _, c in ipairs(cases) do
    out[#out + 1] = c[1] .. ": " .. ser(pcall(c[2]))
  end
  return table.concat(out, "\n")
end
return M
"##;

/// Where module code is deliberately not plain Lua (decision 004): each is checked here.
const CUTS: &str = r#"
local M = {}
function M.run()
  local out = {}
  local function add(...) out[#out + 1] = table.concat({ ... }, " ") end
  add("io", tostring(io), "debug", tostring(debug), "dofile", tostring(dofile), "package.cpath", package.cpath)
  add("string metatable", tostring(getmetatable("")))
  add("gc", tostring(pcall(setmetatable, {}, { __gc = function() end })))
  add("bytecode", tostring(load("\27Lua")))
  add("reader", tostring(pcall(load, function() return nil end)))
  add("os.exit", tostring(os.exit), "os.execute", tostring(os.execute), "os.getenv(PATH)", tostring(os.getenv("PATH")))
  -- A wrapped coroutine's function is a Lua function here: called in a tail call, its errors
  -- cannot name the caller's line (the caller's frame is gone), where Lua's C wrap can.
  local f
  f = coroutine.wrap(function() return f() end)
  add("tail-called wrap", select(2, pcall(f)))
  return table.concat(out, "\n")
end
return M
"#;

fn module(name: &str, source: &str) -> CompiledModule {
    let display = format!("test/{name}.lua");
    let bytecode = compile(name, Path::new(&display), &display, source.as_bytes()).unwrap();
    CompiledModule { name: name.into(), path: display.clone().into(), display, bytecode, functions: vec![], version: 1, source_hash: 0 }
}

fn run_in_module(source: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    tokio::task::LocalSet::new().block_on(&rt, async {
        let vm = CageVm::new("sem").unwrap();
        vm.install(&module("sem", source)).unwrap();
        let r = vm.call(RequestCtx::new("sem", "test", Duration::from_secs(30)), "sem", "run", vec![]).await.unwrap();
        match &r[0] {
            Value::Str(s) => String::from_utf8_lossy(s).into_owned(),
            other => panic!("{other:?}"),
        }
    })
}

#[test]
fn module_code_behaves_as_plain_lua() {
    let reference = mlua::Lua::new();
    let m: mlua::Table = reference.load(CASES).set_name("@test/sem.lua").eval().unwrap();
    let theirs: String = m.get::<mlua::Function>("run").unwrap().call(()).unwrap();
    let ours = run_in_module(CASES);
    let mut differences = Vec::new();
    for (o, t) in ours.lines().zip(theirs.lines()) {
        if o != t {
            differences.push(format!("  module: {o}\n  plain:  {t}"));
        }
    }
    assert_eq!(ours.lines().count(), theirs.lines().count());
    assert!(differences.is_empty(), "module code differs from plain Lua:\n{}", differences.join("\n"));
}

#[test]
fn the_cuts_of_decision_004_are_what_it_says() {
    let ours = run_in_module(CUTS);
    assert_eq!(
        ours,
        "io nil debug nil dofile nil package.cpath \n\
         string metatable false\n\
         gc false\n\
         bytecode nil\n\
         reader false\n\
         os.exit nil os.execute nil os.getenv(PATH) nil\n\
         tail-called wrap cannot resume non-suspended coroutine"
    );
}
