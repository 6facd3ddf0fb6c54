#!/usr/bin/env bash
# Re-run every evaluation behind docs/results.md (zero-shot at --limit $LIMIT, perplexity on $WINDOWS windows).
# Results are cached per example, so an interrupted run resumes; JSON files land in $OUT.
# Usage: SPLITLLM_DATA=/path/to/data LIMIT=200 OUT=results ./scripts/results.sh [table2|table5|planner|all]
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT="${LIMIT:-200}"
WINDOWS="${WINDOWS:-4}"
OUT="${OUT:-results}"
WHICH="${1:-all}"
ZS="lambada,hellaswag,piqa,arc_easy,boolq,winogrande"
SPLITLLM="${SPLITLLM:-.venv/bin/splitllm}"
mkdir -p "$OUT"

run() {  # run NAME ARGS...: zero-shot tasks then perplexity, one JSON each
  local name="$1"; shift
  "$SPLITLLM" eval --tasks "$ZS" --limit "$LIMIT" "$@" --json "$OUT/$name.zs.json" --force
  "$SPLITLLM" eval --tasks wikitext2 --limit "$WINDOWS" "$@" --json "$OUT/$name.ppl.json" --force
}

if [[ "$WHICH" == table2 || "$WHICH" == all ]]; then
  run fp --pipeline fp
  run atom-w4a4 --pipeline atom-w4a4
  for l in 5 10 15 20 25; do run "split-l$l" --pipeline split --split-layer "$l"; done
fi
if [[ "$WHICH" == table5 || "$WHICH" == all ]]; then
  for q in 6 4; do
    run "ablate-tabq-q$q" --pipeline split --split-layer 15 --q-w1 16 --max-bits "$q" --tau inf
    run "ablate-ts-tabq-q$q" --pipeline split --split-layer 15 --q-w1 16 --max-bits "$q"
  done
fi
if [[ "$WHICH" == planner || "$WHICH" == all ]]; then
  # 8-bit edge weights at the deepest Table 2 split: the planner's alternative to 4-bit (README, Planning)
  run split-l25-w8 --pipeline split --split-layer 25 --q-w1 8
fi
