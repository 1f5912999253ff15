#!/usr/bin/env bash
# HTTP hello-world: a Lua handler (`return "Hello, world!"`) against `pmnc raw-http` (pure hyper,
# same worker layout, same binary) and nginx with its Lua module (`content_by_lua_block`, the same
# number of worker processes; NGINX=0 leaves it out). Prints req/s of each, the ratios Lua/raw
# (target >= 0.90) and Lua/nginx+Lua (target >= 1.1, issue 19) and p50/p99 latency. Never fails
# because of a figure.
#
#   bench/http-hello.sh                 wrk -t2 -c64 -d10s against each
#   DURATION=30 bench/http-hello.sh     longer runs (seconds)
#   WORKERS=2 WARMUP=2 ...              worker threads of both servers; warm-up seconds (0: none)
set -uo pipefail
source "$(dirname "$0")/common.sh"

DURATION="${DURATION:-10}"
WORKERS="${WORKERS:-2}"
WARMUP="${WARMUP:-2}"
WRK_LIMIT=$((DURATION > WARMUP ? DURATION : WARMUP))
for v in DURATION WORKERS WARMUP; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "$v must be a whole number, got '${!v}'"; exit 2; }
done
[ "$DURATION" -ge 1 ] || { echo "DURATION must be at least 1"; exit 2; }

build
ensure_wrk

cage="$WORK/hello"
mkdir -p "$cage"
# The access log off, as the nginx peer runs (`access_log off`, issue 19's setting): what the log
# costs is bench/http-routes.sh's measure.
cat >"$cage/cage.toml" <<'EOF'
request_timeout = "10s"

[interfaces.http]
listen = "127.0.0.1:0"
access_log = "off"
EOF
cat >"$cage/http.lua" <<'EOF'
local M = {}

function M.handle(request, response)
  return "Hello, world!"
end

return M
EOF

# measure NAME URL PID: warm-up, then the measured run; the output is kept in $WORK/wrk-NAME.txt.
measure() {
    local name="$1" url="$2" pid="$3"
    if [ "$WARMUP" -gt 0 ]; then
        run_wrk "$WORK/warmup-$name.txt" -t2 -c64 -d"${WARMUP}s" "$url"
    fi
    echo "== $name: wrk -t2 -c64 -d${DURATION}s --latency $url"
    thread_cpu "$pid" >"$WORK/cpu-before-$name.txt"
    local before after
    before="$(process_cpu "$pid")"
    run_wrk "$WORK/wrk-$name.txt" -t2 -c64 -d"${DURATION}s" --latency "$url"
    after="$(process_cpu "$pid")"
    thread_cpu "$pid" >"$WORK/cpu-after-$name.txt"
    echo "$((${after:-0} - ${before:-0}))" >"$WORK/ticks-$name.txt"
    if [ "$name" = lua ]; then
        worker_cpu_report "$WORK/cpu-before-$name.txt" "$WORK/cpu-after-$name.txt"
    fi
    if [ -z "$(wrk_field "$WORK/wrk-$name.txt" rps)" ]; then
        echo "wrk printed no figures:"
        cat "$WORK/wrk-$name.txt"
        exit 1
    fi
}

echo "== machine: $(nproc) cores; servers: --workers $WORKERS; wrk shares the machine"

start_cage "$cage" "$WORK/pmnc.log" --workers "$WORKERS"
lua_pid=$BG_PID
expect_body "http://127.0.0.1:$PORT/" "Hello, world!"
measure lua "http://127.0.0.1:$PORT/" "$lua_pid"
stop_pid "$lua_pid"

start_raw "$WORK/raw.log" "$WORKERS"
raw_pid=$BG_PID
expect_body "http://127.0.0.1:$PORT/" "Hello, world!"
measure raw "http://127.0.0.1:$PORT/" "$raw_pid"
stop_pid "$raw_pid"

names=(lua raw)
if [ "${NGINX:-1}" = 1 ] && start_nginx_lua "$WORK/nginx" "$WORKERS" off; then
    nginx_pid=$BG_PID
    expect_body "http://127.0.0.1:$PORT/" "Hello, world!"
    measure nginx "http://127.0.0.1:$PORT/" "$nginx_pid"
    stop_pid "$nginx_pid"
    names+=(nginx)
fi

echo
# CPU per request: the server process's CPU time during the measured run over its requests; less
# sensitive than req/s to what wrk and other processes take from the same cores.
hz="$(getconf CLK_TCK 2>/dev/null || echo 100)"
printf '%-28s %12s %10s %10s %10s %8s %12s\n' "server" "req/s" "p50" "p99" "requests" "errors" "CPU us/req"
for name in "${names[@]}"; do
    out="$WORK/wrk-$name.txt"
    errors=$(($(wrk_field "$out" non2xx) + $(wrk_field "$out" socket)))
    label="Lua handler (pmnc run)"
    [ "$name" = raw ] && label="pure hyper (pmnc raw-http)"
    [ "$name" = nginx ] && label="nginx + Lua module"
    cpu="$(awk -v t="$(cat "$WORK/ticks-$name.txt")" -v r="$(wrk_field "$out" requests)" -v hz="$hz" \
        'BEGIN { if (r > 0) printf "%.1f", t / hz / r * 1e6; else print "?" }')"
    printf '%-28s %12s %10s %10s %10s %8s %12s\n' "$label" "$(wrk_field "$out" rps)" \
        "$(wrk_field "$out" p50)" "$(wrk_field "$out" p99)" "$(wrk_field "$out" requests)" "$errors" "$cpu"
done
lua_rps="$(wrk_field "$WORK/wrk-lua.txt" rps)"
raw_rps="$(wrk_field "$WORK/wrk-raw.txt" rps)"
awk -v l="$lua_rps" -v r="$raw_rps" 'BEGIN {
    ratio = (r > 0) ? l / r : 0
    printf "ratio Lua/raw: %.3f (target >= 0.90): %s\n", ratio, (ratio >= 0.90 ? "met" : "MISSED")
}'
awk -v l="$(cat "$WORK/ticks-lua.txt")" -v r="$(cat "$WORK/ticks-raw.txt")" \
    -v lr="$(wrk_field "$WORK/wrk-lua.txt" requests)" -v rr="$(wrk_field "$WORK/wrk-raw.txt" requests)" 'BEGIN {
    if (l > 0 && r > 0 && lr > 0 && rr > 0)
        printf "CPU per request Lua/raw: %.2f (the same comparison, less dependent on what wrk takes from the cores)\n", (l / lr) / (r / rr)
}'
if [ -f "$WORK/wrk-nginx.txt" ]; then
    awk -v l="$lua_rps" -v n="$(wrk_field "$WORK/wrk-nginx.txt" rps)" 'BEGIN {
        ratio = (n > 0) ? l / n : 0
        printf "ratio Lua/nginx+Lua: %.3f (target >= 1.1, issue 19): %s\n", ratio, (ratio >= 1.1 ? "met" : "MISSED")
    }'
fi
