#!/usr/bin/env bash
# Idle WebSockets: the same measurement as longpoll.py with MODE=websocket (see there).
exec env MODE=websocket "$(dirname "$0")/longpoll.py" "$@"
