#!/usr/bin/env bash
# Set-up + a real split generation on the embedded default model (SmolLM2-135M).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo
echo "[demo] splitllm generate --split-layer 15 --prompt 'The three primary colors are' --max-new-tokens 24"
.venv/bin/splitllm generate --split-layer 15 --prompt "The three primary colors are" --max-new-tokens 24
# The same split with the hidden state compressed (threshold + TAB-Q + rANS). Its one-time
# calibration reads WikiText-2 from $SPLITLLM_DATA or ../shared/data.
if [ -n "${SPLITLLM_DATA:-}" ] || [ -d ../shared/data ]; then
  echo
  echo "[demo] the same with --codec tabq (compressed hidden states on the wire)"
  .venv/bin/splitllm generate --split-layer 15 --codec tabq --prompt "The three primary colors are" --max-new-tokens 24
fi
