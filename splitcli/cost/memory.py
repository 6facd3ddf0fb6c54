"""Memory and wire-size model of the split: the paper's eqs. (1)-(3), edge and cloud kept apart.

Layer indices are 0-based here: the edge runs decoder layers [0, l), the cloud [l, L). The paper
counts from 1 (its layers 1..l_w are our [0, l_w)). All sizes are bytes unless a name says bits.

How the paper was read (DESIGN.md §1):
- Eq. (1) sums every layer of the model at its OPSC bit width. The edge only stores its own layers,
  so `opsc_weight_bytes` takes the layer range to sum; the planner passes [0, l).
- Eq. (2) adds the edge's KV for w tokens (layers 1..l), the cloud layers' KV for w-1 tokens and
  one hidden state into one number, in bits. The edge only ever holds the first term, so the
  planner uses `edge_kv_bytes`; the literal formula stays available as `b_kv_paper`.
- Eq. (3): see `io_bytes_per_step`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

from splitcli.errors import SplitLLMError

Method = Literal["front", "back"]

KEEP_BITS = 16  # "16 bits" in the paper's tables means: not quantized (kept as loaded)

LayerByteTable = Sequence[Mapping[int, float]]
"""bytes[layer][bits]: measured (or computed) weight bytes of one decoder layer at a bit width."""


#: Most decoder layers a plan may name. No model comes near it (the largest open models have ~130);
#: it keeps a typo such as n_layers: 1e12 from building a per-layer table that never finishes.
MAX_LAYERS = 10_000


def _check_count(name: str, value: int, low: int = 0, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (
        high is not None and value > high
    ):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise SplitLLMError(f"{name} must be an integer {bound}, got {value!r}")


def _check_bits(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        raise SplitLLMError(f"{name} must be a positive number of bits, got {value!r}")


def layer_weight_bits(
    n_layers: int, l_w: int, q_w1: int, q_w2: int | None, method: Method = "front"
) -> tuple[int | None, ...]:
    """OPSC bit width of each of the `n_layers` layers (eq. 1's Q_w1 / Q_w2 assignment).

    front: layers [0, l_w) at q_w1, [l_w, L) at q_w2 (the paper's eq. 1).
    back:  the last l_w layers [L - l_w, L) at q_w1, the rest at q_w2 (the paper's Table 4).
    q_w2 = None marks layers the edge does not keep; their entry is None.
    """
    _check_count("n_layers", n_layers, 1, MAX_LAYERS)
    _check_count("l_w", l_w, 0, n_layers)
    if method == "front":
        return tuple(q_w1 if k < l_w else q_w2 for k in range(n_layers))
    if method == "back":
        return tuple(q_w1 if k >= n_layers - l_w else q_w2 for k in range(n_layers))
    raise SplitLLMError(f"OPSC method must be 'front' or 'back', got {method!r}")


def opsc_weight_bytes(
    layer_bytes: LayerByteTable,
    l_w: int,
    q_w1: int,
    q_w2: int | None,
    method: Method = "front",
    layers: range | None = None,
) -> float:
    """Eq. (1): M(l_w, Q_w) = sum_i B_w(i; Q_w1) + sum_j B_w(j; Q_w2), over `layers` (default all).

    layer_bytes[k][bits] is layer k's weight bytes at `bits`. A layer in `layers` whose bit width
    is None (q_w2 = None: not kept) or missing from its table is an error, so a plan can never be
    costed with an unmeasured configuration.
    """
    n_layers = len(layer_bytes)
    bits = layer_weight_bits(n_layers, l_w, q_w1, q_w2, method)
    span = range(n_layers) if layers is None else layers
    if span.start < 0 or span.stop > n_layers:
        raise SplitLLMError(f"layer range {span.start}..{span.stop} is outside 0..{n_layers}")
    total = 0.0
    for k in span:
        if bits[k] is None:
            raise SplitLLMError(f"layer {k} has no weight bit width (q_w2 is None) but is needed")
        table = layer_bytes[k]
        if bits[k] not in table:
            raise SplitLLMError(
                f"no weight size for layer {k} at {bits[k]} bits (have {sorted(table)})"
            )
        total += float(table[bits[k]])
    return total


def kv_token_bytes(n_kv_heads: int, head_dim: int, qa: float, overhead_bytes: float = 0.0) -> float:
    """Bytes of one token's key + value in one layer: 2 * n_kv_heads * head_dim * qa / 8 (+ overhead).

    `overhead_bytes` is the per-token, per-layer side information of a quantized cache (scales and
    zero points for K and V together); 0 for a float cache.
    """
    _check_count("n_kv_heads", n_kv_heads, 1)
    _check_count("head_dim", head_dim, 1)
    _check_bits("qa", qa)
    if not (math.isfinite(overhead_bytes) and overhead_bytes >= 0):
        raise SplitLLMError(f"KV overhead bytes must be >= 0, got {overhead_bytes!r}")
    return 2.0 * n_kv_heads * head_dim * qa / 8.0 + overhead_bytes


def edge_kv_bytes(
    n_tokens: int,
    l: int,
    n_kv_heads: int,
    head_dim: int,
    qa: float | Sequence[float],
    overhead_bytes: float = 0.0,
) -> float:
    """Edge KV cache for `n_tokens` tokens over layers [0, l): the edge's part of eq. (2), in bytes.

    = n_tokens * sum_{k<l} (2 * n_kv_heads * head_dim * qa_k / 8 + overhead). `qa` is one bit width
    for every edge layer or one per layer (length l).
    """
    _check_count("n_tokens", n_tokens, 0)
    _check_count("l", l, 0)
    per_layer = [qa] * l if isinstance(qa, (int, float)) else list(qa)
    if len(per_layer) != l:
        raise SplitLLMError(f"need one KV bit width per edge layer ({l}), got {len(per_layer)}")
    return n_tokens * sum(kv_token_bytes(n_kv_heads, head_dim, q, overhead_bytes) for q in per_layer)


def b_kv_paper(w: int, l: int, hidden: int, qa_bits: Sequence[float]) -> float:
    """The paper's eq. (2) taken literally, in BITS (for reference and comparison only).

    B_kv = 2 sum_{k=1}^{l} T_w Q_a,k + 2 sum_{k=l+1}^{L} T_{w-1} Q_a,k + H D Q_a,l, with
    T_w = w * H * D (H * D = `hidden`, the model width: the paper has no grouped-query attention).
    `qa_bits` holds Q_a,k for k = 1..L (so L = len(qa_bits)). Requires 1 <= l <= L and w >= 1.
    """
    n_layers = len(qa_bits)
    _check_count("w", w, 1)
    _check_count("l", l, 1, n_layers)
    _check_count("hidden", hidden, 1)
    t_w, t_w_prev = w * hidden, (w - 1) * hidden
    edge = 2 * sum(t_w * q for q in qa_bits[:l])
    cloud = 2 * sum(t_w_prev * q for q in qa_bits[l:])
    return float(edge + cloud + hidden * qa_bits[l - 1])


def b_io_paper(w: int, l: int, i_kv: int, hidden: int, qa_bits: Sequence[float]) -> float:
    """The paper's eq. (3) literally, in BITS: I_kv * B_kv + (1 - I_kv) * T_w * Q_a,l."""
    if i_kv not in (0, 1):
        raise SplitLLMError(f"I_kv must be 0 or 1, got {i_kv!r}")
    if i_kv == 1:
        return b_kv_paper(w, l, hidden, qa_bits)
    _check_count("w", w, 1)
    _check_count("l", l, 1, len(qa_bits))
    return float(w * hidden * qa_bits[l - 1])


def hidden_token_bytes(hidden: int, qa: float) -> float:
    """One token's hidden state at `qa` bits, uncompressed: hidden * qa / 8."""
    _check_count("hidden", hidden, 1)
    _check_bits("qa", qa)
    return hidden * qa / 8.0


def io_bytes_per_step(
    i_kv: int,
    n_tokens: int,
    hidden_bytes_per_token: float,
    cloud_kv_bytes_per_token: float = 0.0,
) -> float:
    """Eq. (3), bytes on the wire (edge -> cloud) for one step that carries `n_tokens` new tokens.

    Reading (the paper's eq. 3 resends whole caches every step; a real runtime sends increments):
    - I_kv = 0: hidden state only, n_tokens * hidden_bytes_per_token. Pass hidden * Qa / 8
      (`hidden_token_bytes`) for a plain tensor or the measured codec bytes/token for TS + TAB-Q.
    - I_kv = 1: the hidden state plus the key/value rows the new tokens add to the cache of the
      cloud layers [l, L), n_tokens * (hidden_bytes_per_token + cloud_kv_bytes_per_token), where
      cloud_kv_bytes_per_token = (L - l) * kv_token_bytes(...). This keeps the paper's ordering
      (sending KV costs more than the hidden state alone, and grows with the cloud's share) at the
      size of one step's increment rather than the whole cache.
    n_tokens is 1 for a decode step and the prompt length for prefill.
    """
    if i_kv not in (0, 1):
        raise SplitLLMError(f"I_kv must be 0 or 1, got {i_kv!r}")
    _check_count("n_tokens", n_tokens, 0)
    for name, value in (
        ("hidden bytes per token", hidden_bytes_per_token),
        ("cloud KV bytes per token", cloud_kv_bytes_per_token),
    ):
        if not (math.isfinite(value) and value >= 0):
            raise SplitLLMError(f"{name} must be a finite number >= 0, got {value!r}")
    return n_tokens * (hidden_bytes_per_token + i_kv * cloud_kv_bytes_per_token)


@dataclass(frozen=True)
class EdgeMemory:
    """What the edge holds at its peak: weights, the KV cache for W_bar tokens, transient buffers."""

    weights_bytes: float
    kv_bytes: float
    activation_bytes: float

    def __post_init__(self) -> None:
        for name in ("weights_bytes", "kv_bytes", "activation_bytes"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise SplitLLMError(f"{name} must be a finite number >= 0, got {value!r}")

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.kv_bytes + self.activation_bytes


def edge_memory(
    layer_bytes: LayerByteTable,
    l: int,
    l_w: int,
    q_w1: int,
    q_w2: int | None,
    kv_bytes_per_token: Sequence[float],
    max_tokens: int,
    activation_peak_bytes: Sequence[float],
    method: Method = "front",
    embedding_bytes: float = 0.0,
) -> EdgeMemory:
    """Edge side of eq. (8c): embedding + eq. (1) over [0, l) + KV of W_bar tokens + peak activation.

    kv_bytes_per_token[k] is layer k's KV bytes per token at the chosen Qa (`kv_token_bytes` or a
    measured value); activation_peak_bytes[k] its transient peak. Layers run one after another and
    free their scratch, so the transient term is the max over edge layers, not the sum.
    """
    _check_count("l", l, 1, len(layer_bytes))
    if len(kv_bytes_per_token) < l or len(activation_peak_bytes) < l:
        raise SplitLLMError("KV and activation tables must cover every edge layer")
    weights = embedding_bytes + opsc_weight_bytes(layer_bytes, l_w, q_w1, q_w2, method, range(l))
    _check_count("max_tokens", max_tokens, 0)
    kv = max_tokens * float(sum(kv_bytes_per_token[:l]))
    activations = float(max(activation_peak_bytes[:l]))
    return EdgeMemory(weights, kv, activations)
