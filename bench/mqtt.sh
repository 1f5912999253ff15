#!/usr/bin/env bash
# MQTT consumption: messages/s taken at QoS 1 from a persistent session, handled by a trivial Lua
# handler and acknowledged (the mqtt interface), against a bare rumqttc consumer doing the same
# acknowledgements (crates/interfaces/mqtt/examples/mqtt_bare_consumer.rs), in the same run, on a
# private mosquitto. Both start with COUNT messages already queued in their session, so the
# figure is the consumer's, not the publisher's. Prints both and the ratio; never fails on a
# figure.
#
#   bench/mqtt.sh        COUNT=n messages (default 200000) WORKERS=n (default 2)
#                        INFLIGHT=n max_inflight of the interface (default 16; the bare consumer
#                        asks the broker for the same receive maximum)
set -u
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
COUNT="${COUNT:-200000}"
WORKERS="${WORKERS:-2}"
INFLIGHT="${INFLIGHT:-16}"

MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
[ -x "$MOSQUITTO" ] || { echo "SKIPPED: needs mosquitto (apt-get install -y mosquitto)"; exit 0; }

build
echo "== cargo build --release -p rustomnic-mqtt --example mqtt-bare-consumer"
(cd "$ROOT" && cargo build --release -p rustomnic-mqtt --example mqtt-bare-consumer) || { echo "build failed"; exit 1; }
BARE="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/mqtt-bare-consumer"

# A private broker: no other traffic, a queue long enough for COUNT messages.
MPORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
cat >"$WORK/mosquitto.conf" <<CONF
listener $MPORT 127.0.0.1
allow_anonymous true
max_queued_messages 0
max_inflight_messages $INFLIGHT
CONF
start_bg "$WORK/mosquitto.log" "$MOSQUITTO" -c "$WORK/mosquitto.conf"
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$MPORT") 2>/dev/null && break; sleep 0.1; done

publish() { # TOPIC: COUNT QoS 1 messages, each its number, every one acknowledged by the broker
    # (mosquitto_pub -l ends at the end of its input without waiting for what it still holds).
    timeout 300 "$BARE" 127.0.0.1 "$MPORT" "$1" "$COUNT" bench-publisher publish || { echo "publishing failed"; exit 1; }
}

# --- the bare consumer
"$BARE" 127.0.0.1 "$MPORT" bench/bare "$COUNT" bench-bare subscribe-only || { echo "bare consumer could not subscribe"; exit 1; }
publish bench/bare
BARE_LINE="$(timeout 300 "$BARE" 127.0.0.1 "$MPORT" bench/bare "$COUNT" bench-bare)"
echo "$BARE_LINE"
BARE_RATE="$(echo "$BARE_LINE" | grep -Eo '[0-9]+ msg/s' | grep -Eo '[0-9]+')"

# --- the interface: a trivial handler
CAGE="$WORK/bench"
mkdir -p "$CAGE"
cat >"$CAGE/cage.toml" <<TOML
[interfaces.in]
protocol = "mqtt"
url = "mqtt://127.0.0.1:$MPORT"
topics = ["bench/pmnc"]
client_id = "bench-pmnc"
max_inflight = $INFLIGHT
TOML
cat >"$CAGE/in.lua" <<'LUA'
local M = {}
function M.handle(message) return nil end
return M
LUA
# First run: make the session and its subscription, then stop.
start_bg "$WORK/pmnc0.log" "$PMNC" run "$CAGE" --workers "$WORKERS" --no-watch
wait_for_line "$WORK/pmnc0.log" 'connected to mqtt' "$BG_PID" 20 || exit 1
sleep 0.5
stop_pid "$BG_PID"
publish bench/pmnc
start_bg "$WORK/pmnc.log" "$PMNC" run "$CAGE" --workers "$WORKERS" --no-watch
PMNC_PID=$BG_PID
wait_for_line "$WORK/pmnc.log" 'monitor page at' "$PMNC_PID" 20 || exit 1
MON="$(grep -Eo 'monitor page at http://[0-9.:]+' "$WORK/pmnc.log" | head -n1 | sed 's/monitor page at //')"
# From the first message received to the last one acknowledged, as the bare consumer times it
# (polling /metrics every 20 ms).
count_of() { # EVENT
    curl -s --max-time 2 "$MON/metrics" | grep -E "^pmnc_messages_total\{cage=\"bench\",interface=\"in\",event=\"$1\"\}" | awk '{print $2}'
}
T0=""
ACKED=0
for _ in $(seq 15000); do
    if [ -z "$T0" ] && [ "$(count_of received)" -ge 1 ] 2>/dev/null; then
        T0="$(date +%s.%N)"
    fi
    if [ -n "$T0" ]; then
        ACKED="$(count_of acked)"
        [ "${ACKED:-0}" -ge "$COUNT" ] 2>/dev/null && break
    fi
    sleep 0.02
done
T1="$(date +%s.%N)"
if [ "${ACKED:-0}" -lt "$COUNT" ] 2>/dev/null; then
    echo "pmnc: only ${ACKED:-0} of $COUNT acknowledged in time"
    exit 0
fi
PMNC_RATE="$(python3 -c "print(round($COUNT / ($T1 - $T0)))")"
echo "pmnc: $COUNT messages in $(python3 -c "print(round($T1 - $T0, 3))")s: $PMNC_RATE msg/s (handler: return nil; $WORKERS workers, max_inflight $INFLIGHT)"
echo "== ratio pmnc/bare: $(python3 -c "print(round($PMNC_RATE / $BARE_RATE, 2))") (built from $(source_state))"
