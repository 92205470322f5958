#!/usr/bin/env bash
# The test command: sets up the environment (tools/env.sh) and runs the whole suite, including the
# in-process ComfyUI tests.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/env.sh
python -m pytest -q -p no:cacheprovider "$@"
