#!/usr/bin/env bash
# Set-up + the whole test suite. Slow end-to-end tests (marker `slow`) run with small limits.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export SPLITLLM_SLOW_LIMIT=${SPLITLLM_SLOW_LIMIT:-small}
exec .venv/bin/python -m pytest -q "$@"
