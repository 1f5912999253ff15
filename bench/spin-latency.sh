#!/usr/bin/env bash
# Latency of a fast endpoint while handlers spin (`while true do end`) on the same worker.
#
# One worker thread (--workers 1), request_timeout 5s. First wrk -t1 -c4 -d5s --latency against
# /fast alone; then the same while SPINNERS requests to /spin are running (each spinner is
# preempted every time slice and aborted at its 5 s deadline with 504; a spinner whose request
# ended is started again until the measurement is over, so the spinners cover the whole run).
# Prints p50/p99 of both runs. Never fails because of a figure.
#
#   bench/spin-latency.sh
#   SPINNERS=8 DURATION=5 bench/spin-latency.sh
set -uo pipefail
source "$(dirname "$0")/common.sh"

SPINNERS="${SPINNERS:-4}"
DURATION="${DURATION:-5}"
for v in SPINNERS DURATION; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "$v must be a whole number, got '${!v}'"; exit 2; }
done
[ "$SPINNERS" -ge 1 ] && [ "$SPINNERS" -le 64 ] || { echo "SPINNERS must be 1..64"; exit 2; }
[ "$DURATION" -ge 1 ] && [ "$DURATION" -le 600 ] || { echo "DURATION must be 1..600"; exit 2; }
WRK_LIMIT=$DURATION

build
ensure_wrk

cage="$WORK/spin"
mkdir -p "$cage"
cat >"$cage/cage.toml" <<'EOF'
request_timeout = "5s"

[interfaces.http]
listen = "127.0.0.1:0"
EOF
cat >"$cage/http.lua" <<'EOF'
local M = {}

function M.handle(request, response)
  if request.path == "/spin" then
    while true do end -- preempted every slice, aborted at the deadline (504)
  end
  return "fast"
end

return M
EOF

echo "== machine: $(nproc) cores; pmnc run --workers 1; spinners: $SPINNERS; request_timeout 5s"
start_cage "$cage" "$WORK/pmnc.log" --workers 1
pmnc_pid=$BG_PID
url="http://127.0.0.1:$PORT/fast"
expect_body "$url" "fast"

echo "== without spinners: wrk -t1 -c4 -d${DURATION}s --latency $url"
run_wrk "$WORK/wrk-quiet.txt" -t1 -c4 -d"${DURATION}s" --latency "$url"

# spinner N END: requests /spin again and again until END (epoch seconds), at most 1000 times;
# one line per request: "status seconds".
spinner() {
    local n="$1" end="$2"
    for _ in $(seq 1000); do
        [ "$(date +%s)" -lt "$end" ] || break
        curl -s -o /dev/null --max-time 20 -w '%{http_code} %{time_total}\n' "http://127.0.0.1:$PORT/spin" \
            >>"$WORK/spinner-$n.txt" || echo "curl-failed 0" >>"$WORK/spinner-$n.txt"
    done
}

end=$(($(date +%s) + DURATION + 2))
spinner_pids=()
for n in $(seq "$SPINNERS"); do
    spinner "$n" "$end" &
    spinner_pids+=("$!")
    STARTED_PIDS+=("$!")
done
sleep 0.5 # let every spinner reach the worker
echo "== with $SPINNERS spinners: wrk -t1 -c4 -d${DURATION}s --latency $url"
run_wrk "$WORK/wrk-spin.txt" -t1 -c4 -d"${DURATION}s" --latency "$url"

# Wait for the spinners (each in-flight /spin ends at its deadline: at most 5 s + slack).
for pid in "${spinner_pids[@]}"; do
    for _ in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
done
stop_pid "$pmnc_pid"

for run in quiet spin; do
    if [ -z "$(wrk_field "$WORK/wrk-$run.txt" rps)" ]; then
        echo "wrk printed no figures for the $run run:"
        cat "$WORK/wrk-$run.txt"
        exit 1
    fi
done

echo
printf '%-22s %10s %10s %10s %10s %10s %8s\n' "fast endpoint" "req/s" "p50" "p90" "p99" "requests" "errors"
for run in quiet spin; do
    out="$WORK/wrk-$run.txt"
    errors=$(($(wrk_field "$out" non2xx) + $(wrk_field "$out" socket)))
    label="no spinners"
    [ "$run" = spin ] && label="$SPINNERS spinner(s)"
    printf '%-22s %10s %10s %10s %10s %10s %8s\n' "$label" "$(wrk_field "$out" rps)" "$(wrk_field "$out" p50)" \
        "$(wrk_field "$out" p90)" "$(wrk_field "$out" p99)" "$(wrk_field "$out" requests)" "$errors"
done
echo
cat "$WORK"/spinner-*.txt 2>/dev/null | awk '
    { n++; codes[$1]++; if ($2 > max) max = $2; if (min == "" || $2 < min) min = $2 }
    END {
        line = ""
        for (c in codes) line = line sprintf(" %s x%d", c, codes[c])
        printf "spin requests: %d (status:%s), each took %.2f..%.2f s (deadline 5 s)\n", n, line, min, max
    }'
grep -q 'deadline exceeded' "$WORK/pmnc.log" && echo "pmnc log: $(grep -c 'deadline exceeded' "$WORK/pmnc.log") 'deadline exceeded' warning(s)"
true
