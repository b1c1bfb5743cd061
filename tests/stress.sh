#!/usr/bin/env bash
# Repeat tests N times and print how often each failed: the check that multi-rank tests are
# deterministic (a rare abort at process exit shows up here, not in one green run).
# Usage: bash tests/stress.sh N [pytest args...]
#   default pytest args: -m multirank (every test that starts several ranks; see tests/conftest.py)
#   e.g. bash tests/stress.sh 50 tests/test_scion_megatron.py
# Exit status: 0 when every run passed, 1 when any failed, 2 on bad usage.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  echo "usage: bash tests/stress.sh N [pytest args...]   (N >= 1 repetitions; default args: -m multirank)" >&2
  exit 2
}
[ "$#" -ge 1 ] || usage
runs="$1"
shift
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || usage
if [ "$#" -eq 0 ]; then
  set -- -m multirank
fi

logs="$(mktemp -d "${TMPDIR:-/tmp}/disco_stress.XXXXXX")"
failed_runs=0
for ((i = 1; i <= runs; i++)); do
  log="$logs/run_$i.log"
  start=$SECONDS
  if python -m pytest -q -p no:cacheprovider -rfE "$@" >"$log" 2>&1; then
    status=0
  else
    status=$?
    failed_runs=$((failed_runs + 1))
  fi
  echo "stress: run $i/$runs exit $status in $((SECONDS - start)) s: $(tail -n 1 "$log")"
done

echo "stress: $failed_runs of $runs runs failed (logs in $logs)"
if [ "$failed_runs" -gt 0 ]; then
  echo "failures per test:"
  cat "$logs"/run_*.log | sed -n 's/^\(FAILED\|ERROR\) \([^ ]*\).*/\2/p' | sort | uniq -c | sort -rn
  exit 1
fi
