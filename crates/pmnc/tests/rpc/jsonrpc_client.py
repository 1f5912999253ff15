"""Calls a pmnc jsonrpc interface with jsonrpcclient (PyPI) and requests; argv: URL.
Prints one line per finding on failure (exit 1), else 'jsonrpc client: N checks passed'."""
import json
import sys
import time

import requests
from jsonrpcclient import Error, Ok, notification, parse, request

URL = sys.argv[1]
checks = 0
failed = []


def check(cond, what):
    global checks
    checks += 1
    if not cond:
        failed.append(what)


def post(payload, content_type="application/json", raw=None):
    data = raw if raw is not None else json.dumps(payload)
    return requests.post(URL, data=data, headers={"content-type": content_type}, timeout=10)


def call(method, params=None):
    r = post(request(method, params=params) if params is not None else request(method))
    check(r.status_code == 200, f"{method}: status {r.status_code}")
    return parse(r.json())


# Results: by position, several values, none, by name.
r = call("echo", [1, "x", [1, 2], {"a": 1}])
check(isinstance(r, Ok) and r.result == [1, "x", [1, 2], {"a": 1}], f"echo many: {r}")
r = call("one", ["only"])
check(isinstance(r, Ok) and r.result == "only", f"one: {r}")
r = call("one")
check(isinstance(r, Ok) and r.result is None, f"one without params: {r}")
r = call("sum", {"a": 2, "b": 40})
check(isinstance(r, Ok) and r.result == 42, f"named params: {r}")
r = call("math.add", [2, 3])
check(isinstance(r, Ok) and r.result == 5, f"public name of a table mapping: {r}")

# Errors.
for name in ["hidden", "nope", "calc.hidden"]:
    r = call(name, [])
    check(isinstance(r, Error) and r.code == -32601, f"unexposed {name}: {r}")
r = parse(post({"jsonrpc": "2.0", "method": "one", "params": 5, "id": 9}).json())
check(isinstance(r, Error) and r.code == -32602 and r.id == 9, f"params neither array nor object: {r}")
r = call("refuse", [-1])
check(isinstance(r, Error) and r.code == -32602 and r.message == "x must be positive" and r.data == {"got": -1}, f"Lua error table: {r}")
r = call("custom", [])
check(isinstance(r, Error) and r.code == 42 and r.message == "custom" and r.data == [1, 2], f"custom error table: {r}")
r = call("fail", [])
check(isinstance(r, Error) and r.code == -32603 and "secret" not in json.dumps(r.message) and "secret" not in json.dumps(r.data), f"string error: {r}")
fail_id = r.data.get("request_id") if isinstance(r, Error) and isinstance(r.data, dict) else None
check(bool(fail_id), f"the internal error names its request id: {r}")
t = time.monotonic()
r = call("slow", [])
check(isinstance(r, Error) and r.code == -32000, f"deadline: {r}")
check(time.monotonic() - t < 4, "the deadline ends the call")
r = post(None, raw="{").json()
check(r.get("error", {}).get("code") == -32700 and r.get("id") is None, f"parse error: {r}")
r = post({"foo": "boo"}).json()
check(r.get("error", {}).get("code") == -32600 and r.get("id") is None, f"invalid request: {r}")
r = post([]).json()
check(r.get("error", {}).get("code") == -32600, f"empty batch: {r}")
r = post([request("one", params=[i]) for i in range(11)]).json()
check(isinstance(r, dict) and r.get("error", {}).get("code") == -32600, f"batch over max_batch: {r}")

# Batches: order, notifications left out, errors in place.
before = parse(post(request("count")).json()).result
batch = [request("one", params=["a"]), notification("note", params=[5]), {"jsonrpc": "2.0", "method": 1, "id": 3},
         request("nope"), request("echo", params=[7, 8])]
r = post(batch).json()
check(isinstance(r, list) and len(r) == 4, f"batch answers: {r}")
if isinstance(r, list) and len(r) == 4:
    p = [parse(x) for x in r]
    check(isinstance(p[0], Ok) and p[0].result == "a", f"batch[0]: {p[0]}")
    check(isinstance(p[1], Error) and p[1].code == -32600 and p[1].id == 3, f"batch[1]: {p[1]}")
    check(isinstance(p[2], Error) and p[2].code == -32601, f"batch[2]: {p[2]}")
    check(isinstance(p[3], Ok) and p[3].result == [7, 8], f"batch[3]: {p[3]}")
r = post([notification("note", params=[1]), notification("note", params=[2])])
check(r.status_code == 204 and r.content == b"", f"a batch of notifications: {r.status_code} {r.content!r}")
r = post(notification("note", params=[10]))
check(r.status_code == 204 and r.content == b"", f"a notification: {r.status_code} {r.content!r}")
after = parse(post(request("count")).json()).result
check(after - before == 18, f"notifications ran: {before} -> {after}")
t = time.monotonic()
r = post([request("nap", params=[0.6]), request("nap", params=[0.6]), request("nap", params=[0.6])]).json()
took = time.monotonic() - t
check(isinstance(r, list) and [parse(x).result for x in r] == [0.6, 0.6, 0.6], f"parallel batch: {r}")
check(took < 1.5, f"the calls of a batch run in parallel: {took:.2f}s")

# HTTP level.
r = requests.get(URL, timeout=10)
check(r.status_code == 405 and r.headers.get("allow") == "POST", f"GET: {r.status_code} {r.headers}")
r = post(request("one", params=[1]), content_type="text/plain")
check(r.status_code == 415, f"wrong content type: {r.status_code}")
r = requests.post(URL + "elsewhere", json=request("one", params=[1]), timeout=10)
check(r.status_code == 404, f"another path: {r.status_code}")
r = post(request("one", params=["x" * 100000]))
check(r.status_code == 200 and parse(r.json()).result == "x" * 100000, f"a big body (read off the worker): {r.status_code}")
r = post(request("one", params=["x" * 300000]))
check(r.status_code == 413, f"oversize body: {r.status_code}")
r = post(request("one", params=[1]), content_type="application/json; charset=utf-8")
check(r.status_code == 200 and parse(r.json()).result == 1, f"content type with charset: {r.status_code}")

if failed:
    for f in failed:
        print("FAILED:", f)
    sys.exit(1)
print(f"jsonrpc client: {checks} checks passed; internal error request id {fail_id}")
