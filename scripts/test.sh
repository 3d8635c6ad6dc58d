#!/usr/bin/env bash
# The test command: installs crank with its test dependencies, prepares the Docker engine and
# the test images (scripts/setup.sh) and runs every test. The tests start SeaweedFS and Funnel
# when they are not running and stop what they started (tests/services.py); the Docker engine
# is stopped at the end when it was not running before. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e '.[test]'
engine_was_running=false
docker info >/dev/null 2>&1 && engine_was_running=true
trap '$engine_was_running || python3 tests/services.py stop-docker || true' EXIT
bash scripts/setup.sh
python3 -m pytest -n "${CRANK_TEST_WORKERS:-3}" --dist loadgroup "$@"
