#!/usr/bin/env bash
# bench/nats.sh: JetStream messages/s that the nats interface pulls, hands to a trivial Lua
# handler and acks, against a bare async-nats JetStream consumer acking the same messages with
# the same max_ack_pending (crates/interfaces/nats/examples/nats_bare_consumer.rs), in the same run,
# on a nats-server of its own (free port, store in a temporary folder). Streams are filled before
# each consumer starts, so only consuming is timed. Figures are printed, never asserted (target:
# pmnc >= 0.8x bare).
#
# COUNT=50000 messages per run, MAX_ACK_PENDING=64, WORKERS=2, BYTES=100; NATS_SERVER (default
# nats-server on PATH or /usr/sbin/nats-server).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

COUNT="${COUNT:-50000}"
PENDING="${MAX_ACK_PENDING:-64}"
WORKERS="${WORKERS:-2}"
BYTES="${BYTES:-100}"
NATS="${NATS_SERVER:-$(command -v nats-server || echo /usr/sbin/nats-server)}"
if [ ! -x "$NATS" ]; then
    echo "SKIPPED: nats-server not found (install it: apt-get install nats-server)"
    exit 0
fi

build
echo "== cargo build --release -p rustomnic-nats --example nats_bare_consumer"
(cd "$ROOT" && cargo build --release -p rustomnic-nats --example nats_bare_consumer) || { echo "build failed"; exit 1; }
BARE="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/nats_bare_consumer"

PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
URL="nats://127.0.0.1:$PORT"
mkdir -p "$WORK/js"
start_bg "$WORK/nats.log" "$NATS" -a 127.0.0.1 -p "$PORT" -js -sd "$WORK/js"
NATS_PID="$BG_PID"
for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
trap 'stop_pid "$NATS_PID"; cleanup' EXIT

now() { date +%s.%N; }

echo "== $COUNT messages of $BYTES bytes, max_ack_pending $PENDING, pmnc with $WORKERS workers, built from $(source_state)"
echo "== bare async-nats JetStream consumer"
"$BARE" publish "$URL" BARE bare.in "$COUNT" "$BYTES"
bare_out="$("$BARE" consume "$URL" BARE bare "$COUNT" "$PENDING")"
echo "$bare_out"
bare_rate="$(echo "$bare_out" | grep -Eo '[0-9]+ msg/s' | grep -Eo '[0-9]+')"

echo "== pmnc nats interface, handler: function(m) end"
"$BARE" publish "$URL" PMNC pmnc.in "$COUNT" "$BYTES"
dir="$WORK/c"
mkdir -p "$dir"
cat >"$dir/cage.toml" <<TOML
[interfaces.in]
protocol = "nats"
url = "$URL"
stream = "PMNC"
consumer = "pmnc"
declare = true
subjects = ["pmnc.in"]
max_ack_pending = $PENDING
handler = "app.handle"
TOML
echo 'return { handle = function(m) end }' >"$dir/app.lua"
start_bg "$WORK/c.log" "$PMNC" run "$dir" --workers "$WORKERS"
pid="$BG_PID"
wait_for_line "$WORK/c.log" 'consuming' "$pid" 30 || exit 1
started="$(now)"
monitor="$(grep -Eo 'monitor page at http://[0-9.:]+' "$WORK/c.log" | head -n1 | sed 's#.*http://##')"
acked=0
for _ in $(seq 6000); do
    acked="$(curl -s --max-time 2 "http://$monitor/metrics" | grep -F 'pmnc_messages_total{cage="c",interface="in",event="acked"}' | awk '{print $2}')"
    [ -n "$acked" ] && [ "${acked%.*}" -ge "$COUNT" ] && break
    sleep 0.05
done
secs="$(echo "$(now) - $started" | bc -l)"
stop_pid "$pid"
if [ -z "$acked" ] || [ "${acked%.*}" -lt "$COUNT" ]; then
    echo "only ${acked:-0} of $COUNT acked in ${secs}s"; tail -20 "$WORK/c.log"; exit 1
fi
pmnc_rate="$(echo "$COUNT / $secs" | bc -l | xargs printf '%.0f')"
echo "consumed $COUNT in $(printf '%.2f' "$secs") s: $pmnc_rate msg/s"

ratio="$(echo "$pmnc_rate / $bare_rate" | bc -l | xargs printf '%.2f')"
verdict="met"
if [ "$(echo "$ratio < 0.8" | bc -l)" = 1 ]; then verdict="MISSED"; fi
echo
echo "bare async-nats consumer:   $bare_rate msg/s"
echo "pmnc nats interface:        $pmnc_rate msg/s   ratio $ratio (target >= 0.8: $verdict)"
