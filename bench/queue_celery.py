#!/usr/bin/env python3
"""Celery 5 with a Redis broker on no-op work: the comparison of bench/queue.sh.

Starts its own redis-server on a free port (no persistence flags: Redis as installed), a
Celery worker (prefork, --concurrency N), enqueues CALLS tasks from 8 producer threads and
measures enqueue latency (p50/p99 of apply_async) and end to end tasks/s (first enqueue to the
last task done; each task increments a Redis counter, which is how the end is seen).
Every wait is bounded; everything started is stopped at exit."""
import argparse
import os
import socket
import subprocess
import sys
import threading
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TASKS = '''
import os, redis
from celery import Celery
URL = os.environ["BENCH_REDIS"]
app = Celery("tasks", broker=URL)
app.conf.update(task_ignore_result=True, worker_prefetch_multiplier=64, broker_connection_retry_on_startup=True)
_r = None
@app.task(name="noop")
def noop(i):
    global _r
    if _r is None:
        _r = redis.Redis.from_url(URL)
    _r.incr("bench:done")
    return i
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=2)
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    with open(os.path.join(a.work, "tasks.py"), "w") as f:
        f.write(TASKS)
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    env = dict(os.environ, BENCH_REDIS=url, PYTHONPATH=a.work)
    procs = []
    try:
        procs.append(subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", a.work],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        import redis
        r = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                r.ping()
                break
            except Exception:
                time.sleep(0.1)
        log = open(os.path.join(a.work, "worker.log"), "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool", "prefork", "--concurrency", str(a.concurrency),
                                       "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"],
                                      cwd=a.work, env=env, stdout=log, stderr=log))
        sys.path.insert(0, a.work)
        os.environ["BENCH_REDIS"] = url
        import tasks
        # Wait until the worker takes tasks: one task done.
        tasks.noop.delay(0)
        end = time.time() + 60
        while int(r.get("bench:done") or 0) < 1:
            if time.time() > end:
                print("celery worker did not start; see", log.name)
                return 1
            time.sleep(0.1)
        r.set("bench:done", 0)
        lat = []
        lock = threading.Lock()
        per = a.calls // 8

        def producer():
            mine = []
            for i in range(per):
                t = time.perf_counter()
                tasks.noop.delay(i)
                mine.append(time.perf_counter() - t)
            with lock:
                lat.extend(mine)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=producer) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total = per * 8
        end = time.time() + 300
        while int(r.get("bench:done") or 0) < total and time.time() < end:
            time.sleep(0.05)
        t1 = time.perf_counter()
        done = int(r.get("bench:done") or 0)
        lat.sort()
        p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000
        print(f"Celery {__import__('celery').__version__} + Redis broker (prefork, concurrency {a.concurrency}, 8 producer threads)")
        print(f"  enqueue latency (apply_async): p50 {p(0.5):.3f} ms  p99 {p(0.99):.3f} ms")
        print(f"  end to end: {done} tasks done in {t1 - t0:.3f}s = {done / (t1 - t0):.0f} tasks/s")
        return 0
    finally:
        for pr in reversed(procs):
            pr.terminate()
        for pr in reversed(procs):
            try:
                pr.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pr.kill()


if __name__ == "__main__":
    sys.exit(main())
