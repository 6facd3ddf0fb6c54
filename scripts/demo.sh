#!/usr/bin/env bash
# Set-up + a real split generation on the embedded default model (SmolLM2-135M).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo
echo "[demo] splitllm generate --split-layer 15 --prompt 'The three primary colors are' --max-new-tokens 24"
.venv/bin/splitllm generate --split-layer 15 --prompt "The three primary colors are" --max-new-tokens 24
