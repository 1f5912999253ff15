#!/usr/bin/env bash
# The hello benchmark with what a web app adds: a route table of 200 routes, and the access log.
# Runs, one after another on the same machine, wrk -t2 -c64 against:
#   fn           the hello handler as a function, access_log = "off"      (the baseline)
#   routes200    a route table of 200 routes, the request taking its "GET /" route, access log off
#   routes200p   the same table, the request taking a route with a {id} parameter (/r150/7/items)
#   log          the function handler with access_log = "combined" (written to a file)
#   nginx        nginx with its Lua module: content_by_lua_block, access_log off
#   nginx-log    the same with its access log on (a file)
# and prints req/s, p50/p99, CPU per request, and the ratios routes200/fn, log/fn, fn/nginx and
# log/nginx-log. Never fails because of a figure.
#
#   bench/http-routes.sh                DURATION=10 WARMUP=2 WORKERS=2
#   NGINX=0 bench/http-routes.sh        without the nginx runs
set -uo pipefail
source "$(dirname "$0")/common.sh"

DURATION="${DURATION:-10}"
WORKERS="${WORKERS:-2}"
WARMUP="${WARMUP:-2}"
WRK_LIMIT=$((DURATION > WARMUP ? DURATION : WARMUP))
for v in DURATION WORKERS WARMUP; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "$v must be a whole number, got '${!v}'"; exit 2; }
done

build
ensure_wrk

hello_cage "$WORK/fn" http.handle off
hello_cage "$WORK/routes200" http.routes off
hello_cage "$WORK/routes200p" http.routes off
hello_cage "$WORK/log" http.handle combined

measure() {
    local name="$1" url="$2" pid="$3"
    if [ "$WARMUP" -gt 0 ]; then
        run_wrk "$WORK/warmup-$name.txt" -t2 -c64 -d"${WARMUP}s" "$url"
    fi
    echo "== $name: wrk -t2 -c64 -d${DURATION}s --latency $url"
    local before after
    before="$(process_cpu "$pid")"
    run_wrk "$WORK/wrk-$name.txt" -t2 -c64 -d"${DURATION}s" --latency "$url"
    after="$(process_cpu "$pid")"
    echo "$((${after:-0} - ${before:-0}))" >"$WORK/ticks-$name.txt"
    [ -n "$(wrk_field "$WORK/wrk-$name.txt" rps)" ] || { echo "wrk printed no figures:"; cat "$WORK/wrk-$name.txt"; exit 1; }
}

echo "== machine: $(nproc) cores; servers: $WORKERS workers; wrk shares the machine"
names=()
for name in fn routes200 routes200p log; do
    start_cage "$WORK/$name" "$WORK/$name.log" --workers "$WORKERS" --no-watch
    pid=$BG_PID
    path=/
    [ "$name" = routes200p ] && path=/r150/7/items
    expect_body "http://127.0.0.1:$PORT$path" "Hello, world!"
    measure "$name" "http://127.0.0.1:$PORT$path" "$pid"
    stop_pid "$pid"
    names+=("$name")
done
if [ "$name" = log ]; then
    echo "access log lines written: $(grep -c '"GET / HTTP/1.1" 200' "$WORK/log.log")"
fi

if [ "${NGINX:-1}" = 1 ]; then
    for name in nginx nginx-log; do
        log="off"
        [ "$name" = nginx-log ] && log="$WORK/$name/access.log combined"
        start_nginx_lua "$WORK/$name" "$WORKERS" "$log" || break
        pid=$BG_PID
        expect_body "http://127.0.0.1:$PORT/" "Hello, world!"
        # nginx's CPU is its workers' (children of the master).
        measure "$name" "http://127.0.0.1:$PORT/" "$pid"
        stop_pid "$pid"
        names+=("$name")
    done
fi

echo
printf '%-12s %12s %10s %10s %10s %8s\n' "server" "req/s" "p50" "p99" "requests" "errors"
for name in "${names[@]}"; do
    out="$WORK/wrk-$name.txt"
    errors=$(($(wrk_field "$out" non2xx) + $(wrk_field "$out" socket)))
    printf '%-12s %12s %10s %10s %10s %8s\n' "$name" "$(wrk_field "$out" rps)" "$(wrk_field "$out" p50)" "$(wrk_field "$out" p99)" "$(wrk_field "$out" requests)" "$errors"
done
rps() { wrk_field "$WORK/wrk-$1.txt" rps 2>/dev/null; }
ratio() {
    local a b
    a="$(rps "$1")"
    b="$(rps "$2")"
    [ -n "$a" ] && [ -n "$b" ] && awk -v a="$a" -v b="$b" -v label="$3" 'BEGIN { if (b > 0) printf "%-44s %.3f\n", label, a / b }'
}
ratio routes200 fn "200 routes, GET / / function handler:"
ratio routes200p fn "200 routes, a {id} route / function handler:"
ratio log fn "access log on / off:"
[ -f "$WORK/wrk-nginx.txt" ] && ratio fn nginx "pmnc / nginx+Lua (no access log):"
[ -f "$WORK/wrk-nginx-log.txt" ] && ratio log nginx-log "pmnc / nginx+Lua (access log on):"
exit 0
