#!/usr/bin/env bash
# The main job on CPU: set up the environment if needed, then run the whole
# pipeline (corpus, tokenizer, teacher, cache-teacher, inspect-shard, train on
# 2 gloo ranks, eval, export) into OUT_DIR. A rerun resumes.
#   scripts/quickstart.sh [OUT_DIR] [--size default|ci]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/quickstart}"
shift || true
VPMOE_WITH_VLLM="${VPMOE_WITH_VLLM:-0}" bash scripts/setup_cpu_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${VPMOE_VENV:-.venv}/bin/vpmoe" quickstart "$out" "$@"
