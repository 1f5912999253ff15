#!/usr/bin/env python3
"""Parked clients: process RSS per parked long-poll (or idle WebSocket) and the time one publish
takes to reach all of them.

For each count N (default: 10000, then the most the open-file hard limit allows):
  1. starts the server command (default: our examples/chat, copied to a temp folder, on a free
     port) and warms it up with a few requests;
  2. reads the server's RSS, opens N connections that each park on GET /wait?room=bench
     (MODE=longpoll) or open a WebSocket to /ws?room=bench (MODE=websocket), and waits until
     the server holds all of them (GET /stats?room=bench says "waiting": N; a server without
     /stats is given until its RSS stops growing);
  3. reads the RSS again: (after - before) / N is the cost of one parked client;
  4. POSTs one message to /send?room=bench and times until the last client has it.

Any server that offers /wait, /send and /ws with the chat's meaning can be measured with the
same run (SERVER="CMD ... {port} ..."; {port} is replaced by the port to listen on).

In MODE=longpoll each count is then measured again with nginx and its Lua module as the peer
(Debian's nginx and libnginx-mod-http-lua, the same number of worker processes, access log
off): /wait parks on an `ngx.semaphore` of its worker, /send stores the message in a shared
dictionary and wakes its own worker's waiters at once and the other workers' through a 1 ms
timer each worker runs. RSS and CPU are of nginx's master and workers together; the ratio
pmnc/nginx+Lua is printed. NGINX=0 skips the peer.

Python standard library only. Never fails because of a figure.

    bench/longpoll.py                        # MODE=longpoll, N = 10000 and the limit
    MODE=websocket bench/longpoll.py
    MODE=websocket DEFLATE=1 bench/longpoll.py   # sessions that agreed permessage-deflate
    COUNTS=2000 WORKERS=1 bench/longpoll.py
    SERVER="node peer.js {port}" bench/longpoll.py
    NGINX=0 bench/longpoll.py                # without the nginx + Lua peer
"""

import base64
import json
import os
import re
import resource
import selectors
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
PMNC = os.path.join(TARGET, "release", "pmnc")
MODE = os.environ.get("MODE", "longpoll")
# DEFLATE=1: WebSockets offer permessage-deflate as Chromium does (the server takes it with a
# 512-byte client window), to measure what the extension adds to an idle session.
EXTENSIONS = "sec-websocket-extensions: permessage-deflate; client_max_window_bits\r\n" if os.environ.get("DEFLATE") == "1" else ""
WORKERS = os.environ.get("WORKERS", "2")
FANOUT_TARGET_MS, FANOUT_GOAL_MS = 250, 100
RSS_TARGET_KB, RSS_GOAL_KB = 6.0, 4.0


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def tree(pid):
    """The process and its descendants (nginx's master and its workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def rss_kb(pid):
    """RSS of the process and its descendants."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def request(port, method, path, body=b"", timeout=10):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    head = f"{method} {path} HTTP/1.1\r\nhost: bench\r\nconnection: close\r\ncontent-length: {len(body)}\r\ncontent-type: application/json\r\n\r\n"
    s.sendall(head.encode() + body)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, body


NGINX_MODULES = ("/usr/lib/nginx/modules/ndk_http_module.so", "/usr/lib/nginx/modules/ngx_http_lua_module.so")

# The peer's handlers. A worker keeps, per room, a semaphore its parked requests wait on and the
# version of the room's last message it has woken them for; the message and its version live in
# a shared dictionary, so that a publish reaches the waiters of every worker.
NGINX_LUA_INIT = r"""
local semaphore = require "ngx.semaphore"
local dict = ngx.shared.rooms
ROOMS = {}
function ROOM(name)
  local r = ROOMS[name]
  if not r then
    r = { sema = semaphore.new(0), seen = dict:get(name .. ":v") or 0 }
    ROOMS[name] = r
  end
  return r
end
-- A whole answer with its length (the bench's client reads /stats and /send without chunking).
function ANSWER(text, status)
  ngx.status = status or 200
  ngx.header["content-type"] = "application/json"
  ngx.header["content-length"] = #text
  ngx.print(text)
end
function WAKE(name, r)
  local v = dict:get(name .. ":v") or 0
  if v == r.seen then return end
  r.seen = v
  r.message = dict:get(name .. ":m")
  local waiting = -r.sema:count()
  if waiting > 0 then r.sema:post(waiting) end
end
ngx.timer.every(0.001, function(premature)
  if premature then return end
  for name, r in pairs(ROOMS) do WAKE(name, r) end
end)
"""
NGINX_WAIT = r"""
local name = ngx.var.arg_room or "main"
local r = ROOM(name)
local dict = ngx.shared.rooms
dict:incr(name .. ":w", 1, 0)
local ok = r.sema:wait(math.min(tonumber(ngx.var.arg_timeout) or 25, 55))
dict:incr(name .. ":w", -1, 0)
if not ok then return ngx.exit(204) end
ANSWER(r.message)
"""
NGINX_SEND = r"""
local name = ngx.var.arg_room or "main"
ngx.req.read_body()
local body = ngx.req.get_body_data()
if not body or #body > 4000 then return ANSWER('"send a JSON object {name, text}"', 400) end
local dict = ngx.shared.rooms
dict:set(name .. ":m", body)
dict:incr(name .. ":v", 1, 0)
WAKE(name, ROOM(name))
ANSWER('{"delivered":' .. (dict:get(name .. ":w") or 0) .. '}')
"""
NGINX_STATS = r"""
ANSWER('{"waiting":' .. (ngx.shared.rooms:get((ngx.var.arg_room or "main") .. ":w") or 0) .. '}')
"""


def nginx_ready():
    return os.environ.get("NGINX", "1") == "1" and MODE == "longpoll" and not os.environ.get("SERVER") \
        and shutil.which("nginx") is not None and all(os.path.exists(m) for m in NGINX_MODULES)


def nginx_argv(port, tmp):
    """Writes the peer's nginx.conf in a folder of its own; the command that runs it."""
    d = tempfile.mkdtemp(prefix="nginx-", dir=tmp)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    block = lambda code: "{" + code + "}"
    conf = f"""load_module {NGINX_MODULES[0]};
load_module {NGINX_MODULES[1]};
worker_processes {WORKERS};
worker_rlimit_nofile {hard};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections {hard}; }}
http {{
    access_log off;
    client_body_temp_path {d};
    lua_shared_dict rooms 1m;
    init_worker_by_lua_block {block(NGINX_LUA_INIT)}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /wait {{ content_by_lua_block {block(NGINX_WAIT)} }}
        location = /send {{ content_by_lua_block {block(NGINX_SEND)} }}
        location = /stats {{ content_by_lua_block {block(NGINX_STATS)} }}
    }}
}}
"""
    with open(os.path.join(d, "nginx.conf"), "w") as f:
        f.write(conf)
    return ["nginx", "-c", os.path.join(d, "nginx.conf"), "-p", d]


def start_server(port, tmp, peer=None):
    command = os.environ.get("SERVER")
    if peer == "nginx":
        argv = nginx_argv(port, tmp)
    elif command:
        argv = shlex.split(command.replace("{port}", str(port)))
    else:
        if not os.path.exists(PMNC) or os.environ.get("BUILD", "1") == "1":
            subprocess.run(["cargo", "build", "--release", "-p", "pmnc"], cwd=ROOT, check=True)
        cage = tempfile.mkdtemp(prefix="chat-", dir=tmp)
        shutil.rmtree(cage)
        shutil.copytree(os.path.join(ROOT, "examples", "chat"), cage)
        toml = os.path.join(cage, "cage.toml")
        with open(toml) as f:
            text = f.read()
        with open(toml, "w") as f:
            # The access log off, as the nginx peer runs (`access_log off`): 10,000 answers are
            # otherwise 10,000 log lines written during the fan-out.
            f.write(re.sub(r'listen = "127\.0\.0\.1:\d+"', f'listen = "127.0.0.1:{port}"\naccess_log = "off"', text))
        argv = [PMNC, "run", cage, "--workers", WORKERS, "--no-watch"]
    log = open(os.path.join(tmp, f"server-{port}.log"), "w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited at start; see {log.name}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("the server did not listen within 30 s")


def waiting(port):
    try:
        status, body = request(port, "GET", "/stats?room=bench")
        if status == 200:
            return json.loads(body).get("waiting")
    except (OSError, ValueError):
        pass
    return None


def open_longpolls(port, n):
    socks = []
    req = b"GET /wait?room=bench&timeout=55 HTTP/1.1\r\nhost: bench\r\n\r\n"
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(req)
        socks.append(s)
    return socks


def open_websockets(port, n):
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall(
            (
                "GET /ws?room=bench HTTP/1.1\r\nhost: bench\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                f"sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\n{EXTENSIONS}\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                sys.exit(f"websocket {i}: closed during the handshake")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            sys.exit(f"websocket {i}: no 101: {head[:200]!r}")
        socks.append(s)
    return socks


def wait_parked(port, proc, n):
    """Until the server holds all n clients: /stats, or else RSS stable for 2 s (bounded 120 s)."""
    deadline = time.time() + 120
    last, stable_since = None, time.time()
    while time.time() < deadline:
        w = waiting(port)
        if w is not None:
            if w >= n:
                return True
        else:
            r = rss_kb(proc.pid)
            if r != last:
                last, stable_since = r, time.time()
            elif time.time() - stable_since > 2:
                return True
        time.sleep(0.1)
    return False


def settled_rss(pid):
    """RSS once it has stopped changing: the allocator returns the garbage of the burst of
    connections to the system with a delay (mimalloc purges freed pages after a while). Polls
    until two readings 1 s apart differ by less than 0.5% (bounded: 20 s)."""
    last = rss_kb(pid)
    deadline = time.time() + 20
    while time.time() < deadline:
        time.sleep(1)
        now = rss_kb(pid)
        if abs(now - last) <= last * 0.005:
            return now
        last = now
    return last


def cpu_ms(pid):
    """(user, system) CPU time of a process and its descendants so far, in ms."""
    user = system = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user, system = user + int(fields[11]), system + int(fields[12])
        except OSError:
            pass
    tick = 1000 / os.sysconf("SC_CLK_TCK")
    return user * tick, system * tick


def faults(pid):
    """Minor page faults of a process and its descendants so far (fresh memory touched)."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                total += int(f.read().rsplit(")", 1)[1].split()[7])
        except OSError:
            pass
    return total


def fan_out(port, socks, marker):
    """POSTs one message; returns (ms to the last client that got it, how many got it)."""
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, bytearray())
    body = json.dumps({"name": "bench", "text": marker}).encode()
    started = time.perf_counter()
    status, answer = request(port, "POST", "/send?room=bench", body)
    if status != 200:
        sys.exit(f"/send answered {status}: {answer[:200]!r}")
    got, last = 0, started
    deadline = time.time() + 30
    pending = len(socks)
    while pending and time.time() < deadline:
        for key, _ in sel.select(timeout=1):
            buf = key.data
            try:
                chunk = key.fileobj.recv(65536)
            except BlockingIOError:
                continue
            if chunk:
                buf += chunk
            if marker.encode() in buf or not chunk:
                if marker.encode() in buf:
                    got += 1
                    last = time.perf_counter()
                sel.unregister(key.fileobj)
                pending -= 1
    sel.close()
    return (last - started) * 1000, got


def verdict(value, target, goal):
    return "goal met" if value <= goal else ("target met" if value <= target else "MISSED")


def measure(n, tmp, peer=None):
    """Prints and returns (KB per parked client, ms to the last client) of one server."""
    port = free_port()
    proc = start_server(port, tmp, peer)
    try:
        for _ in range(20):
            request(port, "GET", "/stats?room=warmup")
        before = settled_rss(proc.pid)
        started = time.time()
        socks = open_longpolls(port, n) if MODE == "longpoll" else open_websockets(port, n)
        parked = wait_parked(port, proc, n)
        opened_s = time.time() - started
        after = settled_rss(proc.pid)
        per = (after - before) / n
        print(f"\n{MODE}, N = {n}, {peer or 'pmnc'}: {'all parked' if parked else 'NOT all parked'} after {opened_s:.1f} s")
        print(f"  server RSS: {before} kB before, {after} kB with the clients parked")
        print(f"  per parked client: {per:.2f} kB   (target {RSS_TARGET_KB} kB, goal {RSS_GOAL_KB} kB: {verdict(per, RSS_TARGET_KB, RSS_GOAL_KB)})")
        cpu_before, faults_before = cpu_ms(proc.pid), faults(proc.pid)
        ms, got = fan_out(port, socks, f"fan-out-{n}")
        cpu_after, faulted = cpu_ms(proc.pid), faults(proc.pid) - faults_before
        user, system = cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]
        cpu = user + system
        print(f"  one publish to {n}: the last of {got} clients had it after {ms:.1f} ms   (target {FANOUT_TARGET_MS} ms, goal {FANOUT_GOAL_MS} ms: {verdict(ms, FANOUT_TARGET_MS, FANOUT_GOAL_MS)})")
        print(f"  server CPU for that publish and its {n} answers: {cpu:.0f} ms (this client shares the cores and reads the answers one by one in Python): user {user:.0f} ms, kernel {system:.0f} ms; {faulted} page faults")
        idle = settled_rss(proc.pid)
        print(f"  server RSS with the {n} clients answered and idle on their kept connections: {idle} kB ({(idle - before) / n:.2f} kB per client)")
        if got != n:
            print(f"  WARNING: {n - got} clients did not get the message")
        for s in socks:
            s.close()
        return per, ms
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main():
    if MODE not in ("longpoll", "websocket"):
        sys.exit("MODE must be longpoll or websocket")
    hard = raise_nofile()
    # This process and the server each need one descriptor per client, plus some spare.
    most = hard - 200
    counts = [int(c) for c in os.environ.get("COUNTS", f"10000 {most}").split()]
    print(f"open-file hard limit {hard}; counts {counts}; server: {os.environ.get('SERVER') or 'examples/chat, --workers ' + WORKERS}")
    with tempfile.TemporaryDirectory(prefix="pmnc-longpoll.") as tmp:
        for n in counts:
            if n > most:
                print(f"skipping N = {n}: over what the open-file limit allows ({most})")
                continue
            ours = measure(n, tmp)
            if nginx_ready():
                theirs = measure(n, tmp, "nginx")
                print(f"\nN = {n}: pmnc/nginx+Lua: memory per parked client {ours[0] / max(theirs[0], 1e-9):.2f}x, "
                      f"time to the last client {ours[1] / max(theirs[1], 1e-9):.2f}x (lower is better for both)")
            elif MODE == "longpoll" and not os.environ.get("SERVER") and os.environ.get("NGINX", "1") == "1":
                print("(no nginx + Lua peer: apt-get install nginx libnginx-mod-http-lua)")


if __name__ == "__main__":
    main()
