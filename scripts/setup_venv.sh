#!/usr/bin/env bash
# Create .venv on first use and install flatmin with everything the demo, the tests and the
# documentation site (make docs) need (the integrations extra included: Lightning,
# accelerate, transformers).
# torch: keep the user's own if the base Python already has it; otherwise install the
# CPU build 2.13.0 (found on disk through --find-links where present) rather than
# letting pip resolve "torch" to a multi-gigabyte CUDA build.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
WHEELS=${FLATMIN_TORCH_WHEELS:-/opt/wheels}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "setup: using the torch that $PYTHON already has"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if [ -d "$WHEELS" ]; then
    "${PIP[@]}" install --find-links "$WHEELS" "torch==2.13.0"
  else
    "${PIP[@]}" install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4"
  fi
fi
# Pin the torch that is there (2.13.0 matches 2.13.0+cpu), so that nothing installed
# next to it (the frameworks of the integrations extra) can replace it by another build.
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" \
  > "$VENV/torch-constraint.txt"
"${PIP[@]}" install -c "$VENV/torch-constraint.txt" -e ".[all]"
touch "$VENV/.installed"
