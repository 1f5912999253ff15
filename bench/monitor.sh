#!/usr/bin/env bash
# What monitoring costs: recording one request (1 and 2 threads on one interface), one sample of
# every figure, the series JSON of the page and the /metrics page. Prints figures; never fails on
# them (exit non-zero only when it cannot build or run the measurement).
set -euo pipefail
cd "$(dirname "$0")/.."
N="${N:-5000000}"
echo "building the measurement (release)..."
cargo build --release -q -p rustomnic-monitor --example record_cost
target="${CARGO_TARGET_DIR:-target}"
N="$N" "$target/release/examples/record_cost"
