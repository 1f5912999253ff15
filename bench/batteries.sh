#!/usr/bin/env bash
# Helpers of integration code (issue 25): req/s of a handler that base64-encodes, HMAC-SHA1-signs
# and regex-matches a 4 KB POST body, in pmnc (pmnc.base64, pmnc.crypto.hmac, pmnc.re.match)
# against nginx with its Lua module doing the same (ngx.encode_base64, ngx.hmac_sha1,
# ngx.re.match with PCRE JIT), same worker count, same run. Target: ratio >= 1.0.
# Then, with one worker, the latency of quick requests while other requests on that worker each
# gzip 4 MiB of random bytes ten times (target: every quick request under 50 ms).
# Never fails because of a figure.
#
#   bench/batteries.sh                  wrk -t2 -c64 -d10s against each
#   DURATION=30 WORKERS=1 bench/batteries.sh
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

NGINX_LUA=/usr/lib/nginx/modules/ngx_http_lua_module.so
NGINX_NDK=/usr/lib/nginx/modules/ndk_http_module.so
if ! command -v nginx >/dev/null 2>&1 || [ ! -f "$NGINX_LUA" ]; then
    sudo=""
    [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo="sudo -n"
    echo "== nginx or its Lua module missing; running: $sudo apt-get install -y nginx libnginx-mod-http-lua"
    $sudo apt-get install -y nginx libnginx-mod-http-lua || { $sudo apt-get update -q && $sudo apt-get install -y nginx libnginx-mod-http-lua; }
fi
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
if [ ! -x "$NGINX" ] || [ ! -f "$NGINX_LUA" ]; then
    echo "SKIPPED: nginx with libnginx-mod-http-lua could not be installed (apt-get install -y nginx libnginx-mod-http-lua)"
    exit 0
fi

# The body: 4096 bytes of JSON-ish text with one "id" to find near its end.
python3 - "$WORK/body" <<'EOF'
import sys
head, tail = '{"text":"', '","id":"ord_12345"}'
filler = ("lorem ipsum dolor sit amet, " * 200)[:4096 - len(head) - len(tail)]
body = head + filler + tail
open(sys.argv[1], "w").write(body)
EOF
[ "$(wc -c <"$WORK/body")" = 4096 ] || { echo "body is not 4096 bytes"; exit 1; }
cat >"$WORK/post.lua" <<EOF
local f = io.open("$WORK/body", "rb")
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
EOF
WANT="5464 20 ord_12345"

cage="$WORK/batteries"
mkdir -p "$cage"
cat >"$cage/cage.toml" <<'EOF'
request_timeout = "30s"

[interfaces.http]
listen = "127.0.0.1:0"
EOF
cat >"$cage/http.lua" <<'EOF'
local M = {}

function M.handle(request, response)
  if request.path == "/heavy" then
    local data = pmnc.crypto.random(4 * 1024 * 1024)
    local total = 0
    for _ = 1, 10 do total = total + #pmnc.compress.gzip(data) end
    return tostring(total)
  elseif request.path == "/quick" then
    return "quick"
  end
  local body = request.body
  local b = pmnc.base64.encode(body)
  local mac = pmnc.crypto.hmac("sha1", "secret", body)
  local m = pmnc.re.match(body, [["id":"(\w+)"]])
  return #b .. " " .. #mac .. " " .. (m and m[1] or "-")
end

return M
EOF

mkdir -p "$WORK/nginx/logs"
cat >"$WORK/nginx/nginx.conf" <<EOF
load_module $NGINX_NDK;
load_module $NGINX_LUA;
worker_processes $WORKERS;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    lua_code_cache on;
    server {
        listen 127.0.0.1:NGINX_PORT;
        location / {
            client_body_buffer_size 16k;
            client_max_body_size 1m;
            content_by_lua_block {
                ngx.req.read_body()
                local body = ngx.req.get_body_data() or ""
                local b = ngx.encode_base64(body)
                local mac = ngx.hmac_sha1("secret", body)
                local m = ngx.re.match(body, [["id":"(\\w+)"]], "jo")
                ngx.print(#b, " ", #mac, " ", m and m[1] or "-")
            }
        }
    }
}
EOF
NGINX_PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
sed -i "s/NGINX_PORT/$NGINX_PORT/" "$WORK/nginx/nginx.conf"

check_post() {
    local url="$1" got
    got="$(curl -s --max-time 5 --data-binary @"$WORK/body" -H 'content-type: application/json' "$url")" || true
    [ "$got" = "$WANT" ] || { echo "sanity check failed: $url answered '$got', expected '$WANT'"; exit 1; }
}

measure() {
    local name="$1" url="$2"
    if [ "$WARMUP" -gt 0 ]; then
        run_wrk "$WORK/warmup-$name.txt" -t2 -c64 -d"${WARMUP}s" -s "$WORK/post.lua" "$url"
    fi
    echo "== $name: wrk -t2 -c64 -d${DURATION}s --latency -s post.lua $url"
    run_wrk "$WORK/wrk-$name.txt" -t2 -c64 -d"${DURATION}s" --latency -s "$WORK/post.lua" "$url"
    [ -n "$(wrk_field "$WORK/wrk-$name.txt" rps)" ] || { echo "wrk printed no figures:"; cat "$WORK/wrk-$name.txt"; exit 1; }
}

echo "== machine: $(nproc) cores; servers: $WORKERS workers each; wrk shares the machine"

start_cage "$cage" "$WORK/pmnc.log" --workers "$WORKERS"
pmnc_pid=$BG_PID
check_post "http://127.0.0.1:$PORT/"
measure pmnc "http://127.0.0.1:$PORT/"
stop_pid "$pmnc_pid"

start_bg "$WORK/nginx/stdout.log" "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g "daemon off;"
nginx_pid=$BG_PID
for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$NGINX_PORT/" && break; sleep 0.1; done
check_post "http://127.0.0.1:$NGINX_PORT/"
measure nginx "http://127.0.0.1:$NGINX_PORT/"
stop_pid "$nginx_pid"

echo
printf '%-34s %12s %10s %10s %10s %8s\n' "server" "req/s" "p50" "p99" "requests" "errors"
for name in pmnc nginx; do
    out="$WORK/wrk-$name.txt"
    errors=$(($(wrk_field "$out" non2xx) + $(wrk_field "$out" socket)))
    label="pmnc (pmnc.base64/crypto/re)"
    [ "$name" = nginx ] && label="nginx + Lua module (ngx.*)"
    printf '%-34s %12s %10s %10s %10s %8s\n' "$label" "$(wrk_field "$out" rps)" \
        "$(wrk_field "$out" p50)" "$(wrk_field "$out" p99)" "$(wrk_field "$out" requests)" "$errors"
done
awk -v p="$(wrk_field "$WORK/wrk-pmnc.txt" rps)" -v n="$(wrk_field "$WORK/wrk-nginx.txt" rps)" 'BEGIN {
    ratio = (n > 0) ? p / n : 0
    printf "ratio pmnc/nginx: %.3f (target >= 1.0): %s\n", ratio, (ratio >= 1.0 ? "met" : "MISSED")
}'

# Part two: one worker; requests gzipping 40 MiB each keep arriving while wrk measures /quick.
echo
echo "== one worker: /heavy (ten gzips of 4 MiB of random bytes) in a loop, wrk -t1 -c4 on /quick"
start_cage "$cage" "$WORK/pmnc-1.log" --workers 1
one_pid=$BG_PID
expect_body "http://127.0.0.1:$PORT/quick" "quick"
(
    end=$((SECONDS + DURATION + 2))
    n=0
    while [ $SECONDS -lt $end ]; do
        curl -s --max-time 60 -o /dev/null "http://127.0.0.1:$PORT/heavy" && n=$((n + 1))
    done
    echo "$n" >"$WORK/heavy-count"
) &
heavy_loop=$!
sleep 1
run_wrk "$WORK/wrk-quick.txt" -t1 -c4 -d"${DURATION}s" --latency "http://127.0.0.1:$PORT/quick"
wait "$heavy_loop"
stop_pid "$one_pid"
max="$(awk '/^ +Latency/ {print $4}' "$WORK/wrk-quick.txt")"
printf 'quick requests beside heavy ones: %s requests, p50 %s, p99 %s, max %s; heavy requests done: %s\n' \
    "$(wrk_field "$WORK/wrk-quick.txt" requests)" "$(wrk_field "$WORK/wrk-quick.txt" p50)" \
    "$(wrk_field "$WORK/wrk-quick.txt" p99)" "$max" "$(cat "$WORK/heavy-count" 2>/dev/null || echo ?)"
awk -v m="$(to_ms "$max")" 'BEGIN { printf "slowest quick request: %.1f ms (target < 50 ms): %s\n", m, (m < 50 ? "met" : "MISSED") }'
