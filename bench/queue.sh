#!/usr/bin/env bash
# Durable calls end to end on one cage: calls/s from enqueue to done (SQLite, WAL,
# synchronous=FULL: every group commit is fsync'd), and the latency of a request that makes one
# durable enqueue. Then, when redis-server and Celery 5 are installed, the same no-op work on
# Celery with a Redis broker (bench/queue_celery.py), and the ratio.
#
# Meanwhile it samples the size of the state file's WAL (five times a second) and prints the
# largest it saw beside the file's size: with DEDUP shorter than DURATION, pruning of done calls
# runs during the measurement too (issue 22 #12).
#
#   bench/queue.sh                 DURATION=s (default 10) CONNECTIONS=n (default 128)
#                                  BATCH=n calls per request (default 20) WORKERS=n (default 2)
#                                  DEDUP=duration the queue's dedup_window and result_ttl
#                                  (default 20s) CELERY=0 skips the Celery run
set -u
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DURATION="${DURATION:-10}"
CONNECTIONS="${CONNECTIONS:-128}"
BATCH="${BATCH:-20}"
WORKERS="${WORKERS:-2}"
DEDUP="${DEDUP:-20s}"

build
ensure_wrk
command -v sqlite3 >/dev/null || { echo "SKIPPED: needs the sqlite3 tool (apt-get install -y sqlite3)"; exit 0; }

CAGE="$WORK/bench"
mkdir -p "$CAGE"
cat >"$CAGE/cage.toml" <<TOML
[interfaces.http]
listen = "127.0.0.1:0"

[queues.bench]
concurrency = 512
expires_in = "1h"
dedup_window = "$DEDUP"
result_ttl = "$DEDUP"
TOML
cat >"$CAGE/http.lua" <<LUA
local M = {}
local batch = $BATCH
function M.handle(request)
  if request.path == "/e1" then
    return pmnc("bench", { queue = "bench" }).work.noop(1)
  end
  for i = 1, batch do
    pmnc("bench", { queue = "bench" }).work.noop(i)
  end
  return "ok"
end
return M
LUA
cat >"$CAGE/work.lua" <<'LUA'
return { noop = function(i) return i end }
LUA
DB="$CAGE/.data/state.sqlite"

start_cage "$CAGE" "$WORK/pmnc.log" --workers "$WORKERS" --no-watch
PMNC_PID=$BG_PID
expect_body "http://127.0.0.1:$PORT/" "ok"

q() { sqlite3 -cmd ".timeout 10000" "$DB" "$1"; }
# The largest WAL seen, sampled in the background until the script ends.
WAL_PEAK_FILE="$WORK/wal-peak"
echo 0 >"$WAL_PEAK_FILE"
(
    peak=0
    while kill -0 "$PMNC_PID" 2>/dev/null; do
        size="$(stat -c %s "$DB-wal" 2>/dev/null || echo 0)"
        if [ "$size" -gt "$peak" ]; then peak="$size"; echo "$peak" >"$WAL_PEAK_FILE"; fi
        sleep 0.2
    done
) &
SAMPLER_PID=$!
STARTED_PIDS+=("$SAMPLER_PID")
# drain: waits (at most 120 s) until no call waits; prints the time it ended (ns).
drain() {
    for _ in $(seq 1200); do
        [ "$(q "SELECT count(*) FROM queue_calls WHERE status IN ('pending','failed')")" = 0 ] && break
        sleep 0.1
    done
    date +%s%N
}

echo "== enqueue latency: wrk -t2 -c16 -d5s, one durable enqueue per request"
run_wrk "$WORK/lat.txt" -t2 -c16 -d5s --latency "http://127.0.0.1:$PORT/e1"
drain >/dev/null
LAT_P50="$(to_ms "$(wrk_field "$WORK/lat.txt" p50)")"
LAT_P99="$(to_ms "$(wrk_field "$WORK/lat.txt" p99)")"
LAT_RPS="$(wrk_field "$WORK/lat.txt" rps)"

echo "== throughput: wrk -t2 -c$CONNECTIONS -d${DURATION}s, $BATCH durable calls per request, then until all are done"
T0="$(date +%s%N)"
CPU0="$(process_cpu "$PMNC_PID")"
WRK_LIMIT="$DURATION" run_wrk "$WORK/tp.txt" -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency "http://127.0.0.1:$PORT/"
T1="$(drain)"
CPU1="$(process_cpu "$PMNC_PID")"
DEAD="$(q "SELECT count(*) FROM queue_calls WHERE status = 'dead'")"
# Calls made, from wrk's count of answered requests: done calls past their dedup_window are
# pruned during a long run, so counting done rows would miss them. The drain above waited until
# none of them waited any more.
REQS="$(awk '/requests in/ {print $1}' "$WORK/tp.txt")"
BAD="$(awk '/Non-2xx/ {print $NF}' "$WORK/tp.txt")"
CALLS=$(( (${REQS:-0} - ${BAD:-0}) * BATCH ))
SECS="$(awk -v a="$T0" -v b="$T1" 'BEGIN {printf "%.3f", (b - a) / 1e9}')"
RATE="$(awk -v n="$CALLS" -v s="$SECS" 'BEGIN {printf "%.0f", n / s}')"
HZ="$(getconf CLK_TCK 2>/dev/null || echo 100)"
CPU_US="$(awk -v a="$CPU0" -v b="$CPU1" -v hz="$HZ" -v n="$CALLS" 'BEGIN {if (n > 0) printf "%.1f", (b - a) / hz * 1e6 / n; else print "?"}')"
SYNC="$(q "PRAGMA synchronous")"
WAL_PEAK_MB="$(awk -v b="$(cat "$WAL_PEAK_FILE")" 'BEGIN {printf "%.1f", b / 1048576}')"
DB_MB="$(awk -v b="$(stat -c %s "$DB")" 'BEGIN {printf "%.1f", b / 1048576}')"
echo
echo "Rustomnic durable calls (one cage, $WORKERS workers, synchronous=$SYNC (2 = FULL), WAL)"
echo "  enqueue request latency: p50 ${LAT_P50} ms  p99 ${LAT_P99} ms  ($LAT_RPS req/s, one enqueue each)"
echo "  end to end: $CALLS calls done in ${SECS}s = $RATE calls/s  (dead: $DEAD, CPU ${CPU_US} us/call)"
echo "  state file: largest WAL seen ${WAL_PEAK_MB} MB beside a ${DB_MB} MB database (dedup_window $DEDUP)"
stop_pid "$PMNC_PID"

CELERY_RATE=""
if [ "${CELERY:-1}" = 0 ]; then
    echo
    echo "Celery comparison skipped (CELERY=0)"
elif command -v redis-server >/dev/null && python3 -c "import celery, redis" 2>/dev/null; then
    echo
    echo "== Celery 5 with a Redis broker on the same no-op work (bench/queue_celery.py)"
    python3 "$ROOT/bench/queue_celery.py" --work "$WORK/celery" --calls "${CELERY_CALLS:-20000}" --concurrency "$WORKERS" | tee "$WORK/celery.txt"
    CELERY_RATE="$(awk '/^  end to end:/ {print $(NF-1)}' "$WORK/celery.txt" | tail -n1)"
else
    echo
    echo "Celery comparison skipped: needs redis-server and 'pip install celery redis'"
fi
if [ -n "$CELERY_RATE" ] && [ "$CELERY_RATE" != 0 ]; then
    RATIO="$(awk -v a="$RATE" -v b="$CELERY_RATE" 'BEGIN {printf "%.1f", a / b}')"
    echo
    echo "ratio Rustomnic/Celery end to end: ${RATIO}x  (target >= 40x)"
    awk -v r="$RATIO" 'BEGIN {exit !(r < 40)}' && echo "MISSED: ratio target 40x"
fi
awk -v r="$RATE" 'BEGIN {exit !(r < 20000)}' && echo "MISSED: 20,000 durable calls/s target"
exit 0
