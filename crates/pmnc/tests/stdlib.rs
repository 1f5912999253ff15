//! The helper families (`pmnc.base64` ... `pmnc.csv`) through the real binary: known vectors from
//! Lua, hostile inputs (billion laughs, a gzip bomb, catastrophic backtracking) refused or answered
//! with the process still up, and big inputs run off the worker while quick requests go on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;

const VECTORS: &str = r#"
local M = {}
-- Module top-level code cannot wait: a big input there is handled inline.
local TOP = pmnc.crypto.sha256(string.rep("x", 100000))
local function eq(a, b, what)
  if a ~= b then error(what .. ": got " .. tostring(a) .. ", want " .. tostring(b), 2) end
end
local function fails(f, want, ...)
  local ok, e = pcall(f, ...)
  if ok then error("no error, want " .. want, 2) end
  if not tostring(e):find(want, 1, true) then error("error " .. tostring(e) .. ", want " .. want, 2) end
end
function M.handle(request)
  local hex, b64 = pmnc.hex.encode, pmnc.base64
  -- RFC 4648
  eq(b64.encode("foobar"), "Zm9vYmFy", "base64")
  eq(b64.encode("fooba"), "Zm9vYmE=", "base64 padded")
  eq(b64.encode("fooba", { pad = false }), "Zm9vYmE", "base64 unpadded")
  eq(b64.encode("\251\255\191", { url = true }), "-_-_", "base64url")
  eq(b64.decode("Zm9vYg"), "foob", "base64 decode without padding")
  eq(b64.decode("-_-_", { url = true }), "\251\255\191", "base64url decode")
  eq(hex("foobar"), "666f6f626172", "hex")
  eq(pmnc.hex.decode("666F6f"), "foo", "hex decode")
  -- FIPS 180 / RFC 1321 / RFC 4231 / RFC 2202
  eq(hex(pmnc.crypto.sha1("abc")), "a9993e364706816aba3e25717850c26c9cd0d89d", "sha1")
  eq(hex(pmnc.crypto.sha256("abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "sha256")
  eq(hex(pmnc.crypto.sha512("abc")):sub(1, 32), "ddaf35a193617abacc417349ae204131", "sha512")
  eq(hex(pmnc.crypto.md5("abc")), "900150983cd24fb0d6963f7d28e17f72", "md5")
  eq(hex(pmnc.crypto.hmac("sha256", "Jefe", "what do ya want for nothing?")),
    "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843", "hmac-sha256")
  eq(hex(pmnc.crypto.hmac("sha1", "Jefe", "what do ya want for nothing?")),
    "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79", "hmac-sha1")
  eq(#pmnc.crypto.random(32), 32, "random length")
  assert(pmnc.crypto.random(16) ~= pmnc.crypto.random(16), "random bytes repeat")
  eq(pmnc.crypto.equal("abc", "abc"), true, "equal")
  eq(pmnc.crypto.equal("abc", "abd"), false, "not equal")
  local h = pmnc.crypto.password_hash("s3cret")
  eq(h:sub(1, 10), "$argon2id$", "argon2id")
  eq(pmnc.crypto.password_verify("s3cret", h), true, "password ok")
  eq(pmnc.crypto.password_verify("guess", h), false, "password wrong")
  -- UUIDs
  local u4, u7 = pmnc.uuid.v4(), pmnc.uuid.v7()
  assert(u4:match("^%x+%-%x+%-4%x+%-[89ab]%x+%-%x+$"), u4)
  assert(u7:match("^%x+%-%x+%-7%x+%-[89ab]%x+%-%x+$"), u7)
  assert(pmnc.uuid.v7() > u7, "v7 sorts by time")
  -- RFC 3339 / RFC 9110
  eq(pmnc.time.parse("1996-12-19T16:39:57-08:00", "rfc3339"), 851042397, "rfc3339 parse")
  eq(pmnc.time.format(851042397, "rfc3339"), "1996-12-20T00:39:57Z", "rfc3339 format")
  eq(pmnc.time.format(851042397, "rfc3339", "America/Los_Angeles"), "1996-12-19T16:39:57-08:00", "zone")
  eq(pmnc.time.format(784111777, "http"), "Sun, 06 Nov 1994 08:49:37 GMT", "http date")
  eq(pmnc.time.parse("Sun, 06 Nov 1994 08:49:37 GMT", "http"), 784111777, "http parse")
  eq(pmnc.time.format(0, "%Y-%m-%d %H:%M", "Europe/Berlin"), "1970-01-01 01:00", "strftime")
  assert(math.abs(pmnc.time.now() - os.time()) < 5, "now")
  -- URLs
  eq(pmnc.url.encode("a b&c/é"), "a%20b%26c%2F%C3%A9", "url encode")
  eq(pmnc.url.decode("a%20b+c"), "a b+c", "url decode")
  eq(pmnc.url.decode("a%20b+c", { plus = true }), "a b c", "form decode")
  local u = pmnc.url.parse("https://u:p@example.com:8443/a/b?x=1&y=2&y=3#top")
  eq(u.scheme .. " " .. u.user .. " " .. u.password .. " " .. u.host .. " " .. u.port, "https u p example.com 8443", "url parts")
  eq(u.path .. " " .. u.query .. " " .. u.fragment, "/a/b x=1&y=2&y=3 top", "url parts 2")
  eq(u.params.x .. " " .. u.params.y[1] .. u.params.y[2], "1 23", "url params")
  eq(pmnc.url.query({ b = "x y", a = 1, c = { "1", "2" } }), "a=1&b=x+y&c=1&c=2", "query")
  -- XML
  local doc = pmnc.xml.decode('<s:E xmlns:s="urn:s"><B n="1">a &amp; b</B><C/></s:E>')
  eq(doc.name, "s:E", "xml name")
  eq(doc.ns, "urn:s", "xml ns")
  eq(doc.children[1].attrs.n, "1", "xml attr")
  eq(doc.children[1].text, "a & b", "xml text")
  eq(doc.children[2].name, "C", "xml empty")
  eq(pmnc.xml.encode(doc), '<s:E xmlns:s="urn:s"><B n="1">a &amp; b</B><C/></s:E>', "xml round trip")
  -- regular expressions
  local m = pmnc.re.match("key=42;", "(?P<k>\\w+)=(\\d+)")
  eq(m[0] .. " " .. m[1] .. " " .. m[2] .. " " .. m.k, "key=42 key 42 key", "re match")
  eq(pmnc.re.match("abc", "x"), nil, "re no match")
  local s, e = pmnc.re.find("hello world", "o\\s*w")
  eq(s .. "-" .. e, "5-7", "re find")
  local all = {}
  for m in pmnc.re.gmatch("a1b22c333", "\\d+") do all[#all + 1] = m[0] end
  eq(table.concat(all, ","), "1,22,333", "re gmatch")
  local out, n = pmnc.re.gsub("a=1, b=2", "(\\w)=(\\d)", "$2=$1")
  eq(out .. " " .. n, "1=a, 2=b 2", "re gsub")
  eq((pmnc.re.gsub("a=1, b=2", "\\d", function(m) return m[0] * 10 end)), "a=10, b=20", "re gsub function")
  eq((pmnc.re.gsub("x y", "\\w", { x = "X" })), "X y", "re gsub table")
  eq(table.concat(pmnc.re.split("a , b,c", "\\s*,\\s*"), "|"), "a|b|c", "re split")
  -- compression
  local text = string.rep("compress me ", 1000)
  eq(pmnc.compress.gunzip(pmnc.compress.gzip(text)), text, "gzip")
  eq(pmnc.compress.inflate(pmnc.compress.deflate(text, 9)), text, "deflate")
  eq(pmnc.compress.unzstd(pmnc.compress.zstd(text)), text, "zstd")
  eq(pmnc.compress.gunzip(pmnc.hex.decode("1f8b0800000000000003cb48cdc9c9070086a6103605000000")), "hello", "gzip vector")
  -- CSV
  local rows = pmnc.csv.decode('name,note\r\nann,"a, b"\r\nbob,"say ""hi"""\r\n')
  eq(rows[1].name .. "|" .. rows[1].note .. "|" .. rows[2].note, 'ann|a, b|say "hi"', "csv decode")
  eq(pmnc.csv.encode({ { "a", "b,c" }, { 1, 2 } }), 'a,"b,c"\r\n1,2\r\n', "csv encode")
  eq(pmnc.csv.encode({ { n = 1, m = "x" } }, { header = { "n", "m" } }), "n,m\r\n1,x\r\n", "csv keyed")
  -- errors name the function and come with the caller's position
  fails(pmnc.base64.decode, "pmnc.base64.decode: invalid byte '!' at offset 7", "Zm9vYmF!")
  fails(pmnc.hex.decode, "pmnc.hex.decode: odd number of digits", "abc")
  fails(pmnc.crypto.hmac, 'pmnc.crypto.hmac: unknown algorithm "sha3"', "sha3", "k", "d")
  fails(pmnc.time.format, 'pmnc.time.format: unknown time zone "Mars/Olympus"', 0, "rfc3339", "Mars/Olympus")
  fails(pmnc.time.parse, "pmnc.time.parse:", "yesterday", "rfc3339")
  fails(pmnc.url.decode, "pmnc.url.decode: invalid escape at offset 1", "a%zz")
  fails(pmnc.re.match, "pmnc.re.match: invalid pattern", "x", "(")
  fails(pmnc.compress.gunzip, "pmnc.compress.gunzip: corrupt input", "not gzip")
  fails(pmnc.csv.encode, "pmnc.csv.encode: row 1 must be a table, got string", { "x" })
  fails(pmnc.xml.decode, "pmnc.xml.decode: line 1: unknown entity &nope;", "<a>&nope;</a>")
  -- big inputs (over 64 KiB) go to the blocking pool and come back the same
  local big = string.rep("0123456789abcdef", 8192)
  eq(pmnc.hex.decode(pmnc.hex.encode(big)), big, "big hex")
  eq(pmnc.base64.decode(pmnc.base64.encode(big)), big, "big base64")
  eq(pmnc.crypto.sha256(string.rep("x", 100000)), TOP, "big digest in a request and at load")
  eq(pmnc.compress.gunzip(pmnc.compress.gzip(big), 1024 * 1024), big, "big gzip")
  eq(#pmnc.xml.decode("<r>" .. string.rep("<i>x</i>", 20000) .. "</r>").children, 20000, "big xml")
  eq(#pmnc.csv.decode(string.rep("a,b\r\n", 20000)), 19999, "big csv")
  local n = 0
  for _ in pmnc.re.gmatch(big, "abc") do n = n + 1 end
  eq(n, 8192, "big gmatch")
  eq(select(2, pmnc.re.gsub(big, "a", "A")), 8192, "big gsub")
  eq(#pmnc.re.split(big, "f"), 8193, "big split")
  eq(pmnc.re.find(big .. "XYZ", "XYZ"), #big + 1, "big find")
  fails(pmnc.base64.decode, "pmnc.base64.decode: invalid byte '!' at offset 0", string.rep("!", 100000))
  -- a coroutine of module code cannot wait either: inline there
  local co = coroutine.wrap(function() return pmnc.hex.encode(big) end)
  eq(co(), pmnc.hex.encode(big), "big input in a coroutine of module code")
  -- hostile arguments
  fails(pmnc.crypto.random, "pmnc.crypto.random: the number of bytes must be from 0 to 67108864, got -1", -1)
  fails(pmnc.crypto.random, "pmnc.crypto.random: the number of bytes must be an integer, got 1.5", 1.5)
  fails(pmnc.re.match, "pmnc.re.match: invalid pattern", "x", "(\\w{100}){100}")
  fails(pmnc.re.match, "pmnc.re.match: a pattern of 40000 bytes is over the limit", "x", string.rep("a", 40000))
  fails(pmnc.compress.gunzip, "pmnc.compress.gunzip: max_size must be from 0 to 1073741824", "", 2 ^ 40)
  fails(pmnc.compress.gzip, "pmnc.compress.gzip: level must be from 0 to 9, got 11", "x", 11)
  fails(pmnc.xml.encode, "pmnc.xml.encode: /a: \"1x\" is not an XML name", { name = "a", children = { { name = "1x" } } })
  fails(pmnc.xml.encode, "nested deeper than 128 levels", (function() local t = { name = "a" }; t.children = { t }; return t end)())
  fails(pmnc.url.query, 'pmnc.url.query: value of "f" must be a string, number or boolean, got function', { f = print })
  fails(pmnc.crypto.equal, "pmnc.crypto.equal: both arguments must be strings, got string and nil", "a")
  fails(pmnc.base64.encode, "pmnc.base64.encode: data must be a string, got table", {})
  fails(pmnc.crypto.password_verify, "pmnc.crypto.password_verify: not a PHC hash string", "pw", "plain")
  fails(pmnc.re.gsub, "pmnc.re.gsub: the replacement must give a string, got table", "ab", "a", function() return {} end)
  local ok, e = pcall(function() local v = pmnc.base64.decode("!!"); return v end)
  assert(e:find("http%.lua:%d+: pmnc%.base64%.decode"), "position of the caller: " .. e)
  -- the helpers with a fast path in front (crates/stdlib/src/fast.rs): what it does not take
  -- goes to the wrapper, whose errors still carry the caller's position
  for _, call in ipairs({
    function() return pmnc.base64.encode({}) end,
    function() return pmnc.base64.encode(12) end,
    function() return pmnc.hex.encode(nil) end,
    function() return pmnc.crypto.sha1() end,
    function() return pmnc.crypto.hmac("sha3", "k", "d") end,
    function() return pmnc.crypto.hmac("sha1", "k") end,
  }) do
    local ok, e = pcall(call)
    assert(not ok and type(e) == "string" and e:find("^[^:]*http%.lua:%d+: pmnc%.%w+%.%w+"), "position of the caller: " .. tostring(e))
  end
  eq(pmnc.base64.encode("", { pad = false }), "", "empty, with options")
  eq(pmnc.base64.encode("\251\255", { url = true, pad = false }), "-_8", "options go past the fast path")
  eq(pmnc.hex.encode(""), "", "empty hex")
  eq(#pmnc.crypto.sha512(""), 64, "empty digest")
  eq(pmnc.crypto.hmac("md5", "", ""), pmnc.hex.decode("74e6f7298a9c2d168935f58c001bad88"), "empty hmac")
  -- results made one after another from the one scratch buffer stay apart
  local made = {}
  for i = 1, 200 do made[i] = pmnc.base64.encode(string.rep("y", 3000 + i)) end
  for i = 1, 200 do eq(pmnc.base64.decode(made[i]), string.rep("y", 3000 + i), "result " .. i) end
  return "ok"
end
return M
"#;

#[test]
fn known_vectors_and_errors_from_lua() {
    let t = Tree::new();
    // Debug builds of the regex and XML code are slow; the deadline is not what is tested here.
    t.write("c/cage.toml", &format!("request_timeout = \"120s\"\n{}", http_cage_toml("")));
    t.write("c/http.lua", VECTORS);
    let s = Server::start(&t.path().join("c"), &[]);
    let r = get(s.addr("http"), "/");
    assert_eq!(r.text(), "ok", "status {}", r.status);
}

const HOSTILE: &str = r#"
local M = {}
function M.handle(request)
  local what = request.path:sub(2)
  local ok, e
  if what == "xml" then
    ok, e = pcall(pmnc.xml.decode, request.body)
  elseif what == "gunzip" then
    ok, e = pcall(pmnc.compress.gunzip, request.body)
  elseif what == "big-gunzip" then
    -- A big allowance sends the work off the worker; the limit still holds.
    ok, e = pcall(pmnc.compress.gunzip, request.body, 8 * 1024 * 1024)
  elseif what == "redos" then
    local m = pmnc.re.match(string.rep("a", 50000) .. "!", "(a+)+$")
    local m2 = pmnc.re.match(string.rep("a", 50000), "(a+)+$")
    return tostring(m) .. " " .. #m2[0]
  elseif what == "ping" then
    return "pong"
  end
  return tostring(ok) .. " " .. tostring(e)
end
return M
"#;

fn gzip_of_zeros(n: usize) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..n >> 20 {
        e.write_all(&zeros).unwrap();
    }
    e.finish().unwrap()
}

#[test]
fn hostile_inputs_are_refused_and_the_process_stays_up() {
    let t = Tree::new();
    t.write("c/cage.toml", &http_cage_toml("max_body_size = \"4MiB\"\n"));
    t.write("c/http.lua", HOSTILE);
    let s = Server::start(&t.path().join("c"), &[]);
    let addr = s.addr("http");
    let laughs = r#"<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol9 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<lolz>&lol9;</lolz>"#;
    let r = post(addr, "/xml", "application/xml", laughs.as_bytes());
    assert!(r.text().starts_with("false pmnc.xml.decode: line 2: a DTD (<!DOCTYPE ...>) is not allowed"), "{}", r.text());
    let xxe = r#"<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><r>&x;</r>"#;
    let r = post(addr, "/xml", "application/xml", xxe.as_bytes());
    assert!(r.text().contains("a DTD (<!DOCTYPE ...>) is not allowed"), "{}", r.text());
    let deep = "<a>".repeat(10_000);
    let r = post(addr, "/xml", "application/xml", deep.as_bytes());
    assert!(r.text().contains("elements nested deeper than 128 levels"), "{}", r.text());

    // 256 MiB of zeros in about 256 KiB of gzip.
    let bomb = gzip_of_zeros(256 << 20);
    assert!(bomb.len() < 1 << 20, "{}", bomb.len());
    let r = post(addr, "/gunzip", "application/gzip", &bomb);
    assert_eq!(r.text(), "false pmnc.compress.gunzip: output over max_size (1048576 bytes); pass a larger max_size if it is expected");
    let r = post(addr, "/big-gunzip", "application/gzip", &bomb);
    assert!(r.text().contains("output over max_size (8388608 bytes)"), "{}", r.text());

    let r = get(addr, "/redos");
    assert_eq!(r.text(), "nil 50000");
    assert_eq!(get(addr, "/ping").text(), "pong");
}

const HEAVY: &str = r#"
local M = {}
local running = false
function M.handle(request)
  if request.path == "/heavy" then
    running = true
    pmnc.log.info("heavy started")
    local data = pmnc.crypto.random(4 * 1024 * 1024)
    local total = 0
    for _ = 1, 10 do total = total + #pmnc.compress.gzip(data) end
    running = false
    return tostring(total > 10 * 4 * 1024 * 1024)
  end
  return running and "running" or "idle"
end
return M
"#;

/// With one worker, quick requests answer while a request gzips 40 MiB: every one of them finds
/// the heavy request still running (an inline gzip would hold the worker, and they would be
/// answered only after it, finding it done).
#[test]
fn big_inputs_leave_the_worker_to_quick_requests() {
    let t = Tree::new();
    t.write("c/cage.toml", &format!("request_timeout = \"300s\"\n[lua]\nrequest_memory_limit = \"512MiB\"\n{}", http_cage_toml("")));
    t.write("c/http.lua", HEAVY);
    let mut s = Server::start_with_workers(&t.path().join("c"), 1, &[]);
    let addr = s.addr("http");
    assert_eq!(get(addr, "/quick").text(), "idle");
    let heavy = std::thread::spawn(move || get(addr, "/heavy").text());
    assert!(s.wait_for("heavy started", Duration::from_secs(60)).is_some(), "the heavy request did not start");
    for i in 0..5 {
        assert_eq!(get(addr, "/quick").text(), "running", "quick request {i} waited for the heavy one");
    }
    assert_eq!(heavy.join().unwrap(), "true");
    assert_eq!(get(addr, "/quick").text(), "idle");
}
