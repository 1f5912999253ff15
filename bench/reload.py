#!/usr/bin/env python3
"""Hot reload: save-to-live latency of a module, and failed requests while modules reload.

Starts a cage whose handler returns a version string from a module (ver.lua), then RELOADS times
(default 100): writes a new version of ver.lua, alternating in-place writes (truncate + write,
as most editors save) and write-then-rename (write .ver.lua.tmp, rename over ver.lua), and polls
GET /version as fast as it can until every worker answers the new version. The latency of one
reload is from the start of the write to the first answer of the new version from the last worker
(one keep-alive connection per worker VM: /version also names the VM that answered, and
connections are opened until each VM has one; a warning says when some worker got none). Prints median and p99 (target: < 5 ms).

In the same run, wrk loads another endpoint of the same cage (GET /load, which also calls the
module being reloaded) during the reloads; prints its total requests and non-2xx responses and
socket errors (target: zero failed).

Python standard library only; wrk comes from apt-get when missing. Never fails because of a
figure.

    bench/reload.py
    RELOADS=200 WORKERS=2 WRK_CONNECTIONS=16 bench/reload.py
    LOAD=0 bench/reload.py        # the same without wrk, for comparison
"""

import atexit
import datetime
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
PMNC = os.path.join(TARGET, "release", "pmnc")


def env_int(name, default, low, high):
    text = os.environ.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        sys.exit(f"{name} must be a whole number, got {text!r}")
    if not low <= value <= high:
        sys.exit(f"{name} must be {low}..{high}, got {value}")
    return value


RELOADS = env_int("RELOADS", 100, 1, 10000)
WORKERS = env_int("WORKERS", 2, 1, 64)
WRK_CONNECTIONS = env_int("WRK_CONNECTIONS", 16, 1, 1000)
LOAD = env_int("LOAD", 1, 0, 1) == 1
POLL_LIMIT = 2.0  # seconds one reload may take before it is counted as missed
GAP = 0.02  # seconds between two reloads
TARGET_MS = 5.0

started = []  # processes to end on exit
work = tempfile.mkdtemp(prefix="pmnc-bench-reload.")


def cleanup():
    for p in started:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 3
    for p in started:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
    if os.environ.get("KEEP") == "1":
        print(f"(KEEP=1: leaving {work})")
    else:
        shutil.rmtree(work, ignore_errors=True)


atexit.register(cleanup)
for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda s, f: sys.exit(128 + s))


def build():
    print("== cargo build --release -p pmnc", flush=True)
    if subprocess.run(["cargo", "build", "--release", "-p", "pmnc"], cwd=ROOT).returncode != 0:
        sys.exit("build failed")
    if not os.access(PMNC, os.X_OK):
        sys.exit(f"no binary at {PMNC} after the build")
    print(f"== built from {source_state()}", flush=True)


def source_state():
    """The commit the binary was built from, and whether crates/ had changes on top."""
    def git(*args):
        r = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown commit"
    dirty = git("status", "--porcelain", "--", "crates", "Cargo.lock")
    return head + (" + uncommitted changes in crates/" if dirty else "")


def ensure_wrk():
    if shutil.which("wrk"):
        return
    sudo = [] if os.geteuid() == 0 or not shutil.which("sudo") else ["sudo", "-n"]
    print(f"== wrk not found; running: {' '.join(sudo + ['apt-get', 'install', '-y', 'wrk'])}", flush=True)
    if subprocess.run(sudo + ["apt-get", "install", "-y", "wrk"]).returncode != 0:
        print("== apt-get install failed; running apt-get update, then installing again", flush=True)
        if subprocess.run(sudo + ["apt-get", "update", "-q"]).returncode == 0:
            subprocess.run(sudo + ["apt-get", "install", "-y", "wrk"])
    if not shutil.which("wrk"):
        print("SKIPPED: wrk could not be installed (apt-get install -y wrk failed); install it and rerun.")
        sys.exit(0)
    print(f"== installed {shutil.which('wrk')}")


def module_text(version):
    return f"""-- written by bench/reload.py
local M = {{}}

local VERSION = "{version}"

function M.get()
  return VERSION
end

function M.info()
  return {{ version = VERSION, length = #VERSION }}
end

return M
"""


HTTP_LUA = """local M = {}

-- Tells which worker's VM answered: http.lua is never rewritten, so this stays fixed per VM.
local vm = string.format("%08x", math.random(0, 0x7fffffff))

function M.handle(request, response)
  if request.path == "/version" then
    return pmnc.ver.get() .. " " .. vm
  elseif request.path == "/load" then
    return pmnc.ver.info()
  end
  response.status = 404
  return "not found"
end

return M
"""

CAGE_TOML = """request_timeout = "5s"

[interfaces.http]
listen = "127.0.0.1:0"
"""


def write_in_place(path, text):
    with open(path, "w") as f:
        f.write(text)


def write_then_rename(path, text):
    tmp = os.path.join(os.path.dirname(path), ".ver.lua.tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def start_cage(cage):
    log_path = os.path.join(work, "pmnc.log")
    log = open(log_path, "w")
    p = subprocess.Popen([PMNC, "run", cage, "--workers", str(WORKERS)], stdout=subprocess.DEVNULL, stderr=log)
    started.append(p)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = open(log_path).read()
        if re.search(r"running \d+ cage", text):
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
            if not m:
                sys.exit(f"no port in the log:\n{text}")
            return p, int(m.group(1)), log_path
        if p.poll() is not None:
            sys.exit(f"pmnc exited ({p.returncode}) before it was ready:\n{text}")
        time.sleep(0.05)
    sys.exit(f"pmnc not ready after 20 s:\n{open(log_path).read()}")


class Poller:
    """One keep-alive HTTP/1.1 connection on a raw socket (http.client costs several times more
    per request, which would blur the figures); reconnects, counted, when the connection breaks."""

    def __init__(self, port):
        self.port = port
        self.sock = None
        self.buf = b""
        self.errors = 0
        self.reconnects = 0

    def _connect(self):
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _read_response(self):
        """(status, body) of one response with a content-length (what pmnc sends)."""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk
            if len(self.buf) > 1 << 20:
                raise ConnectionError("response head too large")
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            rest += chunk
        self.buf = rest[length:]
        return status, rest[:length]

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def get(self, path):
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n\r\n".encode()
        for _ in range(3):
            try:
                if self.sock is None:
                    self._connect()
                self.sock.sendall(request)
                status, body = self._read_response()
                if status != 200:
                    self.errors += 1
                return body.decode("utf-8", "replace")
            except (OSError, ValueError, IndexError):
                self.errors += 1
                self.reconnects += 1
                if self.sock is not None:
                    self.sock.close()
                self.sock = None
        return None


def percentile(values, q):
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def wrk_figures(text):
    def find(pattern, default=None):
        m = re.search(pattern, text, re.M)
        return m.group(1) if m else default

    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return {
        "requests": int(find(r"^\s*(\d+) requests in", "0")),
        "rps": find(r"^Requests/sec:\s+([\d.]+)", "?"),
        "p50": find(r"^\s+50%\s+(\S+)", "?"),
        "p99": find(r"^\s+99%\s+(\S+)", "?"),
        "non2xx": int(find(r"Non-2xx or 3xx responses: (\d+)", "0")),
        "socket": sum(int(x) for x in socket.groups()) if socket else 0,
        "socket_text": socket.group(0) if socket else "Socket errors: none",
    }


def split_by_log(log, timeline, count):
    """Splits save-to-live in two with the log's timestamps: save -> the watcher's 'reloaded'
    line (event, quiet period, read, compile, check, sent to the workers), and that line -> the
    new version answered by every worker VM reached (install on the worker, polling)."""
    stamps = []
    for m in re.finditer(r"^(\S+Z)\s+INFO reloaded reload/ver\.lua \(version (\d+)", log, re.M):
        try:
            stamps.append(datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp())
        except ValueError:
            return
    stamps = stamps[1:] if len(stamps) == len(timeline) + 1 else stamps  # a reload of v0 at start
    if not timeline or len(stamps) != len(timeline) or count != len(timeline):
        print(f"(no split by log: {len(stamps)} 'reloaded' lines for {len(timeline)} reloads)")
        return
    watcher = [(stamp - wall) * 1e3 for (_, _, wall, _), stamp in zip(timeline, stamps)]
    rest = [total - w for (_, _, _, total), w in zip(timeline, watcher)]
    print(f"  split: save -> 'reloaded' logged: median {statistics.median(watcher):.2f}  "
          f"p99 {percentile(watcher, 99):.2f}; logged -> live: median {statistics.median(rest):.2f}  "
          f"p99 {percentile(rest, 99):.2f}")
    slowest = sorted(zip(timeline, watcher), key=lambda x: -x[0][3])[:3]
    print("  slowest: " + "; ".join(f"#{i} {mode} {total:.1f} ms (watcher {w:.1f})"
                                    for (i, mode, _, total), w in slowest))


def main():
    build()
    if LOAD:
        ensure_wrk()

    cage = os.path.join(work, "reload")
    os.makedirs(cage)
    with open(os.path.join(cage, "cage.toml"), "w") as f:
        f.write(CAGE_TOML)
    with open(os.path.join(cage, "http.lua"), "w") as f:
        f.write(HTTP_LUA)
    module = os.path.join(cage, "ver.lua")
    tag = f"{random.randrange(16**6):06x}"
    write_in_place(module, module_text(f"v0-{tag}"))

    print(f"== machine: {os.cpu_count()} cores; pmnc run --workers {WORKERS}; {RELOADS} reloads", flush=True)
    pmnc, port, log_path = start_cage(cage)

    # One connection per worker VM: connections are opened one after the other (at most 4 per
    # worker) and kept when they reach a VM not seen yet.
    pollers, vms = [], set()
    for _ in range(4 * WORKERS):
        p = Poller(port)
        body = p.get("/version") or ""
        version, _, vm = body.partition(" ")
        if version != f"v0-{tag}" or not vm:
            sys.exit(f"sanity check failed: /version answered {body!r}, expected 'v0-{tag} <vm>'")
        if vm in vms:
            p.close()
        else:
            vms.add(vm)
            pollers.append(p)
        if len(pollers) == WORKERS:
            break
    if len(pollers) < WORKERS:
        print(f"WARNING: {4 * WORKERS} connections reached only {len(pollers)} of {WORKERS} worker VM(s): "
              "connections are not spread over every worker; measuring on the VM(s) reached", flush=True)

    wrk = None
    wrk_out = os.path.join(work, "wrk.txt")
    if LOAD:
        cmd = ["wrk", "-t1", f"-c{WRK_CONNECTIONS}", "-d600s", "--latency", f"http://127.0.0.1:{port}/load"]
        print(f"== load during the reloads: {' '.join(cmd)} (stopped with SIGINT after the last reload)", flush=True)
        wrk = subprocess.Popen(cmd, stdout=open(wrk_out, "w"), stderr=subprocess.STDOUT)
        started.append(wrk)
        time.sleep(1.0)  # let wrk connect and reach its pace
        if wrk.poll() is not None:
            sys.exit(f"wrk exited early:\n{open(wrk_out).read()}")

    print(f"== {RELOADS} reloads: alternately in-place write and write-then-rename; polling /version on "
          f"{len(pollers)} connection(s)", flush=True)
    latencies = {"in-place": [], "rename": []}
    missed = []
    timeline = []  # (reload, mode, wall clock at the write, save-to-live ms)
    polls = 0
    poll_time = 0.0
    for i in range(1, RELOADS + 1):
        version = f"v{i}-{tag}"
        text = module_text(version)
        mode = "in-place" if i % 2 == 1 else "rename"
        wall = time.time()
        t0 = time.perf_counter()
        if mode == "in-place":
            write_in_place(module, text)
        else:
            write_then_rename(module, text)
        live = set()
        limit = t0 + POLL_LIMIT
        while len(live) < len(pollers) and time.perf_counter() < limit:
            for k, p in enumerate(pollers):
                if k in live:
                    continue
                a = time.perf_counter()
                body = p.get("/version")
                poll_time += time.perf_counter() - a
                polls += 1
                if body is not None and body.partition(" ")[0] == version:
                    live.add(k)
        t1 = time.perf_counter()
        if len(live) == len(pollers):
            latencies[mode].append((t1 - t0) * 1e3)
            timeline.append((i, mode, wall, (t1 - t0) * 1e3))
        else:
            missed.append((i, mode))
        time.sleep(GAP)

    wrk_text = ""
    if wrk is not None:
        wrk.send_signal(signal.SIGINT)
        try:
            wrk.wait(timeout=10)
        except subprocess.TimeoutExpired:
            wrk.kill()
            wrk.wait(timeout=5)
        wrk_text = open(wrk_out).read()

    pmnc.terminate()
    try:
        pmnc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pmnc.kill()
    log = open(log_path).read()

    print()
    every = latencies["in-place"] + latencies["rename"]
    if every:
        med, p99 = statistics.median(every), percentile(every, 99)
        print(f"save-to-live over {len(every)} reloads (ms): median {med:.2f}  p99 {p99:.2f}  "
              f"min {min(every):.2f}  max {max(every):.2f}  mean {statistics.mean(every):.2f}")
        for mode, values in latencies.items():
            if values:
                print(f"  {mode:<9} n={len(values):<4} median {statistics.median(values):.2f}  "
                      f"p99 {percentile(values, 99):.2f}  max {max(values):.2f}")
        print(f"target < {TARGET_MS:.0f} ms: median {'met' if med < TARGET_MS else 'MISSED'}, "
              f"p99 {'met' if p99 < TARGET_MS else 'MISSED'}")
    if missed:
        print(f"MISSED: {len(missed)} reload(s) not live within {POLL_LIMIT:.0f} s: {missed[:10]}")
    if polls:
        print(f"polls: {polls} ({polls / RELOADS:.1f} per reload), {poll_time / polls * 1e6:.0f} us per poll; "
              f"poll errors {sum(p.errors for p in pollers)}, reconnects {sum(p.reconnects for p in pollers)}")
    split_by_log(log, timeline, len(every))
    reloaded = len(re.findall(r"reloaded reload/ver\.lua", log))
    errors = len(re.findall(r"\bERROR\b", log))
    print(f"pmnc log: {reloaded} 'reloaded' line(s) for ver.lua, {errors} ERROR line(s)")
    for line in [l for l in log.splitlines() if re.search(r"\bERROR\b", l)][:5]:
        print(f"  {line}")

    if wrk is not None:
        w = wrk_figures(wrk_text)
        if w["requests"] == 0:
            print(f"wrk printed no figures:\n{wrk_text}")
        else:
            failed = w["non2xx"] + w["socket"]
            print(f"load on /load (wrk -t1 -c{WRK_CONNECTIONS}): {w['requests']} requests, {w['rps']} req/s, "
                  f"p50 {w['p50']}, p99 {w['p99']}; non-2xx {w['non2xx']}; {w['socket_text']}")
            print(f"failed requests: {failed} (target 0): {'met' if failed == 0 else 'MISSED'}")


if __name__ == "__main__":
    main()
