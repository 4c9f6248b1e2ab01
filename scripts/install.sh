#!/usr/bin/env bash
# Install SCAR for development on a fresh Debian/Ubuntu machine (used by the README and CI).
#   - system data: Debian's dataset-fashion-mnist (the offline default dataset), when apt exists
#   - Debian's chromium (headless browser test of the HTML reports), when apt exists and it is missing
#   - Python: a virtual environment in .venv with torch, torchvision and the package (editable, with the dev and ray extras)
# Override the torch pins with TORCH_SPEC / TORCHVISION_SPEC if your platform needs others.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "installing dataset-fashion-mnist with apt-get" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

# The browser test of the HTML reports (tests/experiments/test_html_browser.py) drives Debian's
# chromium headless through Playwright (never Playwright's own browser download).
# BEGIN chromium
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "installing chromium with apt-get" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
# END chromium

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip's exit status survives the filter (pipefail); the filter only hides local-index notices.
pipq() { .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }
pipq "${TORCH_SPEC:-torch==2.14.1}" "${TORCHVISION_SPEC:-torchvision==0.29.1}"
# The ray extra: `scar run --executor ray` and its tests (a binary wheel, ~10 s to install).
pipq -e ".[dev,ray]"
.venv/bin/python -c "import scar, torch, torchvision; print('scar', scar.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__)"
