#!/usr/bin/env bash
# Isolation: hostile handlers of one cage against a fast endpoint of another cage in the same
# process (pmnc run --workers 2). For each snippet (the cases of docs/decisions/004-lua-sandbox.md)
# the snippet is requested again and again while wrk -t2 -c16 measures the fast endpoint for
# DURATION seconds; prints the fast endpoint's p50/p99 and errors, how the hostile requests ended,
# and the process's RSS before, at its highest during, and after the run. Target: p99 < 50 ms
# during every snippet, RSS back near its start. Never fails because of a figure.
#
#   bench/isolation.sh
#   DURATION=10 ONLY="redos bomb" bench/isolation.sh
set -uo pipefail
source "$(dirname "$0")/common.sh"

DURATION="${DURATION:-5}"
ONLY="${ONLY:-}"
[[ "$DURATION" =~ ^[0-9]+$ ]] && [ "$DURATION" -ge 1 ] && [ "$DURATION" -le 600 ] || { echo "DURATION must be 1..600"; exit 2; }
WRK_LIMIT=$DURATION

build
ensure_wrk

app="$WORK/app"
mkdir -p "$app/cages/bad" "$app/cages/fast"
cat >"$app/cages/bad/cage.toml" <<'EOF'
request_timeout = "2s"

[interfaces.hostile]
protocol = "http"
handler = "http.handle"
listen = "127.0.0.1:0"
EOF
cat >"$app/cages/bad/http.lua" <<'EOF'
local M = {}
local function loop() while true do end end
local snippets = {
  none = function() return "ok" end,
  gc = function() setmetatable({}, { __gc = loop }) collectgarbage("collect") return "x" end,
  close = function() local x <close> = setmetatable({}, { __close = loop }) while true do end end,
  redos = function() return tostring(("x"):rep(1e7):find(".-y")) end,
  redos100 = function() return tostring(("x"):rep(1e8):find(".-y")) end,
  bomb = function() local t = {} for i = 1, 1e9 do t[i] = string.rep("x", 1000) .. i end end,
  cheavy = function() for i = 1, 100 do local s = string.rep("ab", 5e6):gsub("a", "b") end end,
  cheavy100 = function() for i = 1, 100 do local s = string.rep("ab", 5e7):gsub("a", "b") end end,
  backtrack = function() return tostring(string.find(("a"):rep(29), ("a?"):rep(29) .. ("a"):rep(29))) end,
  sort = function() table.sort({ 3, 2, 1 }, function(a, b) while true do end end) end,
  gsubfn = function() return (("abc"):gsub(".", function() while true do end end)) end,
  errtostring = function() error(setmetatable({}, { __tostring = loop })) end,
  formattostring = function() return string.format("%s", setmetatable({}, { __tostring = loop })) end,
  slowcompare = function()
    local a, b = ("x"):rep(5e7), ("x"):rep(5e7)
    while true do local _ = a == b end
  end,
  spin = function() while true do end end,
}
function M.handle(request) return snippets[request.path:sub(2)]() end
return M
EOF
cat >"$app/cages/fast/cage.toml" <<'EOF'
[interfaces.quick]
protocol = "http"
handler = "http.handle"
listen = "127.0.0.1:0"
EOF
echo 'local M = {} function M.handle() return "fast" end return M' >"$app/cages/fast/http.lua"

start_bg "$WORK/pmnc.log" "$PMNC" run "$app" --workers 2
pid=$BG_PID
wait_for_line "$WORK/pmnc.log" 'running [0-9]+ cage' "$pid" 20 || exit 1
port_of() { grep -E "listening on .*interface=$1\b" "$WORK/pmnc.log" | grep -Eo '127\.0\.0\.1:[0-9]+' | head -n1; }
bad="$(port_of hostile)"
fast="$(port_of quick)"
[ -n "$bad" ] && [ -n "$fast" ] || { echo "no ports in the log"; cat "$WORK/pmnc.log"; exit 1; }
expect_body "http://$fast/" "fast"
expect_body "http://$bad/none" "ok"

rss() { awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0; }

# hostile NAME END: requests /NAME until END (epoch seconds), at most 1000 times; one line per
# request: "status seconds".
hostile() {
    local name="$1" end="$2"
    for _ in $(seq 1000); do
        [ "$(date +%s)" -lt "$end" ] || break
        curl -s -o /dev/null --max-time 30 -w '%{http_code} %{time_total}\n' "http://$bad/$name" >>"$WORK/hostile-$name.txt" ||
            echo "curl-failed 0" >>"$WORK/hostile-$name.txt"
    done
}

snippets="none gc close redos redos100 bomb cheavy cheavy100 backtrack sort gsubfn errtostring formattostring slowcompare spin"
[ -n "$ONLY" ] && snippets="$ONLY"
echo "== machine: $(nproc) cores; pmnc run --workers 2 (built from $(source_state)); request_timeout 2s; wrk -t2 -c16 -d${DURATION}s on the other cage"
printf '%-15s %9s %9s %9s %7s %-30s %10s %10s %10s\n' snippet "req/s" p50 p99 errors "hostile requests" "RSS start" "RSS max" "RSS after"
for name in $snippets; do
    before=$(rss)
    end=$(($(date +%s) + DURATION))
    hostile "$name" "$end" &
    hpid=$!
    STARTED_PIDS+=("$hpid")
    max=$before
    ( for _ in $(seq $((DURATION * 10))); do r=$(rss); echo "$r"; sleep 0.1; done ) >"$WORK/rss-$name.txt" &
    rpid=$!
    run_wrk "$WORK/wrk-$name.txt" -t2 -c16 -d"${DURATION}s" --latency "http://$fast/"
    for _ in $(seq 400); do kill -0 "$hpid" 2>/dev/null || break; sleep 0.1; done
    wait "$rpid" 2>/dev/null
    max=$(sort -n "$WORK/rss-$name.txt" | tail -n1)
    after=$(rss)
    out="$WORK/wrk-$name.txt"
    errors=$(($(wrk_field "$out" non2xx) + $(wrk_field "$out" socket)))
    p99="$(wrk_field "$out" p99)"
    verdict=""
    if [ -n "$p99" ] && [ "$(to_ms "$p99" | awk '{print ($1 >= 50)}')" = 1 ]; then verdict=" MISSED"; fi
    ends="$(awk '{c[$1]++} END {for (k in c) printf "%s x%d ", k, c[k]}' "$WORK/hostile-$name.txt" 2>/dev/null)"
    printf '%-15s %9s %9s %9s %7s %-30s %8s K %8s K %8s K%s\n' "$name" "$(wrk_field "$out" rps)" "$(wrk_field "$out" p50)" \
        "${p99:-?}" "$errors" "$ends" "$before" "${max:-?}" "$after" "$verdict"
done
kill -0 "$pid" 2>/dev/null && echo "== the process is alive after every snippet"
