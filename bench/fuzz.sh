#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for a while, one after another on one core, from
# the kept corpus (fuzz/corpus/<target>, never written to: new inputs go to a work folder) with
# its dictionary, and prints a table: execs, exec/s, coverage (cov and ft, libFuzzer's edge and
# feature counts), corpus (files and bytes at the end), and what went wrong (crash, timeout,
# OOM or leak, with the input left in fuzz/artifacts/<target>/). Needs a nightly toolchain and
# cargo-fuzz (cargo install cargo-fuzz). Exits non-zero when any target failed.
#
#   bench/fuzz.sh                    5 minutes per target
#   bench/fuzz.sh 30m                30 minutes per target
#   bench/fuzz.sh 20s json http1     two targets, 20 seconds each (.ci/run runs all for 5s)
#   NICE=19 KEEP=1 bench/fuzz.sh 5m  lowest priority; keep the work folder (grown corpora, logs)
#   JOBS=...                         not offered: one target at a time, one core each
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ="$ROOT/fuzz"
DURATION="${1:-5m}"
shift || true
case "$DURATION" in
    *s) SECONDS_EACH="${DURATION%s}" ;;
    *m) SECONDS_EACH=$(( ${DURATION%m} * 60 )) ;;
    *h) SECONDS_EACH=$(( ${DURATION%h} * 3600 )) ;;
    *) echo "duration like 20s, 5m or 1h, not $DURATION" >&2; exit 2 ;;
esac
NICE="${NICE:-0}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/rustomnic-fuzz.XXXXXX")"
if [ "${KEEP:-0}" = 1 ]; then
    trap 'echo "(KEEP=1: leaving $WORK)"' EXIT
else
    trap 'rm -rf "$WORK"' EXIT
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "no nightly toolchain (rustup toolchain install nightly)" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "no cargo-fuzz (cargo install cargo-fuzz)" >&2
    exit 2
fi
cd "$FUZZ"
# Release code with debug assertions: overflow checks and debug_assert! are part of what is fuzzed.
nice -n "$NICE" cargo +nightly fuzz build -O -a >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; exit 2; }
if [ "$#" -gt 0 ]; then
    TARGETS=("$@")
else
    mapfile -t TARGETS < <(cargo +nightly fuzz list)
fi

echo "== built from $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "unknown commit")$( [ -n "$(git -C "$ROOT" status --porcelain -- crates fuzz 2>/dev/null | head -n1)" ] && echo " + uncommitted changes")"
echo "== $DURATION per target, one core, nice $NICE, $(nproc) cores on the machine, load $(cut -d' ' -f1-3 /proc/loadavg)"
ROWS=()
FAILED=0
for t in "${TARGETS[@]}"; do
    mkdir -p "$WORK/corpus/$t" "$FUZZ/artifacts/$t"
    seeds="$FUZZ/corpus/$t"
    mkdir -p "$seeds"
    dict=()
    [ -f "$FUZZ/dict/$t.dict" ] && dict=(-dict="$FUZZ/dict/$t.dict")
    before=$(ls "$FUZZ/artifacts/$t" | wc -l)
    # -timeout: an input taking 10 s is a hang; -rss_limit_mb also bounds any one allocation.
    nice -n "$NICE" cargo +nightly fuzz run -O -a "$t" "$WORK/corpus/$t" "$seeds" -- \
        -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$FUZZ/artifacts/$t/" "${dict[@]}" >"$WORK/$t.log" 2>&1
    status=$?
    execs=$(grep -m1 '^stat::number_of_executed_units' "$WORK/$t.log" | awk '{print $2}')
    rate=$(grep -m1 '^stat::average_exec_per_sec' "$WORK/$t.log" | awk '{print $2}')
    done_line=$(grep -E '^#[0-9]+\s+(DONE|NEW|REDUCE|pulse|INITED)' "$WORK/$t.log" | tail -n1)
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$done_line")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$done_line")
    files=$(find "$WORK/corpus/$t" "$seeds" -type f -printf '%f\n' | sort -u | wc -l)
    bytes=$(find "$WORK/corpus/$t" "$seeds" -type f -printf '%s\n' | awk '{s+=$1} END {print s+0}')
    after=$(ls "$FUZZ/artifacts/$t" | wc -l)
    problem="none"
    if [ "$status" != 0 ] || [ "$after" != "$before" ]; then
        FAILED=1
        kind=$(grep -oE 'ERROR: libFuzzer: [a-z-]+|deadly signal|out-of-memory|detected memory leaks|panicked at' "$WORK/$t.log" | head -n1)
        problem="${kind:-exit $status}; $(ls -t "$FUZZ/artifacts/$t" | head -n1)"
        cp "$WORK/$t.log" "$FUZZ/artifacts/$t/last-run.log"
    fi
    ROWS+=("$(printf '%-18s %12s %9s %7s %8s %7s %10s  %s' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "$files" "$bytes" "$problem")")
    echo "${ROWS[-1]}"
done
echo
printf '%-18s %12s %9s %7s %8s %7s %10s  %s\n' target execs exec/s cov ft corpus bytes problems
printf '%s\n' "${ROWS[@]}"
exit "$FAILED"
