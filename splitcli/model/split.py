"""The edge and cloud halves of a decoder-only model, driven through the model's own modules.

Edge  = embeddings + decoder layers [0, ℓ)             -> hidden state at ℓ   [B, T, H]
Cloud = decoder layers [ℓ, L) + final norm + LM head   -> logits              [B, T, V]

No modeling code is forked: each half calls the model's own decoder layers, rotary embedding and
mask builders, exactly as the model's forward does. Each half owns its KV cache (a cache object
sized for all L layers, of which it fills only its own). Two details make the split exact:
- masks are built against the first layer of each attention type *inside the half* (`layer_idx`),
  because the cloud's cache is empty for layers < ℓ and the default (layer 0) would read a length
  of 0 after the prefill;
- positions are passed explicitly by the caller, so both halves agree on them under left padding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..errors import SplitLLMError

SUPPORTED_ATTENTION = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class DecoderParts:
    """Handles on the modules of a Hugging Face decoder-only causal LM."""

    config: object
    embed_tokens: torch.nn.Module
    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    rotary_emb: torch.nn.Module
    lm_head: torch.nn.Module
    layer_types: tuple[str, ...]
    rotary_takes_layer_type: bool
    final_logit_softcapping: float | None

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def decoder_parts(model) -> DecoderParts:
    """Find embeddings, layers, norm, rotary and head, or explain what is missing."""
    backbone = getattr(model, "model", None)
    missing = [n for n in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(backbone, n)]
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or missing or lm_head is None:
        name = type(model).__name__
        raise SplitLLMError(
            f"unsupported model class {name}: expected a decoder-only causal LM with "
            f"model.embed_tokens/layers/norm/rotary_emb and an LM head (missing: {', '.join(missing) or 'lm_head'})"
        )
    config = model.config
    n = len(backbone.layers)
    types = getattr(config, "layer_types", None)
    if types is None:
        # Mistral-style configs without layer_types: one window for every layer, or none.
        kind = "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"
        types = [kind] * n
    types = tuple(types[:n])
    unknown = sorted(set(types) - set(SUPPORTED_ATTENTION))
    if unknown:
        raise SplitLLMError(f"unsupported attention type(s) {unknown} in {type(model).__name__}")
    takes_type = "layer_type" in inspect.signature(backbone.rotary_emb.forward).parameters
    return DecoderParts(
        config=config,
        embed_tokens=backbone.embed_tokens,
        layers=backbone.layers,
        norm=backbone.norm,
        rotary_emb=backbone.rotary_emb,
        lm_head=lm_head,
        layer_types=types,
        rotary_takes_layer_type=takes_type,
        final_logit_softcapping=getattr(config, "final_logit_softcapping", None),
    )


def validate_split_layer(split_layer: int, num_layers: int) -> int:
    """ℓ must leave at least one layer on each side: 1 <= ℓ <= L-1."""
    if not isinstance(split_layer, int) or not 1 <= split_layer <= num_layers - 1:
        raise SplitLLMError(
            f"split layer {split_layer} is outside the valid range 1..{num_layers - 1} "
            f"for this {num_layers}-layer model"
        )
    return split_layer


def new_cache(parts: DecoderParts):
    """A KV cache of the model's own kind (sliding-window layers included)."""
    from transformers import DynamicCache

    return DynamicCache(config=parts.config)


class LayerRange:
    """Runs decoder layers [start, end) with the masks and rotary embeddings the model would build."""

    def __init__(self, parts: DecoderParts, start: int, end: int):
        if not 0 <= start < end <= parts.num_layers:
            raise ValueError(f"bad layer range [{start}, {end}) for {parts.num_layers} layers")
        self.parts, self.start, self.end = parts, start, end
        types = parts.layer_types[start:end]
        # Build each mask against the first layer of its type inside this range (see module doc).
        self.mask_layer = {t: start + types.index(t) for t in dict.fromkeys(types)}

    def __call__(self, hidden, position_ids, attention_mask, cache):
        # hidden [B, T, H]; position_ids [B, T]; attention_mask [B, past+T] or None
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        p = self.parts
        masks = {}
        for kind, layer_idx in self.mask_layer.items():
            build = create_causal_mask if kind == "full_attention" else create_sliding_window_causal_mask
            masks[kind] = build(
                config=p.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
                layer_idx=layer_idx,
            )
        if p.rotary_takes_layer_type:
            rope = {kind: p.rotary_emb(hidden, position_ids, kind) for kind in self.mask_layer}
        else:
            shared = p.rotary_emb(hidden, position_ids)
            rope = {kind: shared for kind in self.mask_layer}
        for i in range(self.start, self.end):
            kind = p.layer_types[i]
            hidden = p.layers[i](
                hidden,
                attention_mask=masks[kind],
                position_embeddings=rope[kind],
                position_ids=position_ids,
                cache=cache,
                use_cache=cache is not None,
            )
        return hidden


class EdgeHalf:
    """Embeddings + layers [0, ℓ): token ids in, hidden state at ℓ out."""

    kv_bits = 16  # the bits its KV cache stores keys/values at: the model's float cache (QuantEdgeHalf: fewer)

    def __init__(self, parts: DecoderParts, split_layer: int):
        self.parts = parts
        self.split_layer = validate_split_layer(split_layer, parts.num_layers)
        self.layers = LayerRange(parts, 0, split_layer)

    def new_cache(self):
        return new_cache(self.parts)

    @torch.inference_mode()
    def __call__(self, input_ids, position_ids, attention_mask, cache):
        # input_ids [B, T] -> hidden [B, T, H]
        hidden = self.parts.embed_tokens(input_ids)
        return self.layers(hidden, position_ids, attention_mask, cache)


class CloudHalf:
    """Layers [ℓ, L) + final norm + LM head: hidden state at ℓ in, logits out."""

    def __init__(self, parts: DecoderParts, split_layer: int):
        self.parts = parts
        self.split_layer = validate_split_layer(split_layer, parts.num_layers)
        self.layers = LayerRange(parts, split_layer, parts.num_layers)

    def new_cache(self):
        return new_cache(self.parts)

    @torch.inference_mode()
    def __call__(self, hidden, position_ids, attention_mask, cache, logits_to_keep: int = 0, top: int = 0):
        # hidden [B, T, H] -> logits [B, T', V] with T' = logits_to_keep or T; every logit whatever `top`
        return self.forward(hidden, position_ids, attention_mask, cache, logits_to_keep)

    def forward(self, hidden, position_ids, attention_mask, cache, logits_to_keep: int = 0):
        """`__call__` outside inference mode: differentiable in `hidden` (the codec fit's Fisher)."""
        hidden = self.layers(hidden, position_ids, attention_mask, cache)
        hidden = self.parts.norm(hidden)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.parts.lm_head(hidden)
        cap = self.parts.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
