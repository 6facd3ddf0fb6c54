"""Sessions on the fast decode path (`splitcli.model.fast`), behind the same `Session` interface.

`fast_split_session(split)` is what `splitllm generate` runs: the split's own halves (their
quantized weights, embedding and KV bits) re-driven by `FastEdgeHalf` / `FastCloudHalf`, or — when
the model is not one the fast path supports — `split.session()` unchanged. `FastUnsplitSession`
is the whole model on the same per-layer code, the reference a fast split is compared against.

A cloud server can run its half the same way: `fast_cloud_half(cloud_half)` returns a drop-in
for `CloudHalf` (same call, `new_cache()` gives a preallocated cache), or None when unsupported.
"""

from __future__ import annotations

import threading
import weakref

from ..model.fast import DEFAULT_CAPACITY, FastCloudHalf, FastEdgeHalf, FastModel, _LayersToHead, fast_unsupported
from ..model.split import decoder_parts
from .session import Session, SplitSession, _context_length

# One fast half per eager half: building one walks every layer and tabulates rotary (~ms), and
# a server or bench starts many sessions over the same halves.
_EDGES: "weakref.WeakKeyDictionary[object, FastEdgeHalf]" = weakref.WeakKeyDictionary()
_CLOUDS: "weakref.WeakKeyDictionary[object, FastCloudHalf]" = weakref.WeakKeyDictionary()
_MODELS: "weakref.WeakKeyDictionary[object, FastModel]" = weakref.WeakKeyDictionary()
# Built once under a lock: a server's threads asking at once would otherwise each fuse the weights
# (same values, the memory twice).
_BUILD = threading.Lock()


def fast_edge_half(edge) -> FastEdgeHalf | None:
    """The fast twin of an eager edge half (same parts, ℓ and KV bits), or None if unsupported."""
    with _BUILD:
        if edge not in _EDGES:
            # an edge of no layers (the cloud-only baseline's embedding) has no fast twin
            if (edge.split_layer < 1 or getattr(edge, "kv_bits", None) not in (16, 8, 4)
                    or fast_unsupported(edge.parts, 0, edge.split_layer) is not None):
                return None
            _EDGES[edge] = FastEdgeHalf(edge.parts, edge.split_layer, edge.kv_bits)
        return _EDGES[edge]


class _FastAllLayers(FastCloudHalf):
    """ℓ = 0: every decoder layer + head over embeddings, the cloud-only baseline `bench serve`
    serves with the same server (a FastCloudHalf otherwise refuses ℓ outside 1..L-1)."""

    def __init__(self, parts):
        self.split_layer = 0
        _LayersToHead.__init__(self, parts, 0)


def fast_cloud_half(cloud) -> FastCloudHalf | None:
    """The fast twin of an eager cloud half (ℓ = 0 included: the cloud-only baseline), or None if
    unsupported."""
    with _BUILD:
        if cloud not in _CLOUDS:
            if fast_unsupported(cloud.parts, cloud.split_layer, cloud.parts.num_layers) is not None:
                return None
            _CLOUDS[cloud] = (FastCloudHalf(cloud.parts, cloud.split_layer) if cloud.split_layer
                              else _FastAllLayers(cloud.parts))
        return _CLOUDS[cloud]


class FastSplitSession(SplitSession):
    """SplitSession over fast halves: edge -> wire -> cloud, each half with a static cache."""

    def _static_caches(self) -> list:
        return [self.edge_cache, self.cloud_cache]


class FastUnsplitSession(Session):
    """The whole model on the fast path (`FastModel`): the unsplit reference of a fast split.
    `capacity`: positions its cache preallocates (grown on demand)."""

    def __init__(self, model, capacity: int = DEFAULT_CAPACITY):
        super().__init__(_context_length(model))
        with _BUILD:
            if model not in _MODELS:
                _MODELS[model] = FastModel(decoder_parts(model))
            self.model = _MODELS[model]
        self.cache = self.model.new_cache(capacity)

    def _static_caches(self) -> list:
        return [self.cache]

    def _run(self, input_ids, positions, mask, logits_to_keep, stats, top=0):
        return self.model(input_ids, positions, mask, self.cache, logits_to_keep, top)


def fast_unsupported_model(model) -> str | None:
    parts = decoder_parts(model)
    return fast_unsupported(parts, 0, parts.num_layers)


def fast_split_session(split, wire=None) -> Session:
    """A fresh session of a `deploy.Split` on the fast path when both halves support it, else
    `split.session(wire)` (the eager path)."""
    edge, cloud = fast_edge_half(split.edge), fast_cloud_half(split.cloud)
    if edge is None or cloud is None:
        return split.session(wire)
    return FastSplitSession.from_halves(edge, cloud, wire=wire or split.wire)

