#!/usr/bin/env bash
# bench/amqp.sh: messages/s that the amqp interface consumes, hands to a trivial Lua handler and
# acks, against a bare lapin consumer acking the same messages with the same prefetch
# (crates/interfaces/amqp/examples/amqp_bare_consumer.rs), in the same run; and publish-at-commit
# transactions/s (each message's handler publishes one message through the amqp resource in a
# transaction, confirmed at commit). Queues are filled before each consumer starts, so only
# consuming is timed. Figures are printed, never asserted (target: pmnc >= 0.8x bare).
#
# COUNT=50000 messages per run, TX_COUNT=20000, PREFETCH=16, WORKERS=2, BYTES=100;
# PMNC_TEST_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

URL="${PMNC_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
COUNT="${COUNT:-50000}"
TX_COUNT="${TX_COUNT:-20000}"
PREFETCH="${PREFETCH:-16}"
WORKERS="${WORKERS:-2}"
BYTES="${BYTES:-100}"

hostport="$(echo "$URL" | sed -E 's#^amqp://([^@]*@)?([^/?]*).*#\2#')"
host="${hostport%:*}"
port="${hostport##*:}"
[ "$port" = "$hostport" ] && port=5672
if ! (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
    echo "SKIPPED: no RabbitMQ at $host:$port (start one: rabbitmq-server -detached)"
    exit 0
fi

build
echo "== cargo build --release -p rustomnic-amqp --example amqp_bare_consumer"
(cd "$ROOT" && cargo build --release -p rustomnic-amqp --example amqp_bare_consumer) || { echo "build failed"; exit 1; }
BARE="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/amqp_bare_consumer"

Q_BARE="pmnc-bench-$$-bare"
Q_PMNC="pmnc-bench-$$-pmnc"
Q_TX="pmnc-bench-$$-tx"
Q_OUT="pmnc-bench-$$-out"
delete_queues() {
    for q in "$Q_BARE" "$Q_PMNC" "$Q_TX" "$Q_OUT"; do
        timeout 20 "$BARE" delete "$URL" "$q" 0 >/dev/null 2>&1 || true
    done
}
trap 'delete_queues; cleanup' EXIT

now() { date +%s.%N; }

# run_cage NAME QUEUE COUNT LUA [RESOURCE_TOML]: starts a cage consuming QUEUE (already filled),
# times from its "consuming" line until /metrics counts COUNT acked; prints the seconds.
run_cage() {
    local name="$1" queue="$2" count="$3" lua="$4" extra="${5:-}"
    local dir="$WORK/$name"
    mkdir -p "$dir"
    cat >"$dir/cage.toml" <<TOML
[interfaces.in]
protocol = "amqp"
url = "$URL"
queues = ["$queue"]
prefetch = $PREFETCH
handler = "app.handle"
$extra
TOML
    echo "$lua" >"$dir/app.lua"
    start_bg "$WORK/$name.log" "$PMNC" run "$dir" --workers "$WORKERS"
    local pid="$BG_PID"
    wait_for_line "$WORK/$name.log" 'consuming' "$pid" 30 >&2 || exit 1
    local started monitor acked=0
    started="$(now)"
    monitor="$(grep -Eo 'monitor page at http://[0-9.:]+' "$WORK/$name.log" | head -n1 | sed 's#.*http://##')"
    for _ in $(seq 3000); do
        acked="$(curl -s --max-time 2 "http://$monitor/metrics" | grep -F "pmnc_messages_total{cage=\"$name\",interface=\"in\",event=\"acked\"}" | awk '{print $2}')"
        [ -n "$acked" ] && [ "${acked%.*}" -ge "$count" ] && break
        sleep 0.05
    done
    local secs
    secs="$(echo "$(now) - $started" | bc -l)"
    stop_pid "$pid"
    if [ -z "$acked" ] || [ "${acked%.*}" -lt "$count" ]; then
        echo "only ${acked:-0} of $count acked in ${secs}s:" >&2
        tail -20 "$WORK/$name.log" >&2
        exit 1
    fi
    echo "$secs"
}

echo "== $COUNT messages of $BYTES bytes, prefetch $PREFETCH, pmnc with $WORKERS workers, built from $(source_state)"
echo "== bare lapin consumer"
"$BARE" publish "$URL" "$Q_BARE" "$COUNT" "$BYTES"
bare_out="$("$BARE" consume "$URL" "$Q_BARE" "$COUNT" "$PREFETCH")"
echo "$bare_out"
bare_rate="$(echo "$bare_out" | grep -Eo '[0-9]+ msg/s' | grep -Eo '[0-9]+')"

echo "== pmnc amqp interface, handler: function(m) end"
"$BARE" publish "$URL" "$Q_PMNC" "$COUNT" "$BYTES"
secs="$(run_cage consume "$Q_PMNC" "$COUNT" 'return { handle = function(m) end }')"
pmnc_rate="$(echo "$COUNT / $secs" | bc -l | xargs printf '%.0f')"
echo "consumed $COUNT in $(printf '%.2f' "$secs") s: $pmnc_rate msg/s"

echo "== publish at commit: each message's handler publishes one through the amqp resource"
"$BARE" publish "$URL" "$Q_TX" "$TX_COUNT" "$BYTES"
"$BARE" publish "$URL" "$Q_OUT" 0 >/dev/null
secs="$(run_cage tx "$Q_TX" "$TX_COUNT" "return { handle = function(m) local xa = pmnc.transaction.create() xa.bus.publish('', '$Q_OUT', m.body) xa.execute() end }" "
[resources.bus]
protocol = \"amqp\"
url = \"$URL\"")"
tx_rate="$(echo "$TX_COUNT / $secs" | bc -l | xargs printf '%.0f')"
echo "handled $TX_COUNT in $(printf '%.2f' "$secs") s: $tx_rate transactions/s (each a confirmed publish)"

ratio="$(echo "$pmnc_rate / $bare_rate" | bc -l | xargs printf '%.2f')"
verdict="met"
if [ "$(echo "$ratio < 0.8" | bc -l)" = 1 ]; then verdict="MISSED"; fi
echo
echo "bare lapin consumer:        $bare_rate msg/s"
echo "pmnc amqp interface:        $pmnc_rate msg/s   ratio $ratio (target >= 0.8: $verdict)"
echo "pmnc publish at commit:     $tx_rate transactions/s"
