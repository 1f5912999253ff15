"""Calls a pmnc xmlrpc interface with Python's xmlrpc.client; argv: URL.
Prints one line per finding on failure (exit 1), else 'xmlrpc client: N checks passed'."""
import datetime
import sys
import urllib.error
import urllib.request
import xmlrpc.client

URL = sys.argv[1]
proxy = xmlrpc.client.ServerProxy(URL, allow_none=True, use_builtin_types=True)
checks = 0
failed = []


def check(cond, what):
    global checks
    checks += 1
    if not cond:
        failed.append(what)


def fault_of(f, *args):
    try:
        r = f(*args)
        return ("no fault", r)
    except xmlrpc.client.Fault as e:
        return (e.faultCode, e.faultString)


def raw(body, content_type="text/xml"):
    req = urllib.request.Request(URL, data=body, headers={"content-type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# Every type there and back through a Lua function that returns its argument.
when = datetime.datetime(2026, 7, 6, 12, 30, 5)
values = [7, -2**31, 2**31 - 1, True, False, "plain", "a <b> & 'c' \"d\"\r\n\t", "\u00e9\u20ac\U0001F600", 2.5, -0.0, 1e300,
          when, b"\x00\xff\x01binary", {"a": 1, "b": [1, "x"], "c": {"d": True}}, [1, "x", [2.5, False]], [], None,
          [None, 1, None]]
for v in values:
    got = proxy.echo(v)
    check(got == v and type(got) is type(v), f"round trip of {v!r}: got {got!r}")
got = proxy.echo({})
check(got == {}, f"an empty struct: {got!r}")
got = proxy.echo(b"utf8 bytes")
check(got == "utf8 bytes", f"base64 of UTF-8 text comes back as a string: {got!r}")
got = proxy.echo(1, "two")
check(got == [1, "two"], f"several returned values are an array: {got!r}")
got = proxy.big()
check(got == 2**40, f"an i8 from the server: {got!r}")
got = proxy.kinds()
check(got == {"when": when, "bytes": b"\x00\x01", "int": 1, "nothing": [None]}, f"typed values from Lua: {got!r}")
check(proxy.sum({"a": 2, "b": 40}) == 42, "a struct is one table argument")

# Faults.
code, text = fault_of(proxy.refuse, -1)
check((code, text) == (-32602, "x must be positive"), f"a Lua error table: {code} {text}")
code, text = fault_of(proxy.fail)
check(code == -32603 and "request id" in text and "secret" not in text, f"a string error: {code} {text}")
fail_id = text.rsplit(" ", 1)[-1].rstrip(")")
for name in ["hidden", "nope", "system.listMethods"]:
    code, text = fault_of(getattr(proxy, name))
    check(code == -32601, f"unexposed {name}: {code} {text}")
code, text = fault_of(proxy.slow)
check(code == -32000, f"the deadline: {code} {text}")

# Hostile and malformed bodies.
laughs = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">]>
<methodCall><methodName>echo</methodName><params><param><value>&lol2;</value></param></params></methodCall>"""
status, body = raw(laughs)
try:
    xmlrpc.client.loads(body)
    check(False, "the billion laughs got an answer")
except xmlrpc.client.Fault as e:
    check(status == 200 and e.faultCode == -32700 and "DTD" in e.faultString, f"billion laughs: {status} {e}")
external = b"""<?xml version="1.0"?><methodCall><methodName>echo</methodName><params><param><value>&xxe;</value></param></params></methodCall>"""
status, body = raw(external)
try:
    xmlrpc.client.loads(body)
    check(False, "an undefined entity got an answer")
except xmlrpc.client.Fault as e:
    check(e.faultCode == -32700 and "entity" in e.faultString, f"entity: {e}")
for bad in [b"<methodCall><methodName>echo</methodName><params>", b"not xml at all", b"<methodCall><params/></methodCall>",
            b"<methodCall><methodName>echo</methodName><params><param><value><int>x</int></value></param></params></methodCall>"]:
    status, body = raw(bad)
    try:
        xmlrpc.client.loads(body)
        check(False, f"{bad!r} got an answer")
    except xmlrpc.client.Fault as e:
        check(e.faultCode == -32700, f"{bad!r}: {e}")
check(proxy.echo("y" * 100000) == "y" * 100000, "a big call (read off the worker)")
status, _ = raw(b"<methodCall><methodName>echo</methodName><params><param><value>" + b"x" * 300000 + b"</value></param></params></methodCall>")
check(status == 413, f"oversize: {status}")
status, _ = raw(b"<methodCall/>", content_type="application/json")
check(status == 415, f"wrong content type: {status}")
try:
    urllib.request.urlopen(URL, timeout=10)
    check(False, "GET answered")
except urllib.error.HTTPError as e:
    check(e.code == 405, f"GET: {e.code}")

if failed:
    for f in failed:
        print("FAILED:", f)
    sys.exit(1)
print(f"xmlrpc client: {checks} checks passed; internal error request id {fail_id}")
