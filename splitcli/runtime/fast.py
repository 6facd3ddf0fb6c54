"""Sessions on the fast decode path (`splitcli.model.fast`), behind the same `Session` interface.

`fast_split_session(split)` is what `splitllm generate` runs: the split's own halves (their
quantized weights, embedding and KV bits) re-driven by `FastEdgeHalf` / `FastCloudHalf`, or — when
the model is not one the fast path supports — `split.session()` unchanged. `FastUnsplitSession`
is the whole model on the same per-layer code, the reference a fast split is compared against.

A cloud server can run its half the same way: `fast_cloud_half(cloud_half)` returns a drop-in
for `CloudHalf` (same call, `new_cache()` gives a preallocated cache), or None when unsupported.
`fast_handoff_session` is the handoff (Fig. 5b) on the same path: `FastLocalEdge` runs the edge's
model of all layers before it, `FastSplitSession` the split after it.
"""

from __future__ import annotations

import threading
import time
import weakref

import torch

from ..errors import SplitLLMError
from ..model.fast import (DEFAULT_CAPACITY, FastCloudHalf, FastEdgeHalf, FastModel, StaticKV, _LayersToHead,
                          fast_unsupported)
from ..model.split import decoder_parts
from .handoff import HandoffMixin
from .kv_rows import KVPayload, KVRows, Span, install_spans, install_static_rows, static_rows
from .session import Session, SplitSession, _context_length
from .wire import Wire

# One fast half per eager half: building one walks every layer and tabulates rotary (~ms), and
# a server or bench starts many sessions over the same halves.
_EDGES: "weakref.WeakKeyDictionary[object, FastEdgeHalf]" = weakref.WeakKeyDictionary()
_CLOUDS: "weakref.WeakKeyDictionary[object, FastCloudHalf]" = weakref.WeakKeyDictionary()
_MODELS: "weakref.WeakKeyDictionary[object, FastModel]" = weakref.WeakKeyDictionary()
# an edge's model of all layers -> its local stacks by ("front" | "back", ℓ) (`_local_stacks`)
_LOCAL: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()
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
    """SplitSession over fast halves: edge -> wire -> cloud, each half with a static cache. KV rows
    the edge sends under I_kv = 1 for its layers [0, ℓ) land in a float cache of their own beside
    the cloud's (`receive_rows`), which only holds them: the cloud half never reads them."""

    _replica: StaticKV | None = None

    def _static_caches(self) -> list:
        return [self.edge_cache, self.cloud_cache]

    def edge_rows(self, layers: range, start: int = 0) -> tuple[int, list[KVRows]]:
        return static_rows([Span(0, self.edge_cache)], layers, start)

    def receive_rows(self, payload: KVPayload) -> None:
        if self._replica is None:
            self._replica = StaticKV(self.cloud.split_layer, self.cloud.layers.n_kv, self.cloud.layers.head_dim,
                                     self.cloud_cache.capacity, self.cloud_dtype())
        spans = [Span(0, self._replica), Span(self.cloud.split_layer, self.cloud_cache)]
        install_spans(spans, payload, self.cloud_dtype())


class FastLocalEdge:
    """An edge's model of all layers on the fast path, before a handoff: two fast stacks with float
    static caches, `front` = layers [0, ℓ) (its output, the hidden state at ℓ, is kept for an
    I_kv = 0 handoff) and `back` = layers [ℓ, L) + head. They are the fast unsplit model's
    per-layer code, so on equal weights a forward computes what `FastUnsplitSession` does, bit for
    bit. Used by `FastHandoffSession` and the networked handoff (`serve.handoff`)."""

    def __init__(self, front: FastEdgeHalf, back: FastCloudHalf):
        if front.split_layer != back.split_layer or front.kv_bits < 16:
            raise SplitLLMError("the edge's local stacks must meet at ℓ, with a float KV cache (its rows are "
                                "what a handoff sends)")
        self.front, self.back = front, back
        self.split_layer = front.split_layer
        self.caches = [front.new_cache(), back.new_cache()]  # layers [0, ℓ), [ℓ, L)
        self.hidden: list[torch.Tensor] = []  # the hidden states at ℓ of every forward [B, T, H]

    @torch.inference_mode()
    def __call__(self, input_ids, position_ids, attention_mask, logits_to_keep: int = 0, top: int = 0):
        hidden = self.front(input_ids, position_ids, attention_mask, self.caches[0])  # [B, T, H]
        self.hidden.append(hidden)  # a fresh tensor: neither stack writes its input or reuses its output
        return self.back(hidden, position_ids, attention_mask, self.caches[1], logits_to_keep, top=top)

    def rows(self, layers: range, start: int = 0) -> tuple[int, list[KVRows]]:
        return static_rows([Span(0, self.caches[0]), Span(self.split_layer, self.caches[1])], layers, start)

    def carry(self, edge: FastEdgeHalf):
        """A new cache of `edge`'s kind (a Qa-bit one quantizes them) holding the rows of layers
        [0, ℓ) so far: the split stage's edge cache."""
        front = self.caches[0]
        cache = edge.new_cache(front.capacity)
        if front.length:
            length, rows = static_rows([Span(0, front)], range(self.split_layer), 0)
            install_static_rows(cache, KVPayload(0, length, tuple(rows)), 0, rows[0].keys.dtype)
        return cache


class FastHandoffSession(HandoffMixin, FastSplitSession):
    """`runtime.handoff.HandoffSession` on the fast path: until the handoff the edge's model of all
    layers runs as a `FastLocalEdge`; after it, a FastSplitSession over `edge` and `cloud`, the local
    rows of layers [0, ℓ) carried into `edge`'s own cache kind."""

    def __init__(self, local: FastLocalEdge, edge: FastEdgeHalf, cloud: FastCloudHalf, wire: Wire | None = None):
        if {local.split_layer, cloud.split_layer} != {edge.split_layer}:
            raise SplitLLMError("the edge's local stacks, the edge half and the cloud half split at different layers")
        if (local.back.parts.num_layers, local.back.parts.config.hidden_size) != (cloud.parts.num_layers,
                                                                                cloud.parts.config.hidden_size):
            raise SplitLLMError("the edge's model and the cloud's model differ in layer count or hidden size")
        Session.__init__(self, _context_length(cloud.parts))
        self._attach(edge, cloud, wire)
        self.local_edge: FastLocalEdge | None = local
        self.local, self.report, self._hidden, self._local_ids = True, None, local.hidden, []

    def _static_caches(self) -> list:
        return [*self.local_edge.caches, self.cloud_cache] if self.local else super()._static_caches()

    def _run(self, input_ids, positions, mask, logits_to_keep, stats, top=0):
        if not self.local:
            return super()._run(input_ids, positions, mask, logits_to_keep, stats, top)
        t0 = time.perf_counter()
        logits = self.local_edge(input_ids, positions, mask, logits_to_keep, top)
        self._local_ids.append(input_ids)
        stats.edge_ms = (time.perf_counter() - t0) * 1e3
        return logits

    def edge_rows(self, layers: range, start: int = 0) -> tuple[int, list[KVRows]]:
        return self.local_edge.rows(layers, start) if self.local else super().edge_rows(layers, start)

    def _enter_split(self) -> None:
        self.edge_cache = self.local_edge.carry(self.edge)
        self.local_edge, self.local, self._hidden, self._local_ids = None, False, [], []


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


def _local_stacks(edge_model, split) -> tuple[FastEdgeHalf | None, FastCloudHalf | None] | None:
    """The fast stacks of an edge's model of all layers (`FastHandoffSession`'s front and back), or
    None where the fast path does not run it. A stack over the very layers one of the split's halves
    holds (an unquantized edge model is the model itself) is that half's fast twin: no second copy
    of fused weights."""
    parts, ell = decoder_parts(edge_model), split.edge.split_layer
    if fast_unsupported(parts, 0, parts.num_layers) is not None:
        return None
    edge_parts, cloud_parts = split.edge.parts, split.cloud.parts
    same_front = getattr(split.edge, "kv_bits", None) == 16 and parts.embed_tokens is edge_parts.embed_tokens \
        and all(parts.layers[i] is edge_parts.layers[i] for i in range(ell))
    same_back = parts.lm_head is cloud_parts.lm_head and parts.norm is cloud_parts.norm \
        and all(parts.layers[i] is cloud_parts.layers[i] for i in range(ell, parts.num_layers))
    with _BUILD:  # built once per edge model and ℓ: a bench hands off many sessions from one model
        built = _LOCAL.setdefault(edge_model, {})
        if not same_front and ("front", ell) not in built:
            built["front", ell] = FastEdgeHalf(parts, ell, 16)
        if not same_back and ("back", ell) not in built:
            built["back", ell] = FastCloudHalf(parts, ell)
    return (fast_edge_half(split.edge) if same_front else built["front", ell],
            fast_cloud_half(split.cloud) if same_back else built["back", ell])


def fast_local_edge(split, edge_model) -> FastLocalEdge | None:
    """A fresh `FastLocalEdge` of `edge_model` (all its layers) split at the split's ℓ, or None
    where the fast path does not run it."""
    stacks = _local_stacks(edge_model, split)
    return None if stacks is None or None in stacks else FastLocalEdge(*stacks)


def fast_handoff_session(split, edge_model, wire=None) -> FastHandoffSession | None:
    """A fresh `FastHandoffSession` of a `deploy.Split` whose edge first runs `edge_model` (all its
    layers), or None where the fast path does not run the model (use the eager HandoffSession)."""
    edge, cloud = fast_edge_half(split.edge), fast_cloud_half(split.cloud)
    local = fast_local_edge(split, edge_model) if edge is not None and cloud is not None else None
    if local is None:
        return None
    return FastHandoffSession(local, edge, cloud, wire=wire or split.wire)


def fast_split_session(split, wire=None) -> Session:
    """A fresh session of a `deploy.Split` on the fast path when both halves support it, else
    `split.session(wire)` (the eager path)."""
    edge, cloud = fast_edge_half(split.edge), fast_cloud_half(split.cloud)
    if edge is None or cloud is None:
        return split.session(wire)
    return FastSplitSession.from_halves(edge, cloud, wire=wire or split.wire)

