#!/usr/bin/env python3
"""Cross-cage calls over NATS against a bare async-nats request/reply, in one run.

Starts a private nats-server, then
  1. bare:  `pmnc raw-nats --respond` in one process, `pmnc raw-nats` sending from another;
  2. cages: a `worker` cage (echo function) in one `pmnc run`, a `caller` cage in another, whose
     HTTP handler makes N sequential pmnc("worker").echo.echo(x) calls and returns the latency of
     each call as measured in Lua with pmnc.clock(); 1 or 32 such handlers run at once.
Both with 1 and 32 calls in flight; prints p50, p99, calls/s and the ratios. Figures only: it
never fails on a number. Usage: bench/cluster.py [--calls 20000] [--pmnc target/release/pmnc]
"""
import argparse, json, os, shutil, socket, subprocess, sys, tempfile, threading, time, urllib.request

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def wait_port(port, timeout=10):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close(); return
        except OSError:
            time.sleep(0.02)
    sys.exit(f"nothing listens on {port}")

def wait_line(stream, needle):
    """Reads lines until one holds `needle`; returns every line read."""
    seen = []
    for line in stream:
        seen.append(line)
        if needle in line:
            # Keep reading in the background so a chatty process never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in stream], daemon=True).start()
            return seen
    sys.exit(f"the stream ended before {needle!r}")

def pct(xs, p):
    xs = sorted(xs); return xs[min(len(xs) - 1, int(len(xs) * p))]

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--pmnc", default="target/release/pmnc")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    nats_bin = os.environ.get("NATS_SERVER") or shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not os.path.exists(nats_bin):
        print("*** nats-server not found: apt-get install nats-server (or set NATS_SERVER) ***"); return
    port = free_port()
    nats = subprocess.Popen([nats_bin, "-a", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [nats]
    try:
        wait_port(port)
        url = f"nats://127.0.0.1:{port}"
        results = {}
        # 1. bare
        responder = subprocess.Popen([a.pmnc, "raw-nats", url, "--respond"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(responder)
        wait_line(responder.stdout, "ready")
        for inflight in (1, 32):
            out = subprocess.run([a.pmnc, "raw-nats", url, "--in-flight", str(inflight), "--count", str(a.calls)], capture_output=True, text=True, check=True)
            results[("bare", inflight)] = json.loads(out.stdout)
        responder.kill()
        # 2. cages
        tmp = tempfile.mkdtemp(prefix="pmnc-bench-cluster-")
        os.makedirs(f"{tmp}/worker"); os.makedirs(f"{tmp}/caller")
        cluster = f'[cluster]\nurl = "{url}"\n'
        open(f"{tmp}/worker/cage.toml", "w").write(cluster)
        open(f"{tmp}/worker/echo.lua", "w").write("local M = {}\nfunction M.echo(x) return x end\nreturn M\n")
        open(f"{tmp}/caller/cage.toml", "w").write('request_timeout = "600s"\n[interfaces.http]\nlisten = "127.0.0.1:0"\nrequest_timeout = "600s"\n' + cluster)
        open(f"{tmp}/caller/http.lua", "w").write(
            "local M = {}\n"
            "function M.handle(request)\n"
            "  local n, x, clock, lat = tonumber(request.query.n), string.rep('x', 16), pmnc.clock, {}\n"
            "  local echo = pmnc('worker').echo\n"
            "  for i = 1, 100 do echo.echo(x) end -- warm-up\n"
            "  for i = 1, n do local t0 = clock(); echo.echo(x); lat[i] = clock() - t0 end\n"
            "  return lat\n"
            "end\n"
            "return M\n")
        env = dict(os.environ, RUST_LOG="warn")
        worker = subprocess.Popen([a.pmnc, "run", f"{tmp}/worker", "--workers", str(a.workers), "--log-level", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        procs.append(worker)
        wait_line(worker.stderr, "running ")
        caller = subprocess.Popen([a.pmnc, "run", f"{tmp}/caller", "--workers", str(a.workers), "--log-level", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        procs.append(caller)
        line = next(l for l in wait_line(caller.stderr, "running ") if "listening on " in l)
        http_port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        for inflight in (1, 32):
            per = a.calls // inflight
            lat, lock = [], threading.Lock()
            def run():
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/?n={per}", timeout=600) as r:
                    got = json.loads(r.read())
                with lock:
                    lat.extend(got)
            threads = [threading.Thread(target=run) for _ in range(inflight)]
            t0 = time.time()
            for t in threads: t.start()
            for t in threads: t.join()
            secs = time.time() - t0
            results[("cages", inflight)] = {"calls": len(lat), "seconds": secs, "p50_us": pct(lat, .5) * 1e6, "p99_us": pct(lat, .99) * 1e6, "calls_per_s": len(lat) / secs}
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"cross-cage calls over NATS, {a.calls} calls per run, 16-byte payload, {os.cpu_count()} cores, nats-server {port}")
        print(f"{'in flight':>9}  {'':6} {'p50 us':>8} {'p99 us':>8} {'calls/s':>9}")
        for inflight in (1, 32):
            b, c = results[("bare", inflight)], results[("cages", inflight)]
            for name, r in (("bare", b), ("cages", c)):
                print(f"{inflight:>9}  {name:6} {r['p50_us']:8.0f} {r['p99_us']:8.0f} {r['calls_per_s']:9.0f}")
            print(f"{inflight:>9}  ratio  p50 {c['p50_us'] / b['p50_us']:.2f}x bare (target <= 1.2x, issue 19), calls/s {c['calls_per_s'] / b['calls_per_s']:.2f} of bare (target >= 0.8 at 32 in flight)")
    finally:
        for p in procs:
            p.kill()

if __name__ == "__main__":
    main()
