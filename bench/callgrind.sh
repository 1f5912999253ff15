#!/usr/bin/env bash
# Exact instructions per request (callgrind), for the measures that wrk's noisy ratios cannot
# settle on this shared machine. Each variant runs the release binary under callgrind with one
# worker twice, answering SHORT and then LONG keep-alive requests from one client; the
# difference of the two totals divided by LONG - SHORT is what one request costs, with start-up
# and shutdown cancelled out. Variants (the cages of bench/http-routes.sh):
#   fn           the hello handler as a function, access_log = "off"
#   fnp          the same, requested as "/r150/7/items" (the path of routes200p)
#   log          the same with access_log = "combined" (to a file)
#   json         the same with access_log = "json"
#   routes200    a route table of 200 routes, the request taking its "GET /" route
#   routes200p   the same table, the request taking "/r150/7/items" (three segments, a parameter)
#
#   bench/callgrind.sh                 all variants, SHORT=200 LONG=2200
#   bench/callgrind.sh fn log          the ones named
# Needs valgrind (apt-get install valgrind). Never fails because of a figure.
set -uo pipefail
source "$(dirname "$0")/common.sh"

SHORT="${SHORT:-200}"
LONG="${LONG:-2200}"
for v in SHORT LONG; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "$v must be a whole number, got '${!v}'"; exit 2; }
done
[ "$LONG" -gt "$SHORT" ] || { echo "LONG must be more than SHORT"; exit 2; }
if ! command -v valgrind >/dev/null 2>&1; then
    echo "SKIPPED: no valgrind (apt-get install valgrind)"
    exit 0
fi
build


# One client on one keep-alive connection, N requests one after another; checks every answer.
cat >"$WORK/client.py" <<'EOF'
import http.client, sys
port, path, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for i in range(n):
    c.request("GET", path)
    r = c.getresponse()
    body = r.read()
    if r.status != 200 or body != b"Hello, world!":
        sys.exit(f"request {i}: {r.status} {body[:80]!r}")
EOF

# total VARIANT PATH N: instructions of a whole run answering N requests.
total() {
    local name="$1" path="$2" n="$3" out="$WORK/cg-$1-$3.out" log="$WORK/cg-$1-$3.log"
    start_bg "$log" valgrind --tool=callgrind --callgrind-out-file="$out" "$PMNC" run "$WORK/$name" --workers 1 --no-watch
    local pid=$BG_PID
    wait_for_line "$log" 'running [0-9]+ cage' "$pid" 120 >/dev/null || { echo "$name did not start:"; tail -n 20 "$log"; return 1; }
    local port
    port="$(grep -Eo 'listening on 127\.0\.0\.1:[0-9]+' "$log" | head -n1 | grep -Eo '[0-9]+$')"
    python3 "$WORK/client.py" "$port" "$path" "$n" || { echo "$name: the client failed"; stop_pid "$pid"; return 1; }
    # callgrind writes its totals when the process exits; a SIGTERM stops pmnc gracefully.
    kill -TERM "$pid"
    for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    wait "$pid" 2>/dev/null
    awk '/^(summary|totals):/ {print $2; exit}' "$out"
}

VARIANTS=("$@")
[ "${#VARIANTS[@]}" -gt 0 ] || VARIANTS=(fn log json routes200 fnp routes200p)
echo "== instructions per request: (run of $LONG requests - run of $SHORT) / $((LONG - SHORT)), one worker"
printf '%-12s %14s %14s %12s\n' variant "$SHORT req" "$LONG req" "per request"
for name in "${VARIANTS[@]}"; do
    case "$name" in
        fn) hello_cage "$WORK/$name" http.handle off; path=/ ;;
        fnp) hello_cage "$WORK/$name" http.handle off; path=/r150/7/items ;;
        log) hello_cage "$WORK/$name" http.handle combined; path=/ ;;
        json) hello_cage "$WORK/$name" http.handle json; path=/ ;;
        routes200) hello_cage "$WORK/$name" http.routes off; path=/ ;;
        routes200p) hello_cage "$WORK/$name" http.routes off; path=/r150/7/items ;;
        *) echo "unknown variant $name (fn, fnp, log, json, routes200, routes200p)"; exit 2 ;;
    esac
    a="$(total "$name" "$path" "$SHORT")" || continue
    b="$(total "$name" "$path" "$LONG")" || continue
    printf '%-12s %14s %14s %12s\n' "$name" "$a" "$b" "$(awk -v a="$a" -v b="$b" -v n="$((LONG - SHORT))" 'BEGIN { printf "%.0f", (b - a) / n }')"
done
exit 0
