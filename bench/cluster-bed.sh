#!/usr/bin/env bash
# A real 3-node cluster on one machine for clustered queues (issue 18; docs/cluster.md "A test
# bed on one machine"): three nats-server processes routed to each other on loopback ports,
# JetStream on each (own server_name, own store folder), and three `pmnc run` copies of the cage
# of examples/cluster-bed (queue jobs: store = "cluster", replicas = 3, ack_wait 3s), each from a
# folder of its own as on three hosts, each given all three servers.
#
#   bench/cluster-bed.sh start       starts the bed and leaves it running; prints the URLs, the
#                                    PIDs and the commands to enqueue, kill and count
#   bench/cluster-bed.sh status      what runs, with the URLs and PIDs
#   bench/cluster-bed.sh up NAME     starts one of its processes again (n1..n3, host1..host3)
#   bench/cluster-bed.sh count N     counts calls c1..cN from the copies' logs (lost, run twice)
#   bench/cluster-bed.sh stop        stops the bed and removes its folder (KEEP=1 keeps it)
#   bench/cluster-bed.sh demo        a bed of its own: enqueues CALLS calls, kills -9 one NATS
#                                    server and one copy mid-flow, waits for the backlog to drain,
#                                    counts, stops
#   bench/cluster-bed.sh chaos       the same with ROUNDS rounds (default 5), each killing a
#                                    server and a copy and starting them again after the round
#
# Every attempt appends "S id delivery time" when it starts and "E id delivery time" when it
# ends to its copy's effects/ran.log (O_APPEND, synced): the side effect counted. Lost: a call
# with no E line anywhere. Run twice: a call with two E lines. Kill-to-rerun: from the kill to
# the next start elsewhere of each call the killed copy had started and not ended (or ended and
# not recorded). Detection: ack_wait after the kill, or, when the killed server led the queue's
# consumer or the results bucket, the new leader's election if that came later (read from the
# surviving servers' logs); the time from detection to the rerun is shown per round and overall.
#
# Environment: BED (folder; start: ${TMPDIR:-/tmp}/pmnc-cluster-bed, demo/chaos: a new temporary
# one), BED_PORT (first client port; start 14222, demo/chaos 24222; routes +2000, monitoring
# +4000), CALLS (demo 3000, chaos 10000), WORK_MS (ms each call takes, default 50), ROUNDS,
# KILL (what each round kills: "both" a copy and a NATS server (default), "copy" a copy only,
# "leader" a copy and the server leading the queue's consumer), PMNC (the binary; default
# target/release/pmnc, built when missing), NATS_SERVER, KEEP=1.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE="${1:-}"
EXAMPLE="$ROOT/examples/cluster-bed/worker"
ACK_WAIT=3
NATS_SERVER="${NATS_SERVER:-$(command -v nats-server || echo /usr/sbin/nats-server)}"

usage() {
    sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 2
}

case "$MODE" in
    start | up | count | stop | status) BED="${BED:-${TMPDIR:-/tmp}/pmnc-cluster-bed}" ;;
    demo | chaos) BED="${BED:-$(mktemp -d "${TMPDIR:-/tmp}/pmnc-cluster-bed.XXXXXX")}" ;;
    *) usage ;;
esac

# Says so when the server is older than 2.10.12, whose replicated buckets can refuse the
# copies' compare-and-set writes for minutes after a server dies (docs/queues.md, "Which
# nats-server"): kills of a leader then show that defect, not the queue's behaviour.
old_server_note() {
    local v
    v="$("$NATS_SERVER" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9.]*\).*/\1/p')"
    [ -n "$v" ] || return 0
    if [ "$(printf '%s\n%s\n' "$v" 2.10.12 | sort -V | head -n1)" != 2.10.12 ]; then
        echo "== note: nats-server $v is older than 2.10.12; with replicas = 3 its buckets can refuse writes for minutes after a server dies (docs/queues.md, \"Which nats-server\"); NATS_SERVER= runs another build"
    fi
}

# ---- the bed's layout -----------------------------------------------------------------------

# ports BASE: the client, route and monitoring ports of n1..n3.
ports() {
    local base="$1" i
    for i in 1 2 3; do
        CLIENT[$i]=$((base + i - 1))
        ROUTE[$i]=$((base + 2000 + i - 1))
        MONITOR[$i]=$((base + 4000 + i - 1))
    done
    URLS="nats://127.0.0.1:${CLIENT[1]},nats://127.0.0.1:${CLIENT[2]},nats://127.0.0.1:${CLIENT[3]}"
}
declare -a CLIENT ROUTE MONITOR

# alive NAME: whether the process of NAME (n1, host2, ...) recorded in the bed runs; sets PID.
# A recorded pid is only believed when its command line names the bed's folder.
alive() {
    PID="$(cat "$BED/$1.pid" 2>/dev/null || true)"
    [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null && tr '\0' ' ' <"/proc/$PID/cmdline" 2>/dev/null | grep -qF "$BED"
}

free_port() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# lay_out: the three servers' configurations and the three copies' folders.
lay_out() {
    local i j routes
    mkdir -p "$BED"
    printf 'BED_PORT=%q\nPMNC=%q\n' "$BED_PORT" "$PMNC" >"$BED/bed.env"
    for i in 1 2 3; do
        routes=""
        for j in 1 2 3; do
            [ "$j" = "$i" ] || routes="$routes${routes:+, }nats-route://127.0.0.1:${ROUTE[$j]}"
        done
        mkdir -p "$BED/js/n$i"
        cat >"$BED/n$i.conf" <<EOF
server_name: n$i
listen: 127.0.0.1:${CLIENT[$i]}
http: 127.0.0.1:${MONITOR[$i]}
jetstream {
  store_dir: "$BED/js/n$i"
}
cluster {
  name: pmnc_bed
  listen: 127.0.0.1:${ROUTE[$i]}
  routes: [$routes]
}
EOF
        local cage="$BED/host$i/worker"
        mkdir -p "$cage/effects"
        cp "$EXAMPLE/http.lua" "$EXAMPLE/work.lua" "$cage/"
        local quoted
        quoted="\"${URLS//,/\", \"}\""
        sed "s|^url = .*|url = [$quoted]|" "$EXAMPLE/cage.toml" >"$cage/cage.toml"
    done
}

# up NAME: starts n1..n3 or host1..host3 (again) in its own session, so that it outlives this
# script; waits until it is ready.
up() {
    local name="$1"
    if alive "$name"; then
        echo "$name already runs (pid $PID)"
        return 0
    fi
    case "$name" in
        n[123])
            local i="${name#n}"
            setsid "$NATS_SERVER" -c "$BED/n$i.conf" >>"$BED/n$i.log" 2>&1 </dev/null &
            echo $! >"$BED/n$i.pid"
            disown $!
            for _ in $(seq 100); do
                curl -s --max-time 1 "http://127.0.0.1:${MONITOR[$i]}/varz" >/dev/null 2>&1 && return 0
                sleep 0.1
            done
            echo "nats-server n$i did not answer on its monitoring port ${MONITOR[$i]}:"
            tail -20 "$BED/n$i.log"
            return 1
            ;;
        host[123])
            local log="$BED/$name/pmnc.log"
            : >"$log"
            setsid "$PMNC" run "$BED/$name/worker" --workers 2 >"$log" 2>&1 </dev/null &
            echo $! >"$BED/$name.pid"
            disown $!
            for _ in $(seq 300); do
                if grep -q 'running [0-9]* cage' "$log"; then
                    grep -Eo 'listening on 127\.0\.0\.1:[0-9]+' "$log" | head -n1 | grep -Eo '[0-9]+$' >"$BED/$name.port"
                    return 0
                fi
                kill -0 "$(cat "$BED/$name.pid")" 2>/dev/null || break
                sleep 0.1
            done
            echo "pmnc $name did not start:"
            tail -20 "$log"
            return 1
            ;;
        *)
            echo "no process named $name in the bed (n1, n2, n3, host1, host2, host3)"
            return 1
            ;;
    esac
}

# js_ready: waits until the three servers see each other, agree on a JetStream meta leader and
# report themselves healthy (JetStream current).
js_ready() {
    local i ok
    for _ in $(seq 300); do
        ok=1
        for i in 1 2 3; do
            alive "n$i" || continue
            curl -s --max-time 1 "http://127.0.0.1:${MONITOR[$i]}/healthz" | grep -q '"ok"' || ok=0
            curl -s --max-time 1 "http://127.0.0.1:${MONITOR[$i]}/jsz" | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin).get("meta_cluster",{}).get("leader") else 1)' 2>/dev/null || ok=0
        done
        [ "$ok" = 1 ] && return 0
        sleep 0.1
    done
    echo "the NATS servers did not form a JetStream cluster within 30 s"
    return 1
}

# start_bed: lays the bed out and starts its six processes.
start_bed() {
    local i
    if [ ! -x "$PMNC" ]; then
        echo "== no binary at $PMNC: cargo build --release -p pmnc"
        (cd "$ROOT" && cargo build --release -p pmnc) || { echo "build failed"; exit 1; }
    fi
    [ -x "$NATS_SERVER" ] || { echo "SKIPPED: needs nats-server (apt-get install -y nats-server, or NATS_SERVER=path)"; exit 0; }
    for i in 1 2 3; do
        for p in "${CLIENT[$i]}" "${ROUTE[$i]}" "${MONITOR[$i]}"; do
            free_port "$p" || { echo "port $p is taken: choose other ports with BED_PORT=n (n .. n+2, n+2000 .., n+4000 ..)"; exit 1; }
        done
    done
    lay_out
    for i in 1 2 3; do up "n$i" || exit 1; done
    js_ready || exit 1
    for i in 1 2 3; do up "host$i" || exit 1; done
}

stop_bed() {
    local name
    [ -n "${SENDER_PID:-}" ] && kill "$SENDER_PID" 2>/dev/null
    for name in host1 host2 host3 n1 n2 n3; do
        if alive "$name"; then
            kill -TERM "$PID" 2>/dev/null
            for _ in $(seq 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$PID" 2>/dev/null || true
        fi
    done
    if [ "${KEEP:-0}" = 1 ]; then
        echo "(KEEP=1: leaving $BED)"
    else
        rm -rf "$BED"
    fi
}

show() {
    local i
    echo "bed in $BED: flock bed, cage worker, queue jobs (store = \"cluster\", replicas = 3, ack_wait = ${ACK_WAIT}s)"
    for i in 1 2 3; do
        alive "n$i" && state="pid $PID" || state="down"
        echo "  NATS n$i     nats://127.0.0.1:${CLIENT[$i]}  monitoring http://127.0.0.1:${MONITOR[$i]}/jsz  $state"
    done
    for i in 1 2 3; do
        alive "host$i" && state="pid $PID" || state="down"
        echo "  copy host$i  http://127.0.0.1:$(cat "$BED/host$i.port" 2>/dev/null)  $BED/host$i/worker  $state"
    done
}

commands() {
    local p1 me="${BASH_SOURCE[0]}"
    p1="$(cat "$BED/host1.port")"
    alive n2
    local n2="$PID"
    alive host3
    local h3="$PID"
    cat <<EOF

Try it:
  enqueue 1000 calls:        curl 'http://127.0.0.1:$p1/enqueue?from=1&to=1000&ms=5'
  read one call:             curl 'http://127.0.0.1:$p1/result?id=c1'
  the queue (stream, held):  $PMNC queue ls $BED/host1/worker
  the copies:                $PMNC cluster status $BED/host1/worker
  kill a NATS server:        kill -9 $n2        (start it again: $me up n2)
  kill a copy:               kill -9 $h3        (start it again: $me up host3)
  count c1..c1000:           $me count 1000
  stop:                      $me stop
Each copy's attempts are in $BED/host*/worker/effects/ran.log, its log in $BED/host*/pmnc.log.
EOF
}

# ---- counting -------------------------------------------------------------------------------

# leaders: which server leads the queue's stream, its consumer and the results bucket, as
# "stream=n1,consumer=n2,bucket=n3", asked of the first server that answers.
leaders() {
    local i
    for i in 1 2 3; do
        alive "n$i" || continue
        curl -s --max-time 2 "http://127.0.0.1:${MONITOR[$i]}/jsz?accounts=true&streams=true&consumers=true" | python3 -c '
import json, sys
want = {"PMNC_bed_Q_worker_jobs": "stream", "KV_pmnc_bed_worker_calls": "bucket"}
found = {}
for acc in json.load(sys.stdin).get("account_details", []):
    for st in acc.get("stream_detail", []):
        role = want.get(st.get("name"))
        if not role:
            continue
        found[role] = (st.get("cluster") or {}).get("leader", "?")
        if role == "stream":
            for c in st.get("consumer_detail", []):
                if c.get("name") == "pmnc":
                    found["consumer"] = (c.get("cluster") or {}).get("leader", "?")
print(",".join("%s=%s" % (k, found.get(k, "?")) for k in ("stream", "consumer", "bucket")))
' 2>/dev/null && return 0
    done
    echo "stream=?,consumer=?,bucket=?"
}

# count N: reads every copy's effects/ran.log* and $BED/kills ("time round copy server log
# leaders" per kill), the servers' logs for leader elections, and prints the figures.
count() {
    python3 - "$BED" "$1" "$ACK_WAIT" <<'EOF'
import glob, os, sys
bed, n, ack_wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

def read(path):
    out = []
    for line in open(path, errors="replace"):
        f = line.split()
        if len(f) != 4 or f[0] not in ("S", "E") or not line.endswith("\n"):
            continue  # a line cut short by a kill
        try:
            out.append((f[0], f[1], int(f[2]), float(f[3])))
        except ValueError:
            pass
    return out

logs = {p: read(p) for p in sorted(glob.glob(os.path.join(bed, "host*/worker/effects/ran.log*")))}
ends, starts = {}, {}
for notes in logs.values():
    for kind, cid, _, _ in notes:
        d = ends if kind == "E" else starts
        d[cid] = d.get(cid, 0) + 1
ids = ["c%d" % i for i in range(1, n + 1)]
lost = [c for c in ids if c not in ends]
twice = sorted(c for c, k in ends.items() if k > 1)
again = sum(1 for c, k in starts.items() if k > 1)
last_end = max((t for notes in logs.values() for kind, _, _, t in notes if kind == "E"), default=0)

kills = []
if os.path.exists(os.path.join(bed, "kills")):
    for line in open(os.path.join(bed, "kills")):
        f = line.split()
        if len(f) == 6:
            kills.append((float(f[0]), f[1], f[2], f[3], f[4], dict(kv.split("=", 1) for kv in f[5].split(","))))

# Leader elections the servers logged: (time, "consumer" or "stream", the asset's name).
import datetime, re
elected = []
for path in glob.glob(os.path.join(bed, "n*.log")):
    for line in open(path, errors="replace"):
        m = re.search(r"(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\.\d+) \[INF\] JetStream cluster new (consumer|stream) leader for '([^']*)'", line)
        if m:
            t = datetime.datetime.strptime(m.group(1), "%Y/%m/%d %H:%M:%S.%f").timestamp()
            elected.append((t, m.group(2), m.group(3)))
ASSETS = {"consumer": ("consumer", "PMNC_bed_Q_worker_jobs > pmnc"), "bucket": ("stream", "KV_pmnc_bed_worker_calls")}

def election(t_kill, role):
    kind, name = ASSETS[role]
    ts = [t for t, k, a in elected if k == kind and a.endswith(name) and t_kill < t < t_kill + 120]
    return min(ts) if ts else None

def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[max(0, min(len(xs) - 1, -(-len(xs) * p // 100) - 1))]

window, lat, after = set(), [], []
for t_kill, rnd, copy, server, path, led in kills:
    # Detection: ack_wait after the kill, or the election of a leader the dead server held.
    detect, notes = t_kill + ack_wait, []
    for role in ("consumer", "bucket"):
        if server != "-" and led.get(role) == server:
            t = election(t_kill, role)
            notes.append("%s leader elected %s" % (role, "%.2f s after" % (t - t_kill) if t else "(not in the logs)"))
            if t:
                detect = max(detect, t)
    mine_lat = []
    mine = [x for x in logs.get(path, []) if x[3] <= t_kill]
    last = {}
    for kind, cid, dlv, t in mine:
        last[cid] = (kind, dlv)
    others = [x for p, notes in logs.items() if p != path for x in notes]
    held = []
    for cid, (kind, dlv) in last.items():
        rerun = min((t for k, c, d, t in others if k == "S" and c == cid and d > dlv and t > t_kill), default=None)
        if kind == "S" or rerun is not None:
            held.append(cid)
            window.add(cid)
            if rerun is not None:
                lat.append(rerun - t_kill)
                after.append(rerun - detect)
                mine_lat.append(rerun - t_kill)
    killed = "copy %s" % copy + ("" if server == "-" else " and NATS %s (leading %s)" % (server, ", ".join(r for r in ("stream", "consumer", "bucket") if led.get(r) == server) or "nothing"))
    print("round %s: killed %s; it held %d calls (started, end not recorded)%s%s" % (
        rnd, killed, len(held), "".join("; " + n for n in notes),
        "; rerun %.2f-%.2f s after the kill, %.2f-%.2f s after detection" % (min(mine_lat), max(mine_lat), min(mine_lat) - (detect - t_kill), max(mine_lat) - (detect - t_kill)) if mine_lat else ""))

print("calls=%d lost=%d ran_twice=%d started_again=%d" % (n, len(lost), len(twice), again))
if lost:
    print("  LOST: %s" % " ".join(lost[:30]))
if twice:
    outside = [c for c in twice if c not in window]
    print("  ran twice: %s (outside the kill window: %d)" % (" ".join(twice[:30]), len(outside)))
if lat:
    p50, p99 = pct(lat, 50), pct(lat, 99)
    print("kill-to-rerun over %d calls: p50 %.2f s, p99 %.2f s, max %.2f s; after detection (ack_wait %gs or a later election): p50 %.2f s, p99 %.2f s, max %.2f s"
          % (len(lat), p50, p99, max(lat), ack_wait, pct(after, 50), pct(after, 99), max(after)))
if kills and last_end:
    print("drained %.1f s after the first kill, %.1f s after the last" % (last_end - kills[0][0], last_end - kills[-1][0]))
sys.exit(1 if lost else 0)
EOF
}

# ended: how many distinct calls have an E line.
ended() {
    cat "$BED"/host*/worker/effects/ran.log* 2>/dev/null | awk '$1 == "E" && NF == 4 {print $2}' | sort -u | wc -l
}

# ---- demo and chaos -------------------------------------------------------------------------

# sender: enqueues c1..c$CALLS through copy host1 in requests of 100, each sent again from the
# first call that was not accepted; $BED/sent holds the last call accepted.
sender() {
    local port from=1 to body
    port="$(cat "$BED/host1.port")"
    echo 0 >"$BED/sent"
    while [ "$from" -le "$CALLS" ]; do
        to=$((from + 99))
        [ "$to" -gt "$CALLS" ] && to="$CALLS"
        body="$(curl -s --max-time 60 "http://127.0.0.1:$port/enqueue?from=$from&to=$to&ms=$WORK_MS")"
        if [ "$body" = ok ]; then
            echo "$to" >"$BED/sent"
            from=$((to + 1))
        elif [[ "$body" =~ ^ERR\ at\ ([0-9]+): ]]; then
            echo "$(date +%T.%N | cut -c1-12) $body" >>"$BED/refused"
            from="${BASH_REMATCH[1]}"
            sleep 0.1
        else
            echo "$(date +%T.%N | cut -c1-12) no answer from host1: $body" >>"$BED/refused"
            sleep 0.2
        fi
    done
}

# scenario ROUNDS RESTART: kills a copy (host3, host2, ...) and, unless KILL=copy, a NATS server
# (n2, n3, n1, ...; KILL=leader: the one leading the queue's consumer) each round once enough
# calls ended; with RESTART=1 starts both again after the round.
scenario() {
    local rounds="$1" restart="$2" r copy server t log held
    local copies=(host3 host2) servers=(n2 n3 n1)
    : >"$BED/kills"
    : >"$BED/refused"
    local started
    started="$(date +%s.%N)"
    sender &
    SENDER_PID=$!
    local sender_pid=$SENDER_PID
    for r in $(seq "$rounds"); do
        copy="${copies[$(((r - 1) % 2))]}"
        server="${servers[$(((r - 1) % 3))]}"
        local want=$((CALLS * r / (rounds + 2)))
        for _ in $(seq 1200); do
            [ "$(ended)" -ge "$want" ] && break
            sleep 0.1
        done
        local led
        led="$(leaders)"
        case "$KILL" in
            copy) server="-" ;;
            leader)
                server="$(echo "$led" | tr ',' '\n' | sed -n 's/^consumer=//p')"
                [[ "$server" =~ ^n[123]$ ]] || server="${servers[$(((r - 1) % 3))]}"
                ;;
        esac
        alive "$copy"
        local copy_pid="$PID" server_pid=""
        if [ "$server" != "-" ]; then
            alive "$server"
            server_pid="$PID"
        fi
        kill -9 "$copy_pid" $server_pid
        t="$(date +%s.%N)"
        for _ in $(seq 200); do
            [ -d "/proc/$copy_pid" ] && ! grep -q '^State:.*Z' "/proc/$copy_pid/status" 2>/dev/null && { sleep 0.01; continue; }
            [ -n "$server_pid" ] && [ -d "/proc/$server_pid" ] && ! grep -q '^State:.*Z' "/proc/$server_pid/status" 2>/dev/null && { sleep 0.01; continue; }
            break
        done
        # The dead copy's log moves aside: this round counts what it held.
        log="$BED/$copy/worker/effects/ran.log.round$r"
        mv "$BED/$copy/worker/effects/ran.log" "$log" 2>/dev/null || : >"$log"
        echo "$t $r $copy $server $log $led" >>"$BED/kills"
        held="$(awk '{last[$2] = $1} END {n = 0; for (c in last) if (last[c] == "S") n++; print n}' "$log")"
        echo "== round $r: kill -9 copy $copy (pid $copy_pid)$([ "$server" = - ] || echo " and NATS $server (pid $server_pid)") after $(ended) calls ended; it was running $held; leaders before: $led"
        if [ "$restart" = 1 ]; then
            # Its calls run elsewhere within ack_wait (and a new leader's election); then both
            # come back.
            for _ in $(seq 200); do
                count_quiet && break
                sleep 0.1
            done
            { [ "$server" = - ] || { up "$server" && js_ready; }; } && up "$copy" || { echo "could not start $server or $copy again"; kill "$sender_pid"; return 1; }
            echo "   started $([ "$server" = - ] || echo "$server and ")$copy again"
        fi
    done
    wait "$sender_pid"
    local sent_at
    sent_at="$(date +%s.%N)"
    echo "== all $CALLS calls accepted after $(awk -v a="$started" -v b="$sent_at" 'BEGIN {printf "%.1f", b - a}') s ($(wc -l <"$BED/refused") requests refused for a moment and sent again)"
    for _ in $(seq 3000); do
        [ "$(ended)" -ge "$CALLS" ] && break
        sleep 0.1
    done
    echo "== $(ended) of $CALLS calls ended $(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s after the first was sent"
}

# count_quiet: whether every call the copy killed last had started and not ended has started
# again on another copy.
count_quiet() {
    python3 - "$BED" <<'EOF'
import glob, os, sys
bed = sys.argv[1]
t, _, _, _, path, _ = open(os.path.join(bed, "kills")).read().split("\n")[-2].split()
t = float(t)
last = {}
for line in open(path, errors="replace"):
    f = line.split()
    if len(f) == 4:
        last[f[1]] = f[0]
held = {c for c, k in last.items() if k == "S"}
for p in glob.glob(os.path.join(bed, "host*/worker/effects/ran.log*")):
    if p == path:
        continue
    for line in open(p, errors="replace"):
        f = line.split()
        if len(f) == 4 and f[0] == "S" and f[1] in held:
            try:
                if float(f[3]) > t:
                    held.discard(f[1])
            except ValueError:
                pass
sys.exit(0 if not held else 1)
EOF
}

# ---- modes ----------------------------------------------------------------------------------

if [ "$MODE" = start ] || [ "$MODE" = demo ] || [ "$MODE" = chaos ]; then
    BED_PORT="${BED_PORT:-$([ "$MODE" = start ] && echo 14222 || echo 24222)}"
else
    [ -f "$BED/bed.env" ] || { echo "no bed in $BED (bench/cluster-bed.sh start, or BED=folder)"; exit 1; }
    # shellcheck disable=SC1091
    . "$BED/bed.env"
fi
PMNC="${PMNC:-$ROOT/target/release/pmnc}"
ports "$BED_PORT"

case "$MODE" in
    start)
        if alive n1 || alive host1; then
            echo "a bed already runs in $BED ($0 stop first)"
            exit 1
        fi
        start_bed
        show
        commands
        ;;
    up) up "${2:?up NAME: n1..n3 or host1..host3}" && { [[ "$2" != n* ]] || js_ready; } && show ;;
    status) show ;;
    count) count "${2:?count N: the calls c1..cN}" ;;
    stop) stop_bed ;;
    demo | chaos)
        trap stop_bed EXIT
        trap 'exit 130' INT
        trap 'exit 143' TERM
        # Calls long enough that every copy has some running when it is killed.
        WORK_MS="${WORK_MS:-50}"
        KILL="${KILL:-both}"
        case "$KILL" in both | copy | leader) ;; *) echo "KILL must be both, copy or leader, got '$KILL'"; exit 2 ;; esac
        if [ "$MODE" = demo ]; then
            CALLS="${CALLS:-3000}"
            ROUNDS=1
        else
            CALLS="${CALLS:-10000}"
            ROUNDS="${ROUNDS:-5}"
        fi
        echo "== $MODE: $CALLS calls of ${WORK_MS} ms, $ROUNDS round(s) of kills ($KILL); $("$NATS_SERVER" --version); $PMNC"
        echo "== load before: $(uptime | sed 's/.*load/load/')"
        old_server_note
        start_bed
        show
        scenario "$ROUNDS" "$([ "$MODE" = chaos ] && echo 1 || echo 0)" || exit 1
        count "$CALLS"
        rc=$?
        echo "== load after: $(uptime | sed 's/.*load/load/')"
        exit "$rc"
        ;;
esac
