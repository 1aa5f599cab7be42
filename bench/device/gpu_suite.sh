#!/usr/bin/env bash
# The GPU test suite in ONE pytest process, longer than one `device` call may last (10 minutes): `start` launches
# it in its own session (setsid: it outlives the call), `wait S` follows it for up to S seconds and copies its log
# to $OUT. Make the next call within the machine's warm window (30 s) or the machine, and the run, are gone.
#   call 1:  . bench/device/setup.sh; bash bench/device/gpu_suite.sh start; bash bench/device/gpu_suite.sh wait 570
#   call 2+: bash bench/device/gpu_suite.sh wait 580
# The log has one line per test with the seconds since the start, so a cut run still shows the slow tests.
set -uo pipefail
R="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUN=/tmp/gpu_suite
case "${1:-}" in
start)
    rm -rf "$RUN" && mkdir -p "$RUN"
    # from /tmp: the repo root on sys.path would shadow Hugging Face's `kernels` package (tests/conftest.py)
    setsid bash -c "cd /tmp && start=\$(date +%s); python3 -m pytest -v -rs -p no:cacheprovider --durations=60 \
        '$R/tests' --ignore='$R/tests/integration' 2>&1 | while IFS= read -r line; do \
        echo \"\$(( \$(date +%s) - start ))s \$line\"; done > '$RUN/log'; echo \${PIPESTATUS[0]} > '$RUN/rc'" \
        < /dev/null > /dev/null 2>&1 &
    echo "started: $RUN/log"
    ;;
wait)
    limit="${2:-570}"
    waited=0
    while [ ! -f "$RUN/rc" ] && [ "$waited" -lt "$limit" ]; do sleep 5; waited=$((waited + 5)); done
    [ -n "${OUT:-}" ] && cp "$RUN/log" "$OUT/gpu_suite.log"
    grep -cE ' (PASSED|FAILED|ERROR|SKIPPED)' "$RUN/log" | sed 's/^/tests done: /'
    grep -E ' (FAILED|ERROR) ' "$RUN/log" | head -20
    if [ -f "$RUN/rc" ]; then echo "finished, pytest exit status $(cat "$RUN/rc")"; tail -5 "$RUN/log"; else
        echo "still running: call 'bash bench/device/gpu_suite.sh wait 580' again within 30 s"; tail -2 "$RUN/log"; fi
    ;;
*)
    echo "usage: gpu_suite.sh start | wait [seconds]" >&2; exit 2 ;;
esac
