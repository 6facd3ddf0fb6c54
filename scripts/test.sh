#!/usr/bin/env bash
# Set-up + the whole test suite. Slow end-to-end tests (marker `slow`) run with small limits.
# The quantization tests then run again under every CPU capability torch dispatches to on this
# host (default, avx2, avx512, those the CPU has): int4 kernel layouts differ between them, and the next machine
# may lack AVX-512. Pass pytest arguments to run only those (the capability loop is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export SPLITLLM_SLOW_LIMIT=${SPLITLLM_SLOW_LIMIT:-small}
PY=.venv/bin/python
if [ "$#" -gt 0 ]; then
  exec "$PY" -m pytest -q "$@"
fi
"$PY" -m pytest -q
# test_quant_portable.py already drives every capability itself, in subprocesses.
# test_codec_predictive.py: its golden frames must be the same bytes under every capability;
# test_codec_predictive_step.py: decode steps on the fp16 kernel where it runs, float32 where not.
# test_fused.py: the fast path re-packs int4 codes read back through the kernel (CPU-dependent layout)
quant_tests=$(ls tests/test_quant_*.py tests/test_bench_quant.py tests/test_fused.py tests/test_codec_predictive.py \
  tests/test_codec_predictive_step.py | grep -v test_quant_portable.py)
# torch accepts a capability the CPU lacks (and then dies on an illegal instruction), so the list
# comes from tests/cpu_capabilities.py, which also asks the CPU
offered=$("$PY" tests/cpu_capabilities.py)
if ! grep -qx default <<<"$offered"; then
  echo "[test] the CPU capability probe (tests/cpu_capabilities.py) did not even offer 'default': $offered" >&2
  exit 1
fi
for cap in default avx2 avx512; do
  if ! grep -qx "$cap" <<<"$offered"; then
    echo "[test] ATEN_CPU_CAPABILITY=$cap: not offered by this CPU, skipped"
    continue
  fi
  echo "[test] quantization tests under ATEN_CPU_CAPABILITY=$cap"
  ATEN_CPU_CAPABILITY=$cap "$PY" -m pytest -q -m "not slow" -p no:cacheprovider $quant_tests
done
