#!/usr/bin/env bash
# The test command: installs crank with its test dependencies, prepares the Docker engine
# and the test images (scripts/setup.sh), then runs every test. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e '.[test]'
bash scripts/setup.sh
exec python3 -m pytest "$@"
