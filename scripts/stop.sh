#!/usr/bin/env bash
# Stops the servers listed in FILE ("name pid" lines, as scripts/setup.sh writes them to
# $CRANK_STARTED), last started first, each with SIGTERM and then, after 30 s (dockerd
# stops its containers first, SeaweedFS waits 10 s), SIGKILL.
set -uo pipefail
file=${1:?usage: stop.sh FILE}
[[ -s $file ]] || exit 0
tac "$file" | while read -r name pid; do
    kill -0 "$pid" 2>/dev/null || continue
    kill "$pid" 2>/dev/null
    for _ in $(seq 1 300); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -9 "$pid" 2>/dev/null
        echo "stop.sh: $name (pid $pid) did not stop within 30 s: killed"
    else
        echo "stop.sh: stopped $name (pid $pid)"
    fi
done
