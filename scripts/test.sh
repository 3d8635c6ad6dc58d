#!/usr/bin/env bash
# The test command: installs crank with its test dependencies, prepares the Docker engine,
# the object store, the TES server and the test images (scripts/setup.sh), runs every test,
# then stops the servers that this run started. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e '.[test]'
CRANK_STARTED=$(mktemp)
export CRANK_STARTED
trap 'bash scripts/stop.sh "$CRANK_STARTED"; rm -f "$CRANK_STARTED"' EXIT
bash scripts/setup.sh
python3 -m pytest "$@"
