//! `require` through the real binary: third-party pure-Lua libraries from `lua_modules/` (the
//! luarocks layout), one copy per module, native libraries refused, a changed library reloading
//! the modules that use it, and missing libraries reported at the module's line.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const SHARE: &str = "lua_modules/share/lua/5.4";

/// Copies a library that Debian installs under /usr/share/lua/5.x; None (after saying how to get
/// it) when the package is not installed.
fn debian_library(file: &str, package: &str) -> Option<String> {
    for version in ["5.4", "5.3", "5.2", "5.1"] {
        if let Ok(text) = std::fs::read_to_string(Path::new("/usr/share/lua").join(version).join(file)) {
            return Some(text);
        }
    }
    eprintln!("SKIPPED: {file} is missing; install it with: apt-get install {package} (.ci/run does)");
    None
}

const HTTP: &str = r#"
local json = require("dkjson")
local inspect = require("inspect")
local greet = require("greet")
local M = {}
function M.handle(request)
  if request.path == "/json" then
    local t = json.decode('{"a": [1, 2, {"b": true}]}')
    return json.encode({ inspected = inspect(t.a[3]), n = #t.a })
  elseif request.path == "/greet" then
    return greet.hello()
  elseif request.path == "/mine" then
    json.flag = "http's"
    return tostring(json.flag) .. " " .. pmnc.other.flag()
  end
end
return M
"#;

const OTHER: &str = r#"
local json = require("dkjson")
local M = {}
function M.flag() return tostring(json.flag) end
return M
"#;

#[test]
fn modules_require_third_party_libraries_each_with_its_own_copy() {
    let (Some(dkjson), Some(inspect)) = (debian_library("dkjson.lua", "lua-dkjson"), debian_library("inspect.lua", "lua-inspect")) else { return };
    let t = Tree::new();
    t.write("app/cages/web/cage.toml", &http_cage_toml(""));
    t.write("app/cages/web/http.lua", HTTP);
    t.write("app/cages/web/other.lua", OTHER);
    // dkjson in the cage's own lua_modules, inspect and greet in the app's.
    t.write(&format!("app/cages/web/{SHARE}/dkjson.lua"), &dkjson);
    t.write(&format!("app/{SHARE}/inspect.lua"), &inspect);
    t.write(&format!("app/{SHARE}/greet.lua"), "return { hello = function() return 'v1' end }");
    let s = Server::start(&t.path().join("app"), &[]);
    let addr = s.addr("http");
    let r = json_body(&get(addr, "/json"));
    assert_eq!(r["n"], 3);
    // dkjson marks decoded objects with a metatable; inspect shows it.
    assert_eq!(r["inspected"], "{\n  b = true,\n  <metatable> = {\n    __jsontype = \"object\"\n  }\n}");
    // Two modules requiring the same library do not share its table.
    assert_eq!(get(addr, "/mine").text(), "http's nil");
    assert_eq!(get(addr, "/greet").text(), "v1");
}

#[test]
fn a_changed_library_reloads_its_modules_and_a_broken_one_keeps_them() {
    let t = Tree::new();
    t.write("c/cage.toml", &http_cage_toml(""));
    t.write("c/http.lua", "local g = require('greet') local M = {} function M.handle() return g.hello() end return M");
    t.write(&format!("c/{SHARE}/greet.lua"), "return { hello = function() return 'v1' end }");
    let mut s = Server::start(&t.path().join("c"), &[]);
    let addr = s.addr("http");
    assert_eq!(get(addr, "/").text(), "v1");
    t.write_rename(&format!("c/{SHARE}/greet.lua"), "return { hello = function() return 'v2' end }");
    get_until(addr, "/", "v2", Duration::from_secs(10));
    assert!(s.wait_for("library", Duration::from_secs(5)).is_some());
    t.write_rename(&format!("c/{SHARE}/greet.lua"), "return { hello = function( end }");
    assert!(s.wait_for("keeping the previous version", Duration::from_secs(10)).is_some(), "the broken library was not reported");
    assert_eq!(get(addr, "/").text(), "v2", "a broken library must not replace working code");
}

#[test]
fn native_and_missing_libraries_are_reported_at_the_modules_line() {
    let t = Tree::new();
    t.write("c/cage.toml", &http_cage_toml(""));
    t.write("c/http.lua", "local M = {}\nfunction M.handle() return 'x' end\nreturn M");
    t.write("c/native.lua", "local M = {}\nlocal cjson = require('cjson')\nreturn M");
    t.write("c/missing.lua", "local M = {}\n\nlocal x = require('no.such.lib')\nreturn M");
    t.write("c/sneaky.lua", "local x = require('../../etc/passwd')\nreturn {}");
    t.write("c/lua_modules/lib/lua/5.4/cjson.so", "\x7fELF");
    let out = pmnc_limited(&["check", t.path().join("c").to_str().unwrap()], Duration::from_secs(60));
    assert_ne!(out.code, Some(0));
    let text = format!("{}{}", out.stdout, out.stderr);
    assert!(text.contains("c/native.lua:2: module 'cjson' is a native library (c/lua_modules/lib/lua/5.4/cjson.so): native code cannot be loaded"), "{text}");
    assert!(text.contains("c/missing.lua:3: module 'no.such.lib' not found"), "{text}");
    assert!(text.contains("no file 'c/lua_modules/share/lua/5.4/no/such/lib.lua'"), "{text}");
    assert!(text.contains("c/sneaky.lua:1: module \"../../etc/passwd\" not found: a library name is words"), "{text}");
}
