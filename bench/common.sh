# Shared helpers of the bash benchmarks; sourced, not run.
#
# Every helper is bounded in time; nothing here fails the script because of a timing figure.
# After sourcing: ROOT (the workspace), PMNC (the release binary), WORK (a temporary folder,
# removed on exit), and the functions below. Processes started with start_bg are killed on exit.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PMNC="${CARGO_TARGET_DIR:-$ROOT/target}/release/pmnc"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pmnc-bench.XXXXXX")"
STARTED_PIDS=()

cleanup() {
    local pid
    for pid in "${STARTED_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    # Give them a moment to stop gracefully, then insist (bounded: 30 x 0.1 s).
    for _ in $(seq 30); do
        local alive=0
        for pid in "${STARTED_PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for pid in "${STARTED_PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [ "${KEEP:-0}" = 1 ]; then
        echo "(KEEP=1: leaving $WORK)"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# build: the release binary, as the brief of every benchmark says.
build() {
    echo "== cargo build --release -p pmnc"
    (cd "$ROOT" && cargo build --release -p pmnc) || { echo "build failed"; exit 1; }
    [ -x "$PMNC" ] || { echo "no binary at $PMNC after the build"; exit 1; }
    echo "== built from $(source_state)"
}

# source_state: the commit the binary was built from, and whether crates/ had changes on top.
source_state() {
    local head dirty=""
    head="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "unknown commit")"
    if [ -n "$(git -C "$ROOT" status --porcelain -- crates Cargo.lock 2>/dev/null | head -n1)" ]; then
        dirty=" + uncommitted changes in crates/"
    fi
    echo "$head$dirty"
}

# ensure_wrk: installs wrk with apt-get when it is missing. When that fails the benchmark cannot
# run: say so and exit 0 (a missing tool is not a failed benchmark).
ensure_wrk() {
    if command -v wrk >/dev/null 2>&1; then
        return 0
    fi
    local sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; fi
    fi
    echo "== wrk not found; running: $sudo apt-get install -y wrk"
    if ! $sudo apt-get install -y wrk; then
        echo "== apt-get install failed; running: $sudo apt-get update, then installing again"
        $sudo apt-get update -q && $sudo apt-get install -y wrk
    fi
    if ! command -v wrk >/dev/null 2>&1; then
        echo "SKIPPED: wrk could not be installed (apt-get install -y wrk failed); install it and rerun."
        exit 0
    fi
    echo "== installed $(command -v wrk)"
}

# start_bg LOG CMD...: starts CMD in the background with stdout and stderr to LOG; sets BG_PID.
start_bg() {
    local log="$1"
    shift
    "$@" >"$log" 2>&1 &
    BG_PID=$!
    STARTED_PIDS+=("$BG_PID")
}

# stop_pid PID: SIGTERM, wait at most 5 s, then SIGKILL.
stop_pid() {
    local pid="$1"
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# wait_for_line LOG PATTERN PID [SECONDS]: waits until LOG has a line matching PATTERN (grep -E);
# gives up after SECONDS (default 20) or when PID dies.
wait_for_line() {
    local log="$1" pattern="$2" pid="$3" secs="${4:-20}"
    local tries=$((secs * 10))
    for _ in $(seq "$tries"); do
        grep -Eq "$pattern" "$log" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || { echo "process $pid exited before logging /$pattern/:"; cat "$log"; return 1; }
        sleep 0.1
    done
    echo "no /$pattern/ in $log after ${secs}s:"
    cat "$log"
    return 1
}

# start_cage DIR LOG [ARGS...]: runs `pmnc run DIR ARGS` and waits until it is ready; sets BG_PID
# and PORT (the first interface's port, from the "listening on" line).
start_cage() {
    local dir="$1" log="$2"
    shift 2
    start_bg "$log" "$PMNC" run "$dir" "$@"
    wait_for_line "$log" 'running [0-9]+ cage' "$BG_PID" 20 || exit 1
    PORT="$(grep -Eo 'listening on 127\.0\.0\.1:[0-9]+' "$log" | head -n1 | grep -Eo '[0-9]+$')"
    [ -n "$PORT" ] || { echo "no port in $log"; cat "$log"; exit 1; }
}

# start_raw LOG WORKERS: runs the hidden `pmnc raw-http` on a free port; sets BG_PID and PORT.
start_raw() {
    local log="$1" workers="$2"
    start_bg "$log" "$PMNC" raw-http --listen 127.0.0.1:0 --workers "$workers"
    wait_for_line "$log" 'listening on 127\.0\.0\.1:[0-9]+' "$BG_PID" 20 || exit 1
    PORT="$(grep -Eo 'listening on 127\.0\.0\.1:[0-9]+' "$log" | head -n1 | grep -Eo '[0-9]+$')"
}

# nginx_lua_ready: installs nginx and its Lua module when missing (apt-get); returns 1, saying
# why, when they are still missing.
nginx_lua_ready() {
    local module=/usr/lib/nginx/modules/ngx_http_lua_module.so
    if [ ! -f "$module" ] && command -v apt-get >/dev/null; then
        echo "== installing nginx with its Lua module (apt-get install nginx libnginx-mod-http-lua)"
        apt-get install -y -q nginx libnginx-mod-http-lua >/dev/null 2>&1 || true
    fi
    if [ ! -f "$module" ] || ! command -v nginx >/dev/null; then
        echo "(nginx with its Lua module is not installed: apt-get install nginx libnginx-mod-http-lua; no nginx run)"
        return 1
    fi
}

# start_nginx_lua DIR WORKERS LOG: nginx with its Lua module (Debian's nginx and
# libnginx-mod-http-lua, installed when missing and apt-get is there) answering "Hello, world!"
# from `content_by_lua_block`, with WORKERS worker processes and `access_log LOG` ("off", or a
# file and a format); sets BG_PID and PORT. Returns 1, saying why, when nginx or its module is
# missing.
start_nginx_lua() {
    local dir="$1" workers="$2" log="$3"
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
    access_log $log;
    client_body_temp_path $dir;
    server {
        listen 127.0.0.1:$PORT;
        location / { content_by_lua_block { ngx.print("Hello, world!") } }
    }
}
EOF
    start_bg "$dir/stdout.log" nginx -c "$dir/nginx.conf" -p "$dir"
    for _ in $(seq 50); do curl -s --max-time 1 "http://127.0.0.1:$PORT/" >/dev/null && break; sleep 0.1; done
}

# expect_body URL TEXT: checks that URL answers 200 with TEXT (a sanity check before measuring).
expect_body() {
    local url="$1" want="$2" got
    got="$(curl -s --max-time 5 "$url")" || true
    if [ "$got" != "$want" ]; then
        echo "sanity check failed: $url answered '$got', expected '$want'"
        exit 1
    fi
}

# run_wrk OUT ARGS...: runs wrk with a hard time limit (its -d plus 30 s) and keeps its output.
run_wrk() {
    local out="$1"
    shift
    timeout --signal=INT --kill-after=5 "$((${WRK_LIMIT:-60} + 30))" wrk "$@" >"$out" 2>&1 || true
}

# wrk_field OUT NAME: one figure from wrk --latency output.
#   rps, p50, p75, p90, p99, requests, non2xx, socket (socket errors summed), timeouts
wrk_field() {
    local out="$1" name="$2"
    case "$name" in
        rps) awk '/^Requests\/sec:/ {print $2}' "$out" ;;
        p50) awk '/^ +50%/ {print $2}' "$out" ;;
        p75) awk '/^ +75%/ {print $2}' "$out" ;;
        p90) awk '/^ +90%/ {print $2}' "$out" ;;
        p99) awk '/^ +99%/ {print $2}' "$out" ;;
        requests) awk '/requests in/ {print $1}' "$out" ;;
        non2xx) awk '/Non-2xx or 3xx responses:/ {print $NF; f=1} END {if (!f) print 0}' "$out" ;;
        socket) awk '/Socket errors:/ {gsub(",", ""); print $4+$6+$8+$10; f=1} END {if (!f) print 0}' "$out" ;;
        timeouts) awk '/Socket errors:/ {print $NF; f=1} END {if (!f) print 0}' "$out" ;;
    esac
}

# to_ms VALUE: wrk's "812.00us" / "1.23ms" / "2.01s" as milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
        else if (v ~ /m$/) { sub(/m$/, "", v); printf "%.3f", v * 60000 }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
        else { printf "?" }
    }'
}

# thread_cpu PID: "thread-name cpu-ticks" for every thread of PID (Linux /proc; user + system).
thread_cpu() {
    local t
    for t in /proc/"$1"/task/*; do
        [ -r "$t/stat" ] || continue
        # The name is in parentheses and may hold spaces: take the fields after the last ')'.
        printf '%s %s\n' "$(tr ' ' '_' <"$t/comm")" "$(sed 's/.*) //' "$t/stat" | awk '{print $12 + $13}')"
    done
}

# process_cpu PID: CPU ticks of the process and of its live children (nginx's workers).
process_cpu() {
    local p total=0 ticks
    for p in "$1" $(pgrep -P "$1" 2>/dev/null); do
        ticks="$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}')"
        total=$((total + ${ticks:-0}))
    done
    echo "$total"
}

# worker_cpu_report BEFORE AFTER: CPU seconds each pmnc-worker-* thread used between two
# thread_cpu snapshots; warns when a worker did (almost) nothing while another was busy.
worker_cpu_report() {
    local hz
    hz="$(getconf CLK_TCK 2>/dev/null || echo 100)"
    awk -v hz="$hz" '
        NR == FNR { before[$1] = $2; next }
        $1 ~ /^pmnc-worker/ { used[$1] = ($2 - before[$1]) / hz; names[++n] = $1 }
        END {
            line = ""; max = 0; min = -1
            for (i = 1; i <= n; i++) {
                w = names[i]; line = line sprintf(" %s %.2fs", w, used[w])
                if (used[w] > max) max = used[w]
                if (min < 0 || used[w] < min) min = used[w]
            }
            printf "  worker CPU during the run:%s\n", line
            if (n > 1 && max > 0.5 && min < max * 0.1)
                printf "  WARNING: connections were not spread over the workers (one worker idle while another was busy)\n"
        }' "$1" "$2"
}

# hello_cage DIR HANDLER LOG: a cage answering "Hello, world!" from http.handle (a function) and
# from a route table http.routes of 200 routes (199 with an {id} parameter, and GET /), with
# `handler = "HANDLER"` and `access_log = "LOG"` (the cages of http-routes.sh and callgrind.sh).
hello_cage() {
    local dir="$1" handler="$2" log="$3"
    mkdir -p "$dir"
    cat >"$dir/cage.toml" <<EOF
request_timeout = "10s"

[interfaces.http]
listen = "127.0.0.1:0"
handler = "$handler"
access_log = "$log"
EOF
    {
        echo 'local M = {}'
        echo 'function M.handle(request, response) return "Hello, world!" end'
        echo 'M.routes = {'
        for i in $(seq 0 198); do
            echo "  [\"GET /r$i/{id}/items\"] = function(request, response) return \"Hello, world!\" end,"
        done
        echo '  ["GET /"] = function() return "Hello, world!" end,'
        echo '}'
        echo 'return M'
    } >"$dir/http.lua"
}
