#!/usr/bin/env bash
# The test command (README, .ci/run): the whole suite, DeiT-sized tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider "$@"
