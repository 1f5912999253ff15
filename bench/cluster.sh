#!/usr/bin/env bash
# Cross-cage call round trips over NATS against a bare async-nats request/reply on the same
# nats-server, 1 and 32 calls in flight (p50, p99, calls/s, ratios). Figures only, never a
# pass/fail. Needs nats-server (apt-get install nats-server).
#
#   bench/cluster.sh                 ~1 minute once built
#   bench/cluster.sh --calls 50000
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
cargo build --release -p pmnc
echo "== built from $(git rev-parse --short HEAD 2>/dev/null || echo "unknown commit")$( [ -n "$(git status --porcelain -- crates Cargo.lock 2>/dev/null | head -n1)" ] && echo " + uncommitted changes in crates/")"
exec python3 bench/cluster.py --pmnc target/release/pmnc "$@"
