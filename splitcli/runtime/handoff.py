"""Edge-local generation and the handoff to the cloud half (paper §2.2.1, eqs. (2)-(3); Fig. 5).

The edge holds a model of ALL layers (OPSC-quantized or not: `edge_model`). It prefills the prompt
and generates the first w tokens by itself, unsplit, with its own cache. Then it hands the session
to the cloud half over the wire and generation continues as a split session (edge runs [0, ℓ),
frames over the wire, cloud runs [ℓ, L)):

- I_kv = 1: the edge sends the KV cache of layers [ℓ, L) for every position it has processed
  (eq. 3's B_kv: eq. 2's cloud term); the cloud installs it into its own cache.
- I_kv = 0: the edge sends only the hidden states at ℓ of those positions (eq. 3's T_w Q_a,ℓ, coded
  by the session's wire); the cloud re-processes them through [ℓ, L) to build its cache.

Reading of the token count: the handoff happens after the edge sampled w tokens from its own
logits and before it feeds token w, which is then the first split step: its hidden state at ℓ
is eq. 2's last term (H D Q_a,ℓ, "the transient hidden state of token w"), and the cloud holds KV
for the positions before it. The edge's cache for [0, ℓ) carries over into the split stage (into
the edge half's own cache kind, e.g. a Qa-bit cache); its layers [ℓ, L) are dropped.

The KV payload is this module's own self-describing format (`encode_kv` / `decode_kv`), little-endian:

    magic "SKVC" | version u8 | dtype u8 | n_layers u16 | batch u32 | heads u32 | d_k u32 | d_v u32
    | start u32 | count u32                      positions [start, start + count) are covered
    | per layer: layer u16 | rows u32            rows <= count (fewer only for a sliding-window
                                                 layer, which keeps its last window - 1 rows)
    | per layer: keys [batch, heads, rows, d_k] then values [batch, heads, rows, d_v], dtype
    | crc32 u32 over everything above

Every size is checked against the receiver's `KVLayout` and the payload's length before anything
is allocated.
"""

from __future__ import annotations

import struct
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SplitLLMError
from ..model.split import DecoderParts, EdgeHalf, decoder_parts, new_cache
from .generate import SamplingConfig, TokenStream
from .kv_rows import KVPayload, KVRows, cache_rows, install_rows
from .link import transfer
from .session import SplitSession
from .wire import Wire, encode_step

_MAGIC = b"SKVC"
_VERSION = 1
_HEADER = struct.Struct("<4sBBHIIIIII")
_ENTRY = struct.Struct("<HI")
_CRC = struct.Struct("<I")
_DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
_BITS = {torch.float32: np.dtype("<u4"), torch.float16: np.dtype("<u2"), torch.bfloat16: np.dtype("<u2")}
_BITS_TORCH = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
MAX_KV_ELEMENTS = 1 << 28  # 1 GiB of fp32: refuse anything larger before allocating


@dataclass(frozen=True)
class KVLayout:
    """What the receiver accepts: which layers, and the shape of every layer's rows."""

    layers: range
    batch: int
    heads: int
    d_k: int
    d_v: int
    max_tokens: int

    def __post_init__(self) -> None:
        for name in ("batch", "heads", "d_k", "d_v", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SplitLLMError(f"KV layout {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.layers, range) or self.layers.step != 1 or self.layers.start < 0:
            raise SplitLLMError(f"KV layout layers must be a range of layer indices, got {self.layers!r}")


def kv_layout(parts: DecoderParts, layers: range, batch: int, max_tokens: int | None = None) -> KVLayout:
    """The layout a model's cache holds (GQA heads, head_dim) for `layers` and `batch` rows."""
    cfg = parts.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    limit = max_tokens or getattr(cfg, "max_position_embeddings", None) or (1 << 20)
    return KVLayout(layers, batch, heads, head_dim, head_dim, limit)


def encode_kv(rows: list[KVRows], start: int, count: int, dtype: torch.dtype | None = None) -> bytes:
    """Serialize K/V rows of several layers (see module docstring); `dtype` None keeps the cache's."""
    if not rows:
        raise SplitLLMError("a KV payload needs at least one layer")
    first = rows[0].keys
    dtype = first.dtype if dtype is None else dtype
    if dtype not in _CODES:
        raise SplitLLMError(f"KV payload dtype must be float32, float16 or bfloat16, got {dtype}")
    b, heads, _, d_k = first.shape
    d_v = rows[0].values.shape[-1]
    entries, blobs, previous = [], [], -1
    for r in rows:
        n = r.keys.shape[2]
        if tuple(r.keys.shape) != (b, heads, n, d_k) or tuple(r.values.shape) != (b, heads, n, d_v):
            raise SplitLLMError(f"layer {r.layer} has KV of shape {tuple(r.keys.shape)}/{tuple(r.values.shape)}, "
                                f"unlike layer {rows[0].layer}'s; one payload needs one shape")
        if r.layer <= previous or not 0 <= r.layer <= 0xFFFF or n > count:
            raise SplitLLMError(f"KV payload layers must ascend and hold <= {count} rows (layer {r.layer})")
        previous = r.layer
        entries.append(_ENTRY.pack(r.layer, n))
        for t in (r.keys, r.values):
            blobs.append(t.detach().to("cpu", dtype).contiguous().view(_BITS_TORCH[dtype]).numpy().tobytes())
    header = _HEADER.pack(_MAGIC, _VERSION, _CODES[dtype], len(rows), b, heads, d_k, d_v, start, count)
    body = b"".join([header, *entries, *blobs])
    return body + _CRC.pack(zlib.crc32(body))


def kv_payload_bytes(layout: KVLayout, rows: int, itemsize: int = 4) -> int:
    """Size of a payload with `rows` rows in every layer of `layout` (for predicting wire bytes)."""
    n = len(layout.layers)
    data = n * layout.batch * layout.heads * rows * (layout.d_k + layout.d_v) * itemsize
    return _HEADER.size + n * _ENTRY.size + data + _CRC.size


def kv_rows_bytes(rows: list[KVRows], itemsize: int) -> int:
    """Size of the payload `encode_kv` makes of `rows` at `itemsize` bytes per element."""
    data = sum(r.keys.numel() + r.values.numel() for r in rows) * itemsize
    return _HEADER.size + len(rows) * _ENTRY.size + data + _CRC.size


def decode_kv(payload: bytes, layout: KVLayout) -> KVPayload:
    """Parse and validate a KV payload against the receiver's layout; SplitLLMError on any mismatch."""
    buf = memoryview(payload)
    if len(buf) < _HEADER.size + _CRC.size:
        raise SplitLLMError(f"KV payload of {len(buf)} bytes is shorter than its header")
    magic, version, code, n_layers, b, heads, d_k, d_v, start, count = _HEADER.unpack_from(buf)
    if magic != _MAGIC or version != _VERSION or code not in _DTYPES:
        raise SplitLLMError("not a KV payload of this version (bad magic, version or dtype)")
    if (b, heads, d_k, d_v) != (layout.batch, layout.heads, layout.d_k, layout.d_v):
        raise SplitLLMError(f"KV payload rows are [{b}, {heads}, ·, {d_k}/{d_v}] but this cache holds "
                            f"[{layout.batch}, {layout.heads}, ·, {layout.d_k}/{layout.d_v}]")
    if not 1 <= n_layers <= len(layout.layers):
        raise SplitLLMError(f"KV payload has {n_layers} layers; this side takes 1..{len(layout.layers)}")
    if start + count > layout.max_tokens:
        raise SplitLLMError(f"KV payload covers positions up to {start + count}, beyond {layout.max_tokens}")
    table_end = _HEADER.size + n_layers * _ENTRY.size
    if len(buf) < table_end + _CRC.size:
        raise SplitLLMError("KV payload is truncated inside its layer table")
    entries, previous = [], -1
    for i in range(n_layers):
        layer, rows = _ENTRY.unpack_from(buf, _HEADER.size + i * _ENTRY.size)
        if layer <= previous or layer not in layout.layers or rows > count:
            raise SplitLLMError(f"KV payload layer {layer} ({rows} rows) is out of order, outside "
                                f"{layout.layers.start}..{layout.layers.stop - 1} or over {count} rows")
        entries.append((layer, rows))
        previous = layer
    dtype = _DTYPES[code]
    item = _BITS[dtype].itemsize
    elements = [(b * heads * rows * d_k, b * heads * rows * d_v) for _, rows in entries]
    total = sum(k + v for k, v in elements)
    if total > MAX_KV_ELEMENTS or len(buf) != table_end + total * item + _CRC.size:
        raise SplitLLMError(f"KV payload length {len(buf)} does not match its header "
                            f"({table_end + total * item + _CRC.size} expected)")
    end = len(buf) - _CRC.size
    if zlib.crc32(buf[:end]) != _CRC.unpack_from(buf, end)[0]:
        raise SplitLLMError("KV payload checksum mismatch: the bytes were corrupted")
    out, offset = [], table_end
    for (layer, rows), (n_k, n_v) in zip(entries, elements):
        tensors = []
        for n, d in ((n_k, d_k), (n_v, d_v)):
            bits = np.frombuffer(buf, dtype=_BITS[dtype], count=n, offset=offset).copy()
            tensors.append(torch.from_numpy(bits).view(dtype).reshape(b, heads, rows, d))
            offset += n * item
        out.append(KVRows(layer, *tensors))
    return KVPayload(start, count, tuple(out))


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # mask [B, S] -> positions [B, S], as Session.forward numbers them (padding gets 1)
    return (mask.cumsum(-1) - 1).clamp_min(0).masked_fill(mask == 0, 1)


@dataclass(frozen=True)
class HandoffReport:
    """What the handoff sent: I_kv, positions covered, bytes of KV and of hidden states, times."""

    i_kv: int
    positions: int
    layers: tuple[int, int]  # [first, stop) of the KV layers sent (empty when I_kv = 0)
    kv_bytes: int
    hidden_bytes: int
    edge_ms: float
    cloud_ms: float

    @property
    def total_bytes(self) -> int:
        return self.kv_bytes + self.hidden_bytes


class HandoffMixin:
    """The handoff itself (module docstring) for a split session whose edge first runs every layer
    (`local` until `handoff`). A session class supplies the local stage: its `_run` while `local`
    (appending each forward's hidden state at ℓ to `_hidden`), `edge_rows` over all L layers while
    `local`, and `_enter_split`, which carries the edge's layers [0, ℓ) into the split stage."""

    local: bool
    report: HandoffReport | None
    _hidden: list[torch.Tensor]  # hidden states at ℓ of every local forward [B, T, H]
    _local_ids: list[torch.Tensor]  # the token ids of every local forward [B, T]

    @property
    def split_layer(self) -> int:
        return self.edge.split_layer

    def handoff(self, i_kv: int, *, edge_layers: bool = False, kv_dtype: torch.dtype | None = None) -> HandoffReport:
        """Hand the session to the cloud (I_kv 1: KV of [ℓ, L); 0: hidden states at ℓ).

        `edge_layers` (I_kv = 1 only) also sends layers [0, ℓ), eq. 2's first term: the cloud then
        holds the whole session's KV. `kv_dtype` None sends the cache's own dtype (exact).
        """
        if not self.local:
            raise SplitLLMError("this session was already handed off to the cloud")
        if i_kv not in (0, 1):
            raise SplitLLMError(f"I_kv must be 0 or 1, got {i_kv!r}")
        if edge_layers and i_kv == 0:
            raise SplitLLMError("edge_layers needs I_kv = 1 (with I_kv = 0 no KV is sent)")
        n = self.cloud.parts.num_layers
        ell = self.split_layer
        count = self.length
        # a token-predictive wire codes the history against its ids, and the split stage's first step
        # against the last token fed so far (either I_kv); other wires ignore both (`encode_step`)
        ids = torch.cat(self._local_ids, dim=1) if self._local_ids else None  # [B, S]
        kv_bytes = hidden_bytes = 0
        t0 = time.perf_counter()
        sent_layers = (0 if edge_layers else ell, n) if i_kv else (ell, ell)
        if count and i_kv == 1:
            _, rows = self.edge_rows(range(*sent_layers), 0)
            payload = transfer(self.wire, encode_kv(rows, 0, count, kv_dtype))
            kv_bytes = len(payload)
            t1 = time.perf_counter()
            batch = self._s.mask.shape[0]
            self.receive_rows(decode_kv(payload, kv_layout(self.cloud.parts, range(*sent_layers), batch)))
        elif count:
            hidden = torch.cat(self._hidden, dim=1)  # [B, S, H]
            b, s, h = hidden.shape
            frame, _ = encode_step(self.wire, hidden.reshape(b * s, h), ids, None)
            hidden_bytes = len(frame)
            t1 = time.perf_counter()
            received = self.wire.decode(frame).reshape(b, s, h).to(hidden.dtype)
            mask = self._s.mask if self._s.padded else None
            self.cloud(received, _positions(self._s.mask), mask, self.cloud_cache, logits_to_keep=1)
        else:
            t1 = t0
        t2 = time.perf_counter()
        self._enter_split()
        self._prev_id = int(ids.reshape(-1)[-1]) if ids is not None and ids.numel() else None
        self.report = HandoffReport(i_kv, count, sent_layers, kv_bytes, hidden_bytes,
                                    (t1 - t0) * 1e3, (t2 - t1) * 1e3)
        return self.report


class HandoffSession(HandoffMixin, SplitSession):
    """A split session whose edge first runs every layer itself, until `handoff` (module docstring),
    on the eager path (`runtime.fast.FastHandoffSession` is the fast one).

    `model` is the cloud's model; `edge_model` (default: the same) the edge's model of all layers.
    `edge` is the split-stage edge half (default: layers [0, ℓ) of `edge_model`).
    """

    def __init__(self, model, split_layer: int, wire: Wire | None = None, edge: EdgeHalf | None = None,
                 *, edge_model=None):
        self.edge_model = model if edge_model is None else edge_model
        edge_parts, cloud_parts = decoder_parts(self.edge_model), decoder_parts(model)
        if (edge_parts.num_layers, edge_parts.config.hidden_size) != (cloud_parts.num_layers,
                                                                      cloud_parts.config.hidden_size):
            raise SplitLLMError("the edge's model and the cloud's model differ in layer count or hidden size")
        if edge is not None and edge.split_layer != split_layer:
            raise SplitLLMError(f"the edge half ends at ℓ={edge.split_layer} but the session splits at {split_layer}")
        super().__init__(model, split_layer, wire, edge or EdgeHalf(edge_parts, split_layer))
        self.edge_cache = new_cache(edge_parts)  # the edge's own cache over all L layers until the handoff
        self.local = True
        self.report = None
        self._hidden, self._local_ids = [], []

    @torch.inference_mode()
    def _run(self, input_ids, positions, mask, logits_to_keep, stats, top=0):
        if not self.local:
            return super()._run(input_ids, positions, mask, logits_to_keep, stats, top)
        t0 = time.perf_counter()
        out = self.edge_model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                              cache=self.edge_cache, use_cache=True, logits_to_keep=logits_to_keep,
                              output_hidden_states=True)
        # hidden_states[ℓ] is the input of layer ℓ: exactly what the edge half would send
        self._hidden.append(out.hidden_states[self.split_layer].detach())
        self._local_ids.append(input_ids)
        stats.edge_ms = (time.perf_counter() - t0) * 1e3
        return out.logits

    def _enter_split(self) -> None:
        """Carry the edge's layers [0, ℓ) into the edge half's own cache kind; drop the rest."""
        local, self.edge_cache = self.edge_cache, self.edge.new_cache()
        if self.length:
            length, rows = cache_rows(local, range(self.split_layer), 0)
            dtype = rows[0].keys.dtype
            install_rows(self.edge_cache, _as_payload(rows, length), dtype)
        self.local = False
        self._hidden, self._local_ids = [], []


def _as_payload(rows: list[KVRows], length: int) -> KVPayload:
    return KVPayload(0, length, tuple(rows))


@dataclass
class HandoffResult:
    tokens: torch.Tensor  # [B, n] generated ids (rows that stopped early are padded with eos)
    local_tokens: int     # how many of them the edge sampled from its own logits
    report: HandoffReport | None  # None when generation ended before the handoff
    stopped_on_eos: bool = False


def handoff_generate(
    session: HandoffMixin,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cfg: SamplingConfig,
    *,
    local_tokens: int,
    i_kv: int,
    eos_token_ids: set[int] | None = None,
    kv_dtype: torch.dtype | None = None,
) -> HandoffResult:
    """Generate with the first `local_tokens` tokens sampled on the edge, then hand off and go on split.

    local_tokens = 0 hands off before the prompt, i.e. a plain split session from the start.
    """
    if isinstance(local_tokens, bool) or not isinstance(local_tokens, int) or local_tokens < 0:
        raise SplitLLMError(f"local tokens w must be an integer >= 0, got {local_tokens!r}")
    if not session.local or session.length:
        raise SplitLLMError("handoff_generate needs a fresh HandoffSession")
    stream = TokenStream(cfg, input_ids.shape[0], eos_token_ids)
    if local_tokens == 0:
        session.handoff(i_kv, kv_dtype=kv_dtype)
    logits = session.prefill(input_ids, attention_mask)[:, -1]
    while True:
        nxt = stream.sample(logits)
        if stream.finished:
            break
        if session.local and len(stream.out) == local_tokens:
            session.handoff(i_kv, kv_dtype=kv_dtype)
        logits = session.forward(nxt[:, None])[:, -1]
    return HandoffResult(stream.tokens(), min(local_tokens, len(stream.out)), session.report, stream.all_eos)
