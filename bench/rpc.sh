#!/usr/bin/env bash
# JSON-RPC and XML-RPC calls/s of a trivial method (it returns its argument), in one run on one
# pmnc process:
#   http       the same function behind a plain http Lua handler that reads the JSON-RPC body
#              (request.json) and returns the JSON-RPC response table (the baseline)
#   jsonrpc    the jsonrpc interface (envelope read and written in Rust)
#   xmlrpc     the xmlrpc interface
#   python     Python's SimpleXMLRPCServer serving the same method (one thread, as it ships)
# wrk -t2 -c32 POSTs the body of one call; prints req/s, p50/p99 and the pmnc process's CPU per
# call (from /proc/PID/stat before and after). Targets: jsonrpc CPU per call <= 1.2x http's;
# xmlrpc calls/s above Python's. Never fails because of a figure.
#
#   bench/rpc.sh                  DURATION=10 WARMUP=2 WORKERS=2
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

mkdir -p "$WORK/cage"
cat >"$WORK/cage/cage.toml" <<'TOML'
[interfaces.http]
protocol = "http"
listen = "127.0.0.1:0"
handler = "echo.http"
access_log = "off"

[interfaces.jsonrpc]
protocol = "jsonrpc"
listen = "127.0.0.1:0"
access_log = "off"
methods = { echo = "echo.echo" }

[interfaces.xmlrpc]
protocol = "xmlrpc"
listen = "127.0.0.1:0"
access_log = "off"
methods = { echo = "echo.echo" }
TOML
cat >"$WORK/cage/echo.lua" <<'LUA'
local M = {}
function M.echo(x) return x end
-- The same call behind a plain http handler: the JSON-RPC body read by request.json, the
-- response table sent as JSON.
function M.http(request)
  local call = request.json
  return { jsonrpc = "2.0", result = M.echo(call.params[1]), id = call.id }
end
return M
LUA
JSON_BODY='{"jsonrpc":"2.0","method":"echo","params":["hello"],"id":1}'
XML_BODY='<?xml version="1.0"?><methodCall><methodName>echo</methodName><params><param><value><string>hello</string></value></param></params></methodCall>'
post_script() {
    local file="$1" type="$2" body="$3"
    printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "%s"\nwrk.body = [[%s]]\n' "$type" "$body" >"$file"
}
post_script "$WORK/json.lua" application/json "$JSON_BODY"
post_script "$WORK/xml.lua" text/xml "$XML_BODY"

cat >"$WORK/xmlrpc_server.py" <<'PY'
import sys
from xmlrpc.server import SimpleXMLRPCServer
server = SimpleXMLRPCServer(("127.0.0.1", 0), allow_none=True, logRequests=False)
server.register_function(lambda x: x, "echo")
print("listening on 127.0.0.1:%d" % server.server_address[1], flush=True)
server.serve_forever()
PY

start_cage "$WORK/cage" "$WORK/pmnc.log" --workers "$WORKERS" --no-watch
PMNC_PID=$BG_PID
port_of() { grep -E "interface=$1( |$)" "$WORK/pmnc.log" | grep -Eo 'listening on 127\.0\.0\.1:[0-9]+' | head -n1 | grep -Eo '[0-9]+$'; }
HTTP_PORT="$(port_of http)"
JSON_PORT="$(port_of jsonrpc)"
XML_PORT="$(port_of xmlrpc)"
[ -n "$HTTP_PORT" ] && [ -n "$JSON_PORT" ] && [ -n "$XML_PORT" ] || { echo "ports not found in the log:"; cat "$WORK/pmnc.log"; exit 1; }
start_bg "$WORK/python.log" python3 "$WORK/xmlrpc_server.py"
PY_PID=$BG_PID
wait_for_line "$WORK/python.log" 'listening on' "$PY_PID" 20 || exit 1
PY_PORT="$(grep -Eo '[0-9]+$' "$WORK/python.log" | head -n1)"

# Sanity: each server answers the call.
for url in "http://127.0.0.1:$HTTP_PORT/" "http://127.0.0.1:$JSON_PORT/"; do
    out="$(curl -s -m 5 -H 'content-type: application/json' -d "$JSON_BODY" "$url")"
    [[ "$out" == *'"result":"hello"'* ]] || { echo "$url answered: $out"; exit 1; }
done
for url in "http://127.0.0.1:$XML_PORT/" "http://127.0.0.1:$PY_PORT/RPC2"; do
    out="$(curl -s -m 5 -H 'content-type: text/xml' -d "$XML_BODY" "$url")"
    [[ "$out" == *'<string>hello</string>'* ]] || { echo "$url answered: $out"; exit 1; }
done

measure() {
    local name="$1" url="$2" script="$3" pid="$4"
    if [ "$WARMUP" -gt 0 ]; then
        run_wrk "$WORK/warmup-$name.txt" -t2 -c32 -d"${WARMUP}s" -s "$script" "$url"
    fi
    echo "== $name: wrk -t2 -c32 -d${DURATION}s --latency -s $(basename "$script") $url"
    local before after
    before="$(process_cpu "$pid")"
    run_wrk "$WORK/wrk-$name.txt" -t2 -c32 -d"${DURATION}s" --latency -s "$script" "$url"
    after="$(process_cpu "$pid")"
    echo "$((${after:-0} - ${before:-0}))" >"$WORK/ticks-$name.txt"
    [ -n "$(wrk_field "$WORK/wrk-$name.txt" rps)" ] || { echo "wrk printed no figures:"; cat "$WORK/wrk-$name.txt"; exit 1; }
}

echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); pmnc: $WORKERS workers; wrk and Python share the machine"
measure http "http://127.0.0.1:$HTTP_PORT/" "$WORK/json.lua" "$PMNC_PID"
measure jsonrpc "http://127.0.0.1:$JSON_PORT/" "$WORK/json.lua" "$PMNC_PID"
measure xmlrpc "http://127.0.0.1:$XML_PORT/" "$WORK/xml.lua" "$PMNC_PID"
measure python "http://127.0.0.1:$PY_PORT/RPC2" "$WORK/xml.lua" "$PY_PID"

HZ="$(getconf CLK_TCK 2>/dev/null || echo 100)"
echo
printf '%-10s %12s %10s %10s %10s %8s %14s\n' "server" "calls/s" "p50" "p99" "calls" "errors" "CPU us/call"
for name in http jsonrpc xmlrpc python; do
    out="$WORK/wrk-$name.txt"
    errors=$(($(wrk_field "$out" non2xx) + $(wrk_field "$out" socket)))
    cpu="$(awk -v t="$(cat "$WORK/ticks-$name.txt")" -v n="$(wrk_field "$out" requests)" -v hz="$HZ" 'BEGIN { if (n > 0) printf "%.1f", t / hz / n * 1e6 }')"
    printf '%-10s %12s %10s %10s %10s %8s %14s\n' "$name" "$(wrk_field "$out" rps)" "$(wrk_field "$out" p50)" "$(wrk_field "$out" p99)" "$(wrk_field "$out" requests)" "$errors" "$cpu"
    echo "$cpu" >"$WORK/cpu-$name.txt"
done
cpu_ratio="$(awk -v a="$(cat "$WORK/cpu-jsonrpc.txt")" -v b="$(cat "$WORK/cpu-http.txt")" 'BEGIN { if (b > 0) printf "%.2f", a / b }')"
rps_ratio="$(awk -v a="$(wrk_field "$WORK/wrk-xmlrpc.txt" rps)" -v b="$(wrk_field "$WORK/wrk-python.txt" rps)" 'BEGIN { if (b > 0) printf "%.1f", a / b }')"
verdict="$(awk -v r="$cpu_ratio" 'BEGIN { print (r != "" && r <= 1.2) ? "met" : "MISSED" }')"
echo "jsonrpc CPU per call / http handler's:   $cpu_ratio (target <= 1.2: $verdict)"
echo "xmlrpc calls/s / Python SimpleXMLRPCServer: $rps_ratio"
exit 0
