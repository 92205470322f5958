#!/usr/bin/env bash
# The demo command: sets up the environment (tools/env.sh) and runs the shipped demo workflow in a
# real ComfyUI on the CPU (tools/run_demo.py; extra arguments go to it, e.g. --iterations 10).
set -euo pipefail
cd "$(dirname "$0")/.."
. tools/env.sh
python tools/run_demo.py "$@"
