#!/usr/bin/env bash
# HTTPS hello-world: a Lua handler (`return "Hello, world!"`) on an interface with `tls`, against
# Debian's nginx with TLS and 2 workers running the same handler in its Lua module
# (`content_by_lua_block { ngx.print("Hello, world!") }`, libnginx-mod-http-lua), and nginx
# answering from its config (`return 200 "Hello, world!"`, no handler: shown, no target), in the
# same run, with the same certificate (ECDSA P-256) and the same client. Prints:
#   - keep-alive req/s: wrk -t2 -c64 over kept TLS connections (target: >= 1.0x nginx + Lua)
#   - new connections/s: wrk with `Connection: close`, a TLS handshake per request (target: >= 0.8x)
#   - full handshakes/s: `openssl s_time -new` (no session resumption; one client process)
# Never fails because of a figure.
#
#   bench/https-hello.sh                 10 s per measurement
#   DURATION=30 WORKERS=2 WARMUP=2 ...   seconds per run; workers of both servers; warm-up seconds
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
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
if [ ! -x "$NGINX" ]; then
    echo "== nginx not found; running: apt-get install -y nginx"
    apt-get install -y -q nginx >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q nginx >/dev/null 2>&1; }
    NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
    [ -x "$NGINX" ] || { echo "SKIPPED: nginx could not be installed (apt-get install -y nginx); install it and rerun."; exit 0; }
fi
NGINX_LUA=/usr/lib/nginx/modules/ngx_http_lua_module.so
NGINX_NDK=/usr/lib/nginx/modules/ndk_http_module.so
if [ ! -f "$NGINX_LUA" ]; then
    echo "== nginx's Lua module not found; running: apt-get install -y libnginx-mod-http-lua"
    apt-get install -y -q libnginx-mod-http-lua >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libnginx-mod-http-lua >/dev/null 2>&1; }
    [ -f "$NGINX_LUA" ] || { echo "SKIPPED: libnginx-mod-http-lua could not be installed (apt-get install -y libnginx-mod-http-lua); install it and rerun."; exit 0; }
fi
command -v openssl >/dev/null 2>&1 || { echo "SKIPPED: openssl is needed to make the certificate (apt-get install -y openssl)"; exit 0; }

# The same self-signed pair for both servers, made as docs/interfaces/http.md says.
tls="$WORK/tls"
mkdir -p "$tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
    -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
    -keyout "$tls/key.pem" -out "$tls/cert.pem" 2>/dev/null || { echo "openssl could not make a certificate"; exit 1; }

cage="$WORK/hello"
mkdir -p "$cage"
# The access log off on both sides (nginx below: `access_log off`).
cat >"$cage/cage.toml" <<EOF
request_timeout = "10s"

[interfaces.http]
listen = "127.0.0.1:0"
access_log = "off"
max_connections = 100000
tls = { cert = "$tls/cert.pem", key = "$tls/key.pem", max_handshakes = 100000 }
EOF
cat >"$cage/http.lua" <<'EOF'
local M = {}

function M.handle(request, response)
  return "Hello, world!"
end

return M
EOF

# nginx: a port nothing listens on now (the OS picks it; nginx cannot log a port it chose).
nginx_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
mkdir -p "$WORK/nginx/logs" "$WORK/nginx/tmp"
user_line=""
[ "$(id -u)" = 0 ] && user_line="user root;"
cat >"$WORK/nginx/nginx.conf" <<EOF
$user_line
load_module $NGINX_NDK;
load_module $NGINX_LUA;
worker_processes $WORKERS;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$nginx_port ssl;
        ssl_certificate $tls/cert.pem;
        ssl_certificate_key $tls/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            default_type text/plain;
            return 200 "Hello, world!";
        }
        location = /lua {
            default_type text/plain;
            content_by_lua_block { ngx.print("Hello, world!") }
        }
    }
}
EOF

# measure NAME URL PID [WRK ARGS...]: warm-up, then the measured run into $WORK/wrk-NAME.txt.
measure() {
    local name="$1" url="$2" pid="$3"
    shift 3
    if [ "$WARMUP" -gt 0 ]; then
        run_wrk "$WORK/warmup-$name.txt" -t2 -c64 -d"${WARMUP}s" "$@" "$url"
    fi
    echo "== $name: wrk -t2 -c64 -d${DURATION}s $* $url"
    local before after
    before="$(process_cpu "$pid")"
    run_wrk "$WORK/wrk-$name.txt" -t2 -c64 -d"${DURATION}s" --latency "$@" "$url"
    after="$(process_cpu "$pid")"
    echo "$((${after:-0} - ${before:-0}))" >"$WORK/ticks-$name.txt"
    if [ -z "$(wrk_field "$WORK/wrk-$name.txt" rps)" ]; then
        echo "wrk printed no figures:"
        cat "$WORK/wrk-$name.txt"
        exit 1
    fi
}

# s_time NAME PORT: full handshakes per second with `openssl s_time -new` for DURATION seconds.
s_time() {
    local name="$1" port="$2"
    echo "== $name: openssl s_time -new -time $DURATION (full handshakes, one client)"
    timeout "$((DURATION + 30))" openssl s_time -connect "127.0.0.1:$port" -new -time "$DURATION" \
        >"$WORK/stime-$name.txt" 2>&1 </dev/null || true
    awk '/connections in .* real seconds/ { for (i = 1; i <= NF; i++) if ($i == "connections") { c = $(i - 1) } ; for (i = 1; i <= NF; i++) if ($i == "real") { s = $(i - 1) } ; if (s > 0) printf "%.0f\n", c / s }' \
        "$WORK/stime-$name.txt" | tail -n1 >"$WORK/hs-$name.txt"
}

echo "== machine: $(nproc) cores; servers: $WORKERS workers each; the clients share the machine"

start_cage "$cage" "$WORK/pmnc.log" --workers "$WORKERS"
lua_pid=$BG_PID
got="$(curl -s --max-time 5 --cacert "$tls/cert.pem" "https://localhost:$PORT/")"
[ "$got" = "Hello, world!" ] || { echo "sanity check failed: pmnc answered '$got'"; exit 1; }
measure lua-keepalive "https://127.0.0.1:$PORT/" "$lua_pid"
measure lua-handshake "https://127.0.0.1:$PORT/" "$lua_pid" -H "Connection: close"
s_time lua "$PORT"
stop_pid "$lua_pid"

start_bg "$WORK/nginx.log" "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g "daemon off;"
nginx_pid=$BG_PID
for _ in $(seq 50); do
    curl -s --max-time 1 --cacert "$tls/cert.pem" "https://localhost:$nginx_port/" >/dev/null 2>&1 && break
    kill -0 "$nginx_pid" 2>/dev/null || { echo "nginx exited:"; cat "$WORK/nginx.log" "$WORK/nginx/logs/error.log"; exit 1; }
    sleep 0.1
done
for path in / /lua; do
    got="$(curl -s --max-time 5 --cacert "$tls/cert.pem" "https://localhost:$nginx_port$path")"
    [ "$got" = "Hello, world!" ] || { echo "sanity check failed: nginx answered '$got' on $path"; cat "$WORK/nginx/logs/error.log"; exit 1; }
done
measure nginx-lua-keepalive "https://127.0.0.1:$nginx_port/lua" "$nginx_pid"
measure nginx-keepalive "https://127.0.0.1:$nginx_port/" "$nginx_pid"
measure nginx-handshake "https://127.0.0.1:$nginx_port/" "$nginx_pid" -H "Connection: close"
s_time nginx "$nginx_port"
stop_pid "$nginx_pid"

echo
hz="$(getconf CLK_TCK 2>/dev/null || echo 100)"
printf '%-34s %10s %10s %10s %10s %8s %12s\n' "run" "req/s" "p50" "p99" "requests" "errors" "CPU us/req"
for name in lua-keepalive nginx-lua-keepalive nginx-keepalive lua-handshake nginx-handshake; do
    out="$WORK/wrk-$name.txt"
    errors=$(($(wrk_field "$out" non2xx) + $(wrk_field "$out" socket)))
    cpu="$(awk -v t="$(cat "$WORK/ticks-$name.txt")" -v r="$(wrk_field "$out" requests)" -v hz="$hz" \
        'BEGIN { if (r > 0) printf "%.1f", t / hz / r * 1e6; else print "?" }')"
    case "$name" in
        lua-keepalive) label="pmnc Lua, keep-alive" ;;
        nginx-lua-keepalive) label="nginx + Lua, keep-alive" ;;
        nginx-keepalive) label="nginx static, keep-alive" ;;
        lua-handshake) label="pmnc Lua, new connection each" ;;
        nginx-handshake) label="nginx, new connection each" ;;
    esac
    printf '%-34s %10s %10s %10s %10s %8s %12s\n' "$label" "$(wrk_field "$out" rps)" \
        "$(wrk_field "$out" p50)" "$(wrk_field "$out" p99)" "$(wrk_field "$out" requests)" "$errors" "$cpu"
done
printf '%-34s %10s\n' "pmnc, openssl s_time -new" "$(cat "$WORK/hs-lua.txt" 2>/dev/null)/s"
printf '%-34s %10s\n' "nginx, openssl s_time -new" "$(cat "$WORK/hs-nginx.txt" 2>/dev/null)/s"
ratio() {
    awk -v l="$1" -v n="$2" -v t="$3" -v what="$4" 'BEGIN {
        r = (n > 0) ? l / n : 0
        if (t == "") { printf "%s: %.3f (no target)\n", what, r; exit }
        printf "%s: %.3f (target >= %s): %s\n", what, r, t, (r >= t ? "met" : "MISSED")
    }'
}
ratio "$(wrk_field "$WORK/wrk-lua-keepalive.txt" rps)" "$(wrk_field "$WORK/wrk-nginx-lua-keepalive.txt" rps)" 1.0 "keep-alive req/s pmnc/nginx+Lua"
ratio "$(wrk_field "$WORK/wrk-lua-keepalive.txt" rps)" "$(wrk_field "$WORK/wrk-nginx-keepalive.txt" rps)" "" "keep-alive req/s pmnc/nginx static"
ratio "$(wrk_field "$WORK/wrk-lua-handshake.txt" rps)" "$(wrk_field "$WORK/wrk-nginx-handshake.txt" rps)" 0.8 "new connections/s (wrk) pmnc/nginx"
ratio "$(cat "$WORK/hs-lua.txt" 2>/dev/null || echo 0)" "$(cat "$WORK/hs-nginx.txt" 2>/dev/null || echo 0)" 0.8 "full handshakes/s (s_time) pmnc/nginx"
