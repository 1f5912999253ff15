#!/usr/bin/env bash
# bench/nats.sh: JetStream messages/s that the nats interface pulls, hands to a trivial Lua
# handler and acks, against a bare async-nats JetStream consumer acking the same messages with
# the same max_ack_pending (crates/interfaces/nats/examples/nats_bare_consumer.rs), in the same run,
# on a nats-server of its own (free port, store in a temporary folder). Streams are filled before
# each consumer starts, so only consuming is timed, and both consumers are timed the same way
# from the server's side (`nats_bare_consumer watch`: the consumer's state every 5 ms, from its
# first delivery to the ack of the last message). Figures are printed, never asserted (target:
# pmnc >= 0.8x bare).
#
# Then publish at commit: every message's handler publishes one message through the nats
# resource to another stream in a transaction (`jetstream_publish`, the commit waiting for the
# stream's ack), timed the same way: transactions/s, printed, no target.
#
# COUNT=50000 messages per run, TX_COUNT=20000, MAX_ACK_PENDING=64, WORKERS=2, BYTES=100, ROUNDS=3 (bare then
# pmnc, each round; the ratio of each round and their median are printed: the bare consumer
# alone moves by a third from run to run on this shared machine); NATS_SERVER (default
# nats-server on PATH or /usr/sbin/nats-server).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

COUNT="${COUNT:-50000}"
TX_COUNT="${TX_COUNT:-20000}"
PENDING="${MAX_ACK_PENDING:-64}"
WORKERS="${WORKERS:-2}"
BYTES="${BYTES:-100}"
ROUNDS="${ROUNDS:-3}"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS must be a whole number above 0, got '$ROUNDS'"; exit 2; }
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

echo "== $COUNT messages of $BYTES bytes, max_ack_pending $PENDING, pmnc with $WORKERS workers, $ROUNDS rounds, built from $(source_state)"

# run_pmnc DIR STREAM SUBJECT COUNT EXTRA_TOML: runs pmnc on cage DIR (its app.lua written by the
# caller; cage.toml written here: a nats interface on a JetStream consumer of STREAM, then
# EXTRA_TOML) until the server has seen COUNT acks; the watcher's line is left in DIR/watch, the
# log in DIR/log, and pmnc keeps running as PMNC_PID for the caller to stop.
run_pmnc() {
    local dir="$1" stream="$2" subject="$3" count="$4" extra="$5"
    cat >"$dir/cage.toml" <<TOML
[interfaces.in]
protocol = "nats"
url = "$URL"
stream = "$stream"
consumer = "pmnc"
declare = true
subjects = ["$subject"]
max_ack_pending = $PENDING
handler = "app.handle"
$extra
TOML
    "$BARE" watch "$URL" "$stream" pmnc "$count" >"$dir/watch" &
    local watcher=$!
    start_bg "$dir/log" "$PMNC" run "$dir" --workers "$WORKERS"
    PMNC_PID="$BG_PID"
    wait_for_line "$dir/log" 'consuming' "$PMNC_PID" 30 >&2 || { kill "$watcher"; exit 1; }
    if ! wait "$watcher"; then
        echo "the watcher of pmnc's consumer failed" >&2; tail -20 "$dir/log" >&2; stop_pid "$PMNC_PID"; exit 1
    fi
    cat "$dir/watch" >&2
}

# One round: the bare consumer, then pmnc, each on a stream of its own filled beforehand.
# Prints "bare_rate pmnc_rate".
round() {
    local r="$1"
    echo "== round $r: bare async-nats JetStream consumer" >&2
    "$BARE" publish "$URL" "BARE$r" "bare$r.in" "$COUNT" "$BYTES" >&2
    "$BARE" watch "$URL" "BARE$r" bare "$COUNT" >"$WORK/watch-bare$r" &
    local watcher=$!
    "$BARE" consume "$URL" "BARE$r" bare "$COUNT" "$PENDING" >&2
    wait "$watcher" || { echo "the watcher of the bare consumer failed" >&2; exit 1; }
    cat "$WORK/watch-bare$r" >&2
    local bare_rate
    bare_rate="$(grep -Eo '[0-9]+ msg/s' "$WORK/watch-bare$r" | grep -Eo '[0-9]+')"

    echo "== round $r: pmnc nats interface, handler: function(m) end" >&2
    "$BARE" publish "$URL" "PMNC$r" "pmnc$r.in" "$COUNT" "$BYTES" >&2
    local dir="$WORK/c$r"
    mkdir -p "$dir"
    echo 'return { handle = function(m) end }' >"$dir/app.lua"
    run_pmnc "$dir" "PMNC$r" "pmnc$r.in" "$COUNT" ""
    # The interface's own count, checked once at the end (not part of the timing).
    local monitor acked
    monitor="$(grep -Eo 'monitor page at http://[0-9.:]+' "$dir/log" | head -n1 | sed 's#.*http://##')"
    acked="$(curl -s --max-time 5 "http://$monitor/metrics" | grep -F 'pmnc_messages_total{cage="c'"$r"'",interface="in",event="acked"}' | awk '{print $2}')"
    stop_pid "$PMNC_PID"
    if [ -z "$acked" ] || [ "${acked%.*}" -lt "$COUNT" ]; then
        echo "the server saw $COUNT acks but the interface counted ${acked:-none}" >&2; tail -20 "$dir/log" >&2; exit 1
    fi
    local pmnc_rate
    pmnc_rate="$(grep -Eo '[0-9]+ msg/s' "$dir/watch" | grep -Eo '[0-9]+')"
    echo "$bare_rate $pmnc_rate"
}

ratios=()
echo
printf '%-7s %14s %14s %8s\n' round "bare msg/s" "pmnc msg/s" ratio > "$WORK/table"
for r in $(seq "$ROUNDS"); do
    read -r bare_rate pmnc_rate < <(round "$r")
    ratio="$(echo "$pmnc_rate / $bare_rate" | bc -l | xargs printf '%.2f')"
    ratios+=("$ratio")
    printf '%-7s %14s %14s %8s\n' "$r" "$bare_rate" "$pmnc_rate" "$ratio" >> "$WORK/table"
done
echo "== publish at commit: each message's handler publishes one through the nats resource (jetstream_publish)" >&2
"$BARE" publish "$URL" TX tx.in "$TX_COUNT" "$BYTES" >&2
"$BARE" publish "$URL" OUT tx.out 0 0 >&2
dir="$WORK/tx"
mkdir -p "$dir"
cat >"$dir/app.lua" <<'LUA'
return { handle = function(m)
  local xa = pmnc.transaction.create()
  xa.bus.jetstream_publish("tx.out", m.body)
  xa.execute()
end }
LUA
run_pmnc "$dir" TX tx.in "$TX_COUNT" "[resources.bus]
protocol = \"nats\"
url = \"$URL\""
stop_pid "$PMNC_PID"
tx_rate="$(grep -Eo '[0-9]+ msg/s' "$dir/watch" | grep -Eo '[0-9]+')"
stored="$("$BARE" count "$URL" OUT)"
[ "$stored" = "$TX_COUNT" ] || { echo "stream OUT holds $stored messages, not $TX_COUNT" >&2; exit 1; }

median="$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}')"
verdict="met"
if [ "$(echo "$median < 0.8" | bc -l)" = 1 ]; then verdict="MISSED"; fi
echo
cat "$WORK/table"
echo "median ratio pmnc/bare: $median (target >= 0.8: $verdict)"
echo "pmnc publish at commit: $tx_rate transactions/s (each a JetStream publish acked by the stream; stream OUT holds all $stored)"
