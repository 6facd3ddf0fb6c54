"""Stateful inference sessions: the unsplit model, and edge -> wire -> cloud in one process.

A session owns its KV cache(s), the running padding mask [B, S] and the per-row positions, so
left-padded batches, chunked prefill and single-token decode all go through one `forward`.
Positions follow Hugging Face `generate`: position = number of real tokens before this one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import SplitLLMError
from ..model.split import CloudHalf, EdgeHalf, decoder_parts, new_cache
from .kv_rows import KVPayload, KVRows, cache_rows, exposes_rows, install_rows
from .wire import RawWire, Wire, encode_step


@dataclass
class StepStats:
    """What one forward cost. Split-only fields stay 0 for the unsplit model."""

    tokens: int  # new positions processed (rows x T)
    edge_ms: float = 0.0
    encode_ms: float = 0.0
    decode_ms: float = 0.0
    cloud_ms: float = 0.0
    wire_bytes: int = 0
    total_ms: float = 0.0


@dataclass
class _State:
    mask: torch.Tensor | None = None  # [B, S] 1 = real token
    padded: bool = False
    stats: list[StepStats] = field(default_factory=list)


class Session:
    """Base: bookkeeping of masks and positions; subclasses run the model."""

    def __init__(self, context_length: int | None = None):
        self.context_length = context_length
        self._s = _State()

    @property
    def stats(self) -> list[StepStats]:
        return self._s.stats

    @property
    def length(self) -> int:
        return 0 if self._s.mask is None else self._s.mask.shape[1]

    def reserve(self, total_tokens: int) -> None:
        """Size the session's preallocated caches for `total_tokens` positions before the first
        forward (sessions with growing caches have none). Never past the model's context: a longer
        generation is stopped by `forward`'s one-line context error, not by a huge allocation."""
        n = min(total_tokens, self.context_length or total_tokens)
        for cache in self._static_caches():
            cache.reserve(n)

    def _static_caches(self) -> list:
        return []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, logits_to_keep: int = 1,
                top: int = 0):
        """Feed new tokens [B, T] (mask [B, T] for the new tokens; 0 = left padding). Returns logits [B, T', V].
        `top` > 0: the caller reads only the `top` largest logits of a one-row step (greedy: 1), so
        a fast-path head may return -inf for rows it proved cannot be among them
        (`quant.screen`); the `top` largest come back exactly as a float32 head computes them."""
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise SplitLLMError("forward needs a non-empty [batch, tokens] tensor of token ids")
        b, t = input_ids.shape
        new_mask = torch.ones(b, t, dtype=torch.long) if attention_mask is None else attention_mask.to(torch.long)
        if self.context_length is not None and self.length + t > self.context_length:
            raise SplitLLMError(
                f"sequence of {self.length + t} tokens exceeds the model's context of {self.context_length}"
            )
        prev = self._s.mask
        if prev is not None and prev.shape[0] != b:
            raise SplitLLMError(f"batch size changed from {prev.shape[0]} to {b} within a session")
        full = new_mask if prev is None else torch.cat([prev, new_mask], dim=1)  # [B, S]
        # Positions: count of real tokens before each one (padding gets 1, as in HF generate).
        positions = (full.cumsum(-1) - 1)[:, -t:].clamp_min(0)
        positions = positions.masked_fill(new_mask == 0, 1)
        self._s.mask = full
        self._s.padded = self._s.padded or bool((new_mask == 0).any())
        mask_arg = full if self._s.padded else None  # all-ones masks let SDPA take its causal fast path
        stats = StepStats(tokens=b * t)
        t0 = time.perf_counter()
        logits = self._run(input_ids, positions, mask_arg, logits_to_keep, stats, top)
        stats.total_ms = (time.perf_counter() - t0) * 1e3
        self._s.stats.append(stats)
        return logits

    def prefill(self, input_ids, attention_mask=None, chunk_size: int | None = None, logits_to_keep: int = 1,
                top: int = 0):
        """Feed a prompt, optionally in chunks of `chunk_size` tokens; returns the last chunk's logits
        (`top` as in `forward`)."""
        t = input_ids.shape[1]
        if not chunk_size or chunk_size >= t:
            return self.forward(input_ids, attention_mask, logits_to_keep, top)
        logits = None
        for s in range(0, t, chunk_size):
            m = None if attention_mask is None else attention_mask[:, s : s + chunk_size]
            logits = self.forward(input_ids[:, s : s + chunk_size], m, logits_to_keep, top)
        return logits

    def _run(self, input_ids, positions, mask, logits_to_keep, stats, top=0):  # pragma: no cover - abstract
        raise NotImplementedError


def _context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


class UnsplitSession(Session):
    """The whole model in one piece, through its own forward (the reference)."""

    def __init__(self, model):
        super().__init__(_context_length(model))
        self.model = model
        self.cache = new_cache(decoder_parts(model))

    @torch.inference_mode()
    def _run(self, input_ids, positions, mask, logits_to_keep, stats, top=0):  # computes every logit
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        return out.logits


class SplitSession(Session):
    """Edge half -> wire (encode, bytes, decode) -> cloud half, each with its own cache."""

    def __init__(self, model, split_layer: int, wire: Wire | None = None, edge: EdgeHalf | None = None):
        super().__init__(_context_length(model))
        parts = decoder_parts(model)
        self._attach(edge or EdgeHalf(parts, split_layer), CloudHalf(parts, split_layer), wire)

    @classmethod
    def from_halves(cls, edge: EdgeHalf, cloud: CloudHalf, wire: Wire | None = None) -> "SplitSession":
        """A session over halves built separately (e.g. loaded from edge/cloud shards)."""
        if edge.split_layer != cloud.split_layer:
            raise SplitLLMError(f"edge half ends at ℓ={edge.split_layer} but the cloud half starts at {cloud.split_layer}")
        self = cls.__new__(cls)
        Session.__init__(self, getattr(cloud.parts.config, "max_position_embeddings", None))
        self._attach(edge, cloud, wire)
        return self

    def _attach(self, edge: EdgeHalf, cloud: CloudHalf, wire: Wire | None) -> None:
        self.edge, self.cloud = edge, cloud
        self.wire = wire or RawWire("fp32")
        self._prev_id: int | None = None     # last token sent (predictive wires only)
        self.edge_cache = self.edge.new_cache()
        self.cloud_cache = self.cloud.new_cache()

    def _run(self, input_ids, positions, mask, logits_to_keep, stats, top=0):
        clock = time.perf_counter
        t0 = clock()
        hidden = self.edge(input_ids, positions, mask, self.edge_cache)  # [B, T, H]
        t1 = clock()
        b, t, h = hidden.shape
        # token-predictive frames (format 4) code against the rows' ids and the token before them; with
        # b > 1 rows after the first take the previous row's last token (a rate cost, not an error)
        frame, self._prev_id = encode_step(self.wire, hidden.reshape(b * t, h), input_ids, self._prev_id)
        t2 = clock()
        received = self.wire.decode(frame).reshape(b, t, h).to(hidden.dtype)
        t3 = clock()
        logits = self.cloud(received, positions, mask, self.cloud_cache, logits_to_keep, top=top)
        t4 = clock()
        stats.edge_ms, stats.encode_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        stats.decode_ms, stats.cloud_ms = (t3 - t2) * 1e3, (t4 - t3) * 1e3
        stats.wire_bytes = len(frame)
        return logits

    # KV rows by absolute layer index, for I_kv = 1 (a handoff, Algorithm 2's per-step replica)

    def edge_rows(self, layers: range, start: int = 0) -> tuple[int, list[KVRows]]:
        """(length, K/V rows of the edge's `layers` for positions [start, length))."""
        return cache_rows(self.edge_cache, layers, start)

    def receive_rows(self, payload: KVPayload) -> None:
        """Install KV rows that crossed the wire into the cloud's cache: layers [0, ℓ) as its copy of
        the edge's (the cloud then holds the whole session), [ℓ, L) as its own."""
        install_rows(self.cloud_cache, payload, self.cloud_dtype())

    def edge_exposes_rows(self) -> bool:
        """Whether the edge's cache kind exposes rows to send (a Qa-bit cache does not)."""
        return exposes_rows(self.edge.new_cache())

    def cloud_dtype(self) -> torch.dtype:
        """The dtype the cloud half computes and caches in."""
        return next(self.cloud.parts.layers[self.cloud.split_layer].parameters()).dtype
