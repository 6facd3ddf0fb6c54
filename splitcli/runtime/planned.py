"""Run the edge half the way a plan says: OPSC weight bits on layers [0, l), a Qa-bit KV cache.

The plan's weight bits are applied to the model's own decoder layers in place (the cloud half
never runs layers [0, l), so it is unaffected); layers at 16 bits stay as loaded.
"""

from __future__ import annotations

import dataclasses

from ..errors import SplitLLMError
from ..model.split import DecoderParts, EdgeHalf, decoder_parts, new_cache
from ..plan.schema import Plan
from ..quant import KEEP_BITS, KVQuantConfig, QuantizedKVCache, quantize_layers_


class PlannedEdge(EdgeHalf):
    """EdgeHalf whose cache holds keys and values at `qa` bits (16: the model's float cache)."""

    def __init__(self, parts: DecoderParts, split_layer: int, qa: int):
        super().__init__(parts, split_layer)
        self.qa = qa

    def new_cache(self):
        if self.qa >= KEEP_BITS:
            return new_cache(self.parts)
        return QuantizedKVCache(KVQuantConfig(bits=self.qa))


def with_split_layer(plan: Plan, split_layer: int | None) -> Plan:
    """The plan at another ℓ (an explicit --split-layer wins over the plan); re-validated."""
    if split_layer is None or split_layer == plan.split_layer:
        return plan
    return dataclasses.replace(plan, split_layer=split_layer)


def planned_edge(model, plan: Plan) -> PlannedEdge:
    """Quantize the plan's edge layers in place and return the edge half to run them."""
    parts = decoder_parts(model)
    if plan.n_layers != parts.num_layers:
        raise SplitLLMError(f"the plan is for a {plan.n_layers}-layer model; this model has {parts.num_layers} layers")
    if plan.qa < KEEP_BITS:
        KVQuantConfig(bits=plan.qa)  # a clear error for an unsupported Qa before any work
    bits = list(plan.edge_weight_bits)
    quantize_layers_(parts.layers, range(len(bits)), bits, plan.group_size)
    return PlannedEdge(parts, plan.split_layer, plan.qa)
