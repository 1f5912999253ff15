#!/usr/bin/env bash
# Celery tasks served by a cage's celery interface against Celery's own prefork worker
# (concurrency = WORKERS), on the same broker, queue, Python producer and result backend, one
# after the other in one run (bench/celery_bench.py), on Redis and then on RabbitMQ (the
# machine's, PMNC_BENCH_AMQP_URL). The queue is filled before each worker starts, so the Python
# producer is not measured. Prints tasks/s of both, the CPU per task of each worker and of the
# broker, and the ratio (target >= 20x on each, issue 16). On RabbitMQ it also drains the same
# filled queue with a bare lapin consumer that only acknowledges, 64 messages per `basic.ack`
# (amqp_bare_consumer): the broker's own ceiling on this machine for any worker that
# acknowledges after its task. Never fails because of a figure.
#
#   bench/celery.sh                 20,000 no-op tasks each, on each broker
#   BROKERS=amqp bench/celery.sh    one broker
#   CALLS=50000 WORKERS=2 bench/celery.sh
#   python3 bench/celery_bench.py --work DIR --pmnc BIN --no-celery   one build alone (A/B of builds)
set -uo pipefail
source "$(dirname "$0")/common.sh"

if ! command -v redis-server >/dev/null 2>&1 || ! python3 -c "import celery, redis, packaging" 2>/dev/null; then
    echo "SKIPPED: needs redis-server (apt-get install redis-server) and Celery (pip install celery redis packaging)"
    exit 0
fi
build
echo "== cargo build --release -p rustomnic-amqp --example amqp_bare_consumer"
(cd "$ROOT" && cargo build --release -p rustomnic-amqp --example amqp_bare_consumer) || { echo "build failed"; exit 1; }
BARE="${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/amqp_bare_consumer"
for broker in ${BROKERS:-redis amqp}; do
    python3 "$ROOT/bench/celery_bench.py" --work "$WORK/celery-$broker" --pmnc "$PMNC" --calls "${CALLS:-20000}" --workers "${WORKERS:-2}" --broker "$broker" --bare "$BARE"
done
exit 0
