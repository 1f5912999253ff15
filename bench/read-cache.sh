#!/usr/bin/env bash
# Read cache (issue 27, docs/decisions/143): requests/s of an HTTP endpoint that reads one
# PostgreSQL row through `db.cached{key, ttl}` against the same endpoint uncached (a query per
# request) and against nginx with its Lua module reading the same row's text from a
# `lua_shared_dict` (NGINX=0 leaves it out), same run, same worker count; and, for scale, the same
# pmnc server answering a constant (no resource call at all). Prints req/s, p50/p99
# and the ratios; never fails because of a figure. When PostgreSQL is not reachable it says so
# loudly and exits 0.
#
#   bench/read-cache.sh                 wrk -t2 -c64 -d10s against each
#   DURATION=30 WORKERS=2 WARMUP=2 ...  seconds per run, worker threads/processes, warm-up seconds
#   PMNC_TEST_POSTGRES_URL=postgresql://u@127.0.0.1:5432/db bench/read-cache.sh
#   BUILD=0 bench/read-cache.sh         use the release binary as it is (no cargo build first)
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

PG_URL="${PMNC_TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/test}"
pg_hostport="${PG_URL#*://}"
pg_hostport="${pg_hostport##*@}"
pg_hostport="${pg_hostport%%/*}"
if ! timeout 2 bash -c "exec 3<>/dev/tcp/${pg_hostport%:*}/${pg_hostport##*:}" 2>/dev/null; then
    echo "SKIPPED: PostgreSQL is not reachable at $pg_hostport (PMNC_TEST_POSTGRES_URL); start it with: service postgresql start"
    exit 0
fi

if [ "${BUILD:-1}" = 1 ]; then
    build
else
    [ -x "$PMNC" ] || { echo "BUILD=0 but no binary at $PMNC"; exit 1; }
    echo "== BUILD=0: $PMNC as it is ($(source_state) now in the tree)"
fi
ensure_wrk

ROW="A1:12.50"
cage="$WORK/cached"
mkdir -p "$cage"
cat >"$cage/cage.toml" <<EOF
request_timeout = "10s"

[interfaces.http]
listen = "127.0.0.1:0"

[resources.db]
protocol = "postgresql"
url = "$PG_URL"
pool_size = $((WORKERS * 8))
EOF
cat >"$cage/http.lua" <<'EOF'
local M = {}
local db = pmnc.transaction.db
local SQL = "select sku, price from rc_bench where sku = $1"

local function text(r)
  local row = r.rows[1]
  return row.sku .. ":" .. row.price
end

function M.handle(request, response)
  local p = request.path
  if p == "/cached" then
    return text(db.cached{ key = "price:A1", ttl = 30 }.execute(SQL, "A1"))
  elseif p == "/uncached" then
    return text(db.execute(SQL, "A1"))
  elseif p == "/hello" then
    return "Hello, world!"
  elseif p == "/setup" then
    db.execute("create table if not exists rc_bench (sku text primary key, price text not null)")
    db.execute("insert into rc_bench values ('A1', '12.50') on conflict (sku) do update set price = excluded.price")
    return "ok"
  end
  return "?"
end

return M
EOF

# measure NAME URL: warm-up, then the measured run; the output is kept in $WORK/wrk-NAME.txt.
measure() {
    local name="$1" url="$2"
    if [ "$WARMUP" -gt 0 ]; then
        run_wrk "$WORK/warmup-$name.txt" -t2 -c64 -d"${WARMUP}s" "$url"
    fi
    echo "== $name: wrk -t2 -c64 -d${DURATION}s --latency $url"
    run_wrk "$WORK/wrk-$name.txt" -t2 -c64 -d"${DURATION}s" --latency "$url"
    if [ -z "$(wrk_field "$WORK/wrk-$name.txt" rps)" ]; then
        echo "wrk printed no figures:"
        cat "$WORK/wrk-$name.txt"
        exit 1
    fi
}

# start_nginx_dict DIR WORKERS: nginx + Lua answering the row's text from a lua_shared_dict
# (filled once by init_by_lua), the nearest thing nginx has to a read cache in front of a
# database; sets BG_PID and PORT, or returns 1 saying why not.
start_nginx_dict() {
    local dir="$1" workers="$2"
    local module=/usr/lib/nginx/modules/ngx_http_lua_module.so
    nginx_lua_ready || return 1
    PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module $module;
worker_processes $workers;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir;
    lua_shared_dict rows 16m;
    init_by_lua_block { ngx.shared.rows:set("price:A1", "$ROW") }
    server {
        listen 127.0.0.1:$PORT;
        location / { content_by_lua_block { ngx.print(ngx.shared.rows:get("price:A1")) } }
    }
}
EOF
    start_bg "$dir/stdout.log" nginx -c "$dir/nginx.conf" -p "$dir"
    for _ in $(seq 50); do curl -s --max-time 1 "http://127.0.0.1:$PORT/" >/dev/null && break; sleep 0.1; done
}

echo "== machine: $(nproc) cores; servers: --workers $WORKERS; wrk and PostgreSQL share the machine"

start_cage "$cage" "$WORK/pmnc.log" --workers "$WORKERS"
pmnc_pid=$BG_PID
expect_body "http://127.0.0.1:$PORT/setup" "ok"
expect_body "http://127.0.0.1:$PORT/cached" "$ROW"
expect_body "http://127.0.0.1:$PORT/uncached" "$ROW"
measure cached "http://127.0.0.1:$PORT/cached"
measure uncached "http://127.0.0.1:$PORT/uncached"
# The same server answering a constant: what the request path costs without the resource layer.
measure hello "http://127.0.0.1:$PORT/hello"
stop_pid "$pmnc_pid"

names=(cached uncached hello)
if [ "${NGINX:-1}" = 1 ] && start_nginx_dict "$WORK/nginx" "$WORKERS"; then
    nginx_pid=$BG_PID
    expect_body "http://127.0.0.1:$PORT/" "$ROW"
    measure nginx "http://127.0.0.1:$PORT/"
    stop_pid "$nginx_pid"
    names+=(nginx)
fi

echo
printf '%-44s %12s %10s %10s %10s %8s\n' "server" "req/s" "p50" "p99" "requests" "errors"
for name in "${names[@]}"; do
    out="$WORK/wrk-$name.txt"
    errors=$(($(wrk_field "$out" non2xx) + $(wrk_field "$out" socket)))
    case "$name" in
        cached) label="pmnc, db.cached{ttl = 30}.execute" ;;
        uncached) label="pmnc, db.execute (a query per request)" ;;
        hello) label="pmnc, return \"Hello, world!\" (no resource)" ;;
        nginx) label="nginx + Lua, lua_shared_dict get" ;;
    esac
    printf '%-44s %12s %10s %10s %10s %8s\n' "$label" "$(wrk_field "$out" rps)" \
        "$(wrk_field "$out" p50)" "$(wrk_field "$out" p99)" "$(wrk_field "$out" requests)" "$errors"
done
cached_rps="$(wrk_field "$WORK/wrk-cached.txt" rps)"
awk -v c="$cached_rps" -v u="$(wrk_field "$WORK/wrk-uncached.txt" rps)" 'BEGIN {
    if (u > 0) printf "ratio cached/uncached: %.2f\n", c / u
}'
if [ -f "$WORK/wrk-nginx.txt" ]; then
    awk -v c="$cached_rps" -v n="$(wrk_field "$WORK/wrk-nginx.txt" rps)" 'BEGIN {
        if (n > 0) printf "ratio cached/nginx+Lua shared dict: %.2f\n", c / n
    }'
fi
