"""The deployment layer: everything between the pure parts and the commands.

- `split`: a plan (or defaults) + explicit flags -> `SplitSpec` -> a ready `Split` (edge half with
  the plan's OPSC weights, embedding and KV bits; full-precision cloud half; the wire), from a
  loaded model or from shard directories. `generate`, `eval`, the benches and the servers take
  their split from here.
- `calibrate`: the codec calibrated on a model's hidden states at ℓ (cached on disk).
- `measure`: the profile `splitllm profile` writes (per-layer timings and exact sizes).
- `proxy`: the planner's default accuracy source, a perplexity proxy run on the model.

Imports go down only: deploy may use runtime, model, quant, codec, plan, cost; never eval, bench,
serve or cli (tests/test_layers.py checks).
"""

from splitcli.deploy.split import (
    PlannedEdge, Split, SplitSpec, build_shard_split, build_split, build_wire, handoff_session, opsc_edge_model,
    pin_predictive_codec, planned_edge,
)

__all__ = ["PlannedEdge", "Split", "SplitSpec", "build_shard_split", "build_split", "build_wire", "handoff_session",
           "opsc_edge_model", "pin_predictive_codec", "planned_edge"]
