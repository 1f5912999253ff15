#!/usr/bin/env bash
# Clustered queues on JetStream (docs/queues.md "Clustered store"), on a private nats-server
# with JetStream that the tests start themselves:
#  1. the chaos run: three copies of one cage share a clustered queue while 10,000 calls flow,
#     copies 1 and 2 are killed with kill -9 at random moments and started again; prints the
#     calls, kills, lost calls (must be 0), calls that took effect twice, calls delivered again,
#     and the time from the last kill until every call had run;
#  2. durable calls/s end to end (enqueue, run, state commit) of one process on the embedded
#     store (SQLite) and on the clustered store with replicas 1, in the same run;
#  3. the same on a 3-node JetStream cluster (crates/pmnc/tests/queue_bed.rs): embedded,
#     replicas 1 and replicas 3, in the same run;
#  4. the 3-node bed (bench/cluster-bed.sh chaos): three servers, three copies each from a
#     folder of its own, rounds of kill -9 of one NATS server and one copy while calls flow;
#     calls lost, run twice, and the time from killing a copy to its calls running elsewhere.
#
#   bench/queue-cluster.sh         CALLS=n chaos calls (default 10000)
#                                  BENCH_CALLS=n calls per store in parts 2 and 3 (default 20000)
#                                  BED_CALLS=n, BED_ROUNDS=n calls and rounds of part 4
#                                  (default 10000, 5)
#                                  NATS_SERVER=path another nats-server binary
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CALLS="${CALLS:-10000}"
BENCH_CALLS="${BENCH_CALLS:-20000}"
command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || [ -n "${NATS_SERVER:-}" ] || {
    echo "SKIPPED: needs nats-server (apt-get install -y nats-server, or NATS_SERVER=path)"
    exit 0
}
echo "nats-server: $(${NATS_SERVER:-$(command -v nats-server || echo /usr/sbin/nats-server)} --version)"
OUT="$(mktemp)"
trap 'rm -f "$OUT"' EXIT
# Runs one test of crates/pmnc/tests/queue_jetstream.rs (or of $SUITE) in release and prints its
# figures (or, when it printed none, the end of cargo's output).
run() {
    local want="$1"; shift
    nice cargo test --release -p pmnc --test "${SUITE:-queue_jetstream}" "$@" >"$OUT" 2>&1
    grep -E "$want|panicked|FAILED" "$OUT" || tail -20 "$OUT"
}
echo "== chaos: $CALLS calls, copies killed at random =="
PMNC_QUEUE_CHAOS_CALLS="$CALLS" run "queue chaos" chaos_copies_killed_at_random_while_calls_flow_lose_nothing -- --nocapture
echo "== time from killing a copy to its call running on another (ack_wait 2 s) =="
run "ran elsewhere" a_call_whose_copy_dies_while_it_runs -- --nocapture
echo "== durable calls/s, embedded against clustered (replicas 1) =="
PMNC_QUEUE_BENCH_CALLS="$BENCH_CALLS" run "queue bench" bench_durable_calls_per_second_clustered_against_embedded -- --ignored --nocapture
echo "== durable calls/s on a 3-node cluster: embedded, replicas 1, replicas 3 =="
SUITE=queue_bed PMNC_QUEUE_BENCH_CALLS="$BENCH_CALLS" run "queue bed bench" bench_durable_calls_per_second_replicas_1_and_3_against_embedded -- --ignored --nocapture
echo "== the 3-node bed: ${BED_ROUNDS:-5} rounds of kill -9 of a NATS server and a copy =="
nice cargo build --release -p pmnc >"$OUT" 2>&1 || tail -20 "$OUT"
CALLS="${BED_CALLS:-10000}" ROUNDS="${BED_ROUNDS:-5}" bench/cluster-bed.sh chaos
