#!/bin/sh
# The image's entry point: the monitor listens on every address of the container, which
# requires a token for its pages (/metrics, /status). Without MONITOR_TOKEN one is made up at
# random, so the image runs as it is; /healthz and /readyz need none. Then pmnc replaces this
# shell, so it receives the container's SIGTERM itself.
set -eu
if [ -z "${MONITOR_TOKEN:-}" ]; then
  MONITOR_TOKEN=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  export MONITOR_TOKEN
fi
exec /usr/local/bin/pmnc "$@"
