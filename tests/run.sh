#!/usr/bin/env bash
# Install the test dependencies and run the test suite (CPU only; multi-rank tests use gloo).
# Usage: bash tests/run.sh [pytest args...]   e.g. bash tests/run.sh -k scion --runslow
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
set +e
python -m pytest -q -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "tests/run.sh: pytest collected no tests (exit 5); refusing to report success" >&2
  exit 1
fi
exit "$status"
