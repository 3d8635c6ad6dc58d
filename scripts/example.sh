#!/usr/bin/env bash
# Runs the example workflow in examples/hello on the local Docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e '.[test]'
bash scripts/setup.sh
cd examples/hello
exec snakemake --executor crank --jobs 4 --crank-default-image crank-test/busybox:1 "$@"
