#!/usr/bin/env python3
"""Tasks/s of a no-op task served by a cage's celery interface against Celery's own prefork
worker, on the same broker (Redis, or RabbitMQ with --broker amqp), queue, producer and result
backend (bench/celery.sh).

Starts its own redis-server on a free port (broker db 0, results db 1; with --broker amqp the
machine's RabbitMQ is the broker, on a queue named after this process, and Redis keeps the
results, so that both sides are counted the same way). For each worker in turn:
fills the queue with CALLS tasks `tasks.noop(i)` from a stock Celery client, starts the worker,
and times from its first stored result to its last (so neither side's start-up counts), polling
the result db's key count every 10 ms; the CPU time the worker (with its child processes) and
the broker used in that span is printed per task. Every wait is bounded; everything started is
stopped."""
import argparse
import os
import socket
import subprocess
import sys
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TASKS = '''
import os
from celery import Celery
app = Celery("tasks", broker=os.environ["BENCH_BROKER"], backend=os.environ["BENCH_BACKEND"])
app.conf.update(worker_prefetch_multiplier=64, broker_connection_retry_on_startup=True)
@app.task(name="tasks.noop")
def noop(i):
    return i
'''

CAGE = '''[interfaces.tasks]
protocol = "celery"
broker = "{broker}"
result_backend = "{backend}"
queues = ["{queue}"]
tasks = {{ "tasks.noop" = "t.noop" }}
concurrency = {concurrency}
'''


def fill(broker, backend, calls, queue):
    from celery import Celery
    app = Celery(broker=broker, backend=backend)
    t = time.perf_counter()
    with app.producer_or_acquire() as p:
        for i in range(calls):
            app.send_task("tasks.noop", args=[i], queue=queue, producer=p, ignore_result=False)
    return time.perf_counter() - t


def purge(broker, queue, delete=False):
    """Empties the queue on an AMQP broker, or deletes it. Emptied, not deleted, between runs:
    kombu remembers in the process that it declared the queue and would not declare it again,
    so messages sent to a deleted queue would be dropped."""
    from celery import Celery
    with Celery(broker=broker).connection_for_write() as c:
        try:
            if delete:
                c.default_channel.queue_delete(queue)
            else:
                c.default_channel.queue_purge(queue)
        except Exception:
            pass


def cpu_seconds(pids):
    """CPU time (user + system, all threads) the processes have used so far."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def tree(pid):
    """The process and its descendants (Celery's pool processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def drain(r_results, calls, proc, broker_pids, limit=600):
    """(first, last, worker CPU s, broker CPU s) from the first result to the last, or None when
    the worker died or the limit passed."""
    end = time.time() + limit
    first = None
    while time.time() < end:
        n = r_results.dbsize()
        now = time.perf_counter()
        if n > 0 and first is None:
            first = now
            cpu0 = (cpu_seconds(tree(proc.pid)), cpu_seconds(broker_pids))
        if n >= calls:
            cpu1 = (cpu_seconds(tree(proc.pid)), cpu_seconds(broker_pids))
            return first, now, cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        if proc.poll() is not None:
            return None
        time.sleep(0.01)
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--pmnc", required=True)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--no-celery", action="store_true", help="only the pmnc run (comparing builds)")
    ap.add_argument("--broker", choices=["redis", "amqp"], default="redis")
    ap.add_argument("--amqp-url", default=os.environ.get("PMNC_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"))
    ap.add_argument("--bare", help="with --broker amqp: the amqp_bare_consumer example, run on the same filled queue as the "
                                   "ceiling of any worker that acknowledges after its task (no task run, no result stored)")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    port = free_port()
    broker, backend = f"redis://127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/1"
    queue = "celery"
    if a.broker == "amqp":
        broker, queue = a.amqp_url, f"bench-celery-{os.getpid()}"
    procs = []
    rates = {}
    try:
        procs.append(subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", a.work],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # The broker's CPU per task is printed beside the worker's: on a small machine the
        # broker's own cost per message bounds what any worker can drain.
        broker_pids = [procs[0].pid]
        if a.broker == "amqp":
            found = subprocess.run(["pgrep", "-x", "beam.smp"], capture_output=True, text=True).stdout.split()
            broker_pids = [int(p) for p in found]
        import redis
        r0, r1 = redis.Redis.from_url(f"redis://127.0.0.1:{port}/0"), redis.Redis.from_url(backend)
        for _ in range(100):
            try:
                r0.ping()
                break
            except Exception:
                time.sleep(0.1)
        with open(os.path.join(a.work, "tasks.py"), "w") as f:
            f.write(TASKS)
        cage = os.path.join(a.work, "cage")
        os.makedirs(cage, exist_ok=True)
        with open(os.path.join(cage, "cage.toml"), "w") as f:
            f.write(CAGE.format(broker=broker, backend=backend, queue=queue, concurrency=a.concurrency))
        with open(os.path.join(cage, "t.lua"), "w") as f:
            f.write("local M = {}\nfunction M.noop(i) return i end\nreturn M\n")
        env = dict(os.environ, BENCH_BROKER=broker, BENCH_BACKEND=backend, PYTHONPATH=a.work)
        runs = [
            ("pmnc", [a.pmnc, "run", cage, "--workers", str(a.workers), "--no-watch"]),
            ("celery", [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--pool", "prefork", "--concurrency", str(a.workers), "-Q", queue,
                        "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"]),
        ]
        for name, cmd in runs[:1] if a.no_celery else runs:
            r0.flushall()
            if a.broker == "amqp":
                purge(broker, queue)
            took = fill(broker, backend, a.calls, queue)
            print(f"== {name} on {a.broker}: {a.calls} tasks queued in {took:.1f}s; starting the worker", flush=True)
            log = open(os.path.join(a.work, f"{name}.log"), "w")
            proc = subprocess.Popen(cmd, cwd=a.work, env=env, stdout=log, stderr=log)
            procs.append(proc)
            span = drain(r1, a.calls, proc, broker_pids)
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            if span is None:
                print(f"{name}: did not finish; see {log.name}")
                continue
            first, last, worker_cpu, broker_cpu = span
            rate = (a.calls - 1) / max(last - first, 1e-9)
            rates[name] = rate
            print(f"{name}: {a.calls} results stored, first to last {last - first:.3f}s = {rate:.0f} tasks/s; CPU per task: worker "
                  f"{worker_cpu * 1e6 / a.calls:.0f} us, {a.broker} broker {broker_cpu * 1e6 / a.calls:.0f} us", flush=True)
        if a.bare and a.broker == "amqp":
            # The broker's own ceiling: a consumer that takes each task message and does nothing
            # else, on one connection with a per-consumer prefetch, acknowledging every 64th
            # with `multiple` (the least work RabbitMQ can be asked for per message). No worker
            # that acknowledges after its task drains faster than this.
            purge(broker, queue)
            took = fill(broker, backend, a.calls, queue)
            print(f"== bare consumer on amqp: {a.calls} tasks queued in {took:.1f}s", flush=True)
            before = cpu_seconds(broker_pids)
            out = subprocess.run([a.bare, "consume", broker, queue, str(a.calls), str(min(4 * a.concurrency, 65535)), "64"],
                                 capture_output=True, text=True, timeout=600)
            broker_cpu = cpu_seconds(broker_pids) - before
            print(out.stdout.strip() or out.stderr.strip(), flush=True)
            try:
                rates["bare"] = float(out.stdout.split(":")[-1].split()[0])
                print(f"bare consumer: {rates['bare']:.0f} tasks/s; CPU per task: {a.broker} broker {broker_cpu * 1e6 / a.calls:.0f} us "
                      f"(from the consumer's start, its connecting included)", flush=True)
            except (ValueError, IndexError):
                print("bare consumer: no rate printed")
        if "pmnc" in rates and "celery" in rates:
            ratio = rates["pmnc"] / rates["celery"]
            print(f"ratio pmnc/celery on {a.broker}: {ratio:.1f}x (target >= 20x): {'met' if ratio >= 20 else 'MISSED'}")
        if "bare" in rates and "celery" in rates:
            print(f"ceiling bare/celery on {a.broker}: {rates['bare'] / rates['celery']:.1f}x; pmnc/bare: {rates.get('pmnc', 0) / rates['bare']:.2f}")
        return 0
    finally:
        if a.broker == "amqp":
            purge(broker, queue, delete=True)
        for pr in reversed(procs):
            if pr.poll() is None:
                pr.terminate()
                try:
                    pr.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pr.kill()


if __name__ == "__main__":
    sys.exit(main())
