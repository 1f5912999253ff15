#!/usr/bin/env bash
# PostgreSQL through Lua transactions: latency of a transaction of two participants against the
# same two statements in sequence, and pooled `select 1` calls/s from Lua against raw
# tokio-postgres (same runtime layout, same connection count). Prints figures, never fails on one;
# when the server is not reachable it says so loudly and exits 0. All of it is the cargo bench
# target crates/resources/postgresql/benches/transactions.rs, built with the release (bench)
# profile; this script only runs it from the workspace.
#
#   bench/postgresql.sh                                    ~45 s once built
#   PMNC_TEST_POSTGRES_URL=postgresql://u@127.0.0.1:5432/db bench/postgresql.sh
#   PG_BENCH_ITERATIONS=500 PG_BENCH_SLEEP_MS=5            part 1: iterations, pg_sleep per statement
#   PG_BENCH_CONNECTIONS=4 PG_BENCH_SECONDS=1 PG_BENCH_ROUNDS=3   part 2
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
echo "== cargo bench -p rustomnic-resource-postgresql --bench transactions"
echo "== built from $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "unknown commit")$( [ -n "$(git -C "$ROOT" status --porcelain -- crates Cargo.lock 2>/dev/null | head -n1)" ] && echo " + uncommitted changes in crates/")"
exec cargo bench -p rustomnic-resource-postgresql --bench transactions
