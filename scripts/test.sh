#!/usr/bin/env bash
# The test command: set up the CPU environment if needed, then run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu_env.sh
exec "${VPMOE_VENV:-.venv}/bin/python" -m pytest -q "$@"
