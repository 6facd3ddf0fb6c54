"""A session's KV rows by absolute layer index: what a handoff (I_kv = 1) sends and Algorithm 2's
per-step replica copies (`runtime.handoff`, `runtime.adaptive`, the cloud server).

Two kinds of cache hold them. A Hugging Face cache (the eager path) keeps every layer of the
model in one object, indexed by the layer itself: `cache_rows` / `install_rows`. The fast path
keeps a stack of layers in one preallocated cache indexed from 0 (`model.fast.StaticKV`, or the
Qa-bit `QuantStaticKV`), so a session's layers live in several: a `Span` names the absolute index
of a cache's first layer, and `static_rows` / `install_spans` read and write across spans. Only
float caches expose their rows; a Qa-bit cache does not (its codes are not the rows sent).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SplitLLMError
from ..model.fast import StaticKV
from ..quant.static_kv import StaticCache


@dataclass(frozen=True)
class KVRows:
    """One layer's K/V rows for positions [start, start + count): keys [B, heads, rows, d_k]."""

    layer: int
    keys: torch.Tensor
    values: torch.Tensor


@dataclass(frozen=True)
class KVPayload:
    """Decoded KV payload: rows of `layers` covering positions [start, start + count)."""

    start: int
    count: int
    layers: tuple[KVRows, ...]



def cache_rows(cache, layers: range, start: int) -> tuple[int, list[KVRows]]:
    """K/V rows of `layers` for positions [start, length) of a float cache; returns (length, rows).

    A sliding-window layer keeps only its last window - 1 rows, so it may yield fewer than
    length - start rows (all the receiver needs). A cache that does not expose its rows as
    tensors (a Qa-bit `QuantizedKVCache`) is an error.
    """
    out, length = [], None
    for k in layers:
        if k >= len(cache.layers):
            raise SplitLLMError(f"the KV cache has no layer {k}")
        layer = cache.layers[k]
        total = layer.get_seq_length()
        if length is None:
            length = total
        elif total != length:
            raise SplitLLMError(f"KV cache layers disagree on length ({total} vs {length} at layer {k})")
        keys = getattr(layer, "keys", None)
        stored = keys.shape[-2] if isinstance(keys, torch.Tensor) and keys.numel() else 0
        need = total - start
        if need < 0:
            raise SplitLLMError(f"asked for KV rows from position {start}, but the cache holds {total}")
        rows = min(need, stored)
        if rows < need and not getattr(layer, "is_sliding", False):
            raise SplitLLMError(f"layer {k} of this {type(cache).__name__} does not expose its KV rows "
                                "(a Qa-bit cache); KV cannot be sent from it")
        out.append(KVRows(k, keys[:, :, stored - rows:stored], layer.values[:, :, stored - rows:stored]))
    return (length or 0), out


def exposes_rows(cache) -> bool:
    """Whether this cache's rows can be read: transformers' float caches (sliding ones too) by
    `cache_rows`, the fast path's float `StaticKV` by `static_rows`."""
    from transformers import DynamicCache

    return isinstance(cache, DynamicCache) or type(cache) is StaticKV


def install_rows(cache, payload: KVPayload, dtype: torch.dtype) -> None:
    """Append a payload's rows to `cache` (any transformers Cache), checking positions line up."""
    for r in payload.layers:
        if r.layer < len(cache.layers):
            have = cache.layers[r.layer].get_seq_length()
            if have != payload.start:
                raise SplitLLMError(f"KV rows start at position {payload.start}, but layer {r.layer} "
                                    f"of the receiving cache holds {have}")
        elif payload.start != 0:
            raise SplitLLMError(f"KV rows start at position {payload.start}, but layer {r.layer} is empty")
        rows = r.keys.shape[2]
        if rows:
            cache.update(r.keys.to(dtype), r.values.to(dtype), r.layer)
        missing = payload.count - rows
        if missing:
            layer = cache.layers[r.layer]
            # A sliding layer counts every position it saw, not only the rows it keeps.
            if not (getattr(layer, "is_sliding", False) and hasattr(layer, "cumulative_length")):
                raise SplitLLMError(f"layer {r.layer} received {rows} of {payload.count} rows "
                                    "but is not a sliding-window layer")
            layer.cumulative_length += missing


@dataclass(frozen=True)
class Span:
    """Layers [first, first + cache.n_layers) of a session, held by one static cache."""

    first: int
    cache: StaticCache

    @property
    def layers(self) -> range:
        return range(self.first, self.first + self.cache.n_layers)


def static_rows(spans: list[Span], layers: range, start: int) -> tuple[int, list[KVRows]]:
    """K/V rows of `layers` for positions [start, length) of float static caches; returns (length,
    rows) as `cache_rows` does. Every span read must hold the same length."""
    out, length = [], None
    for k in layers:
        span = next((s for s in spans if k in s.layers), None)
        if span is None:
            raise SplitLLMError(f"the KV cache has no layer {k}")
        cache = span.cache
        if type(cache) is not StaticKV:
            raise SplitLLMError(f"layer {k} of this {type(cache).__name__} does not expose its KV rows "
                                "(a Qa-bit cache); KV cannot be sent from it")
        if length is None:
            length = cache.length
        elif cache.length != length:
            raise SplitLLMError(f"KV cache layers disagree on length ({cache.length} vs {length} at layer {k})")
        if start > length:
            raise SplitLLMError(f"asked for KV rows from position {start}, but the cache holds {length}")
        if cache.k is None:  # nothing allocated, nothing held (start == length == 0): as cache_rows, no rows
            continue
        i = k - span.first
        out.append(KVRows(k, cache.k[i, :, :, start:length], cache.v[i, :, :, start:length]))
    return (length or 0), out


@torch.inference_mode()
def install_static_rows(cache: StaticCache, payload: KVPayload, first_layer: int, dtype: torch.dtype) -> None:
    """Write a KV payload's rows (exactly the cache's layers [first_layer, first_layer + n), positions
    [start, start + count)) into a static cache whose length is `start`, through the cache's own
    `write` (a Qa-bit cache quantizes them as a forward would). Full-attention layers only: every
    layer brings all `count` rows."""
    if cache.length != payload.start:
        raise SplitLLMError(f"KV rows start at position {payload.start}, but the receiving cache holds {cache.length}")
    if tuple(r.layer for r in payload.layers) != tuple(range(first_layer, first_layer + cache.n_layers)):
        raise SplitLLMError(f"KV rows must cover exactly the layers {first_layer}..{first_layer + cache.n_layers - 1}")
    for r in payload.layers:
        if r.keys.shape[2] != payload.count or r.values.shape[2] != payload.count:
            raise SplitLLMError(f"layer {r.layer} received {r.keys.shape[2]} of {payload.count} rows "
                                "but is not a sliding-window layer")
    end = payload.start + payload.count
    cache.reserve(end, payload.layers[0].keys.shape[0])
    for r in payload.layers:
        cache.write(r.layer - first_layer, payload.start, r.keys.to(dtype), r.values.to(dtype))
    cache.length = end


def install_spans(spans: list[Span], payload: KVPayload, dtype: torch.dtype) -> None:
    """`install_static_rows` of a payload whose layers cover whole spans (each span all or none)."""
    covered = 0
    for span in spans:
        rows = tuple(r for r in payload.layers if r.layer in span.layers)
        if rows:
            install_static_rows(span.cache, KVPayload(payload.start, payload.count, rows), span.first, dtype)
            covered += len(rows)
    if covered != len(payload.layers):
        raise SplitLLMError("KV rows name layers this session does not hold")
