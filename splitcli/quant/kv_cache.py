"""Quantized KV cache for the edge at Q_a bits (paper eq. (2)), pluggable into transformers 5.x.

Keys and values [batch, kv_heads, tokens, head_dim] are quantized per token in groups along
head_dim (asymmetric RTN, `splitcli.quant.rtn.quantize_kv`, the fast path's static cache's quantizer
too, so both store the same bits; group = head_dim by default) and only the packed
codes plus scales/zeros are kept. Per-token groups never change once written, so new tokens are
appended without re-quantizing old ones and no full-precision residual window is needed for
correctness (unlike transformers' KIVI-style `QuantizedLayer`, which groups per channel and has to
hold recent tokens in full precision until a group fills). We do not use its quanto/hqq backends.

Reading of "the cache holds Q_a-bit activations": attention always sees the dequantized stored
values, including the tokens of the current step, so a prefill and a token-by-token decode of the
same text see the same keys and values.

Non-finite K/V are not checked per step (that would cost a host sync); a NaN or Inf, or a group
beyond the scale dtype's range, dequantizes to NaN/Inf for its whole group (see `quantize_kv`),
as a float cache would carry it, never to finite garbage.

Memory: what is held between steps is exactly `kv_bytes_per_token` x tokens (see `nbytes`). Each
`update` additionally makes one layer's dequantized K/V (float, freed after that layer's
attention), which belongs to the transient-activation term of the edge memory model.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers.cache_utils import Cache, DynamicLayer

from splitcli.errors import SplitLLMError
from splitcli.quant.kv_format import SCALE_DTYPES, KVQuantConfig
from splitcli.quant.rtn import dequantize_groupwise, pack_codes, quantize_kv, unpack_codes


class _Stored:
    """K and V stacked: packed codes [2, B, H, T, P] uint8 + scales/zeros [2, B, H, T, G].

    Stacking halves the number of small ops per decode step (they dominate at batch 1)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
        self.codes, self.scales, self.zeros = codes, scales, zeros

    def cat(self, other: "_Stored") -> "_Stored":
        return _Stored(*(torch.cat([a, b], dim=-2) for a, b in zip(self.tensors(), other.tensors())))

    def map(self, fn) -> "_Stored":
        return _Stored(*(fn(t) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.codes, self.scales, self.zeros

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class QuantizedKVLayer(DynamicLayer):
    """One layer's K/V stored at `cfg.bits`; `update` returns dequantized K/V for attention."""

    is_croppable = True

    def __init__(self, cfg: KVQuantConfig | None = None):
        super().__init__()
        self.cfg = cfg or KVQuantConfig()
        self._kv: _Stored | None = None
        self._head_dim = 0

    def _quantize(self, kv: torch.Tensor) -> _Stored:
        g = self.cfg.group_for(kv.shape[-1])
        q, s, z = quantize_kv(kv, self.cfg.bits, g, SCALE_DTYPES[self.cfg.scale_dtype])
        return _Stored(q if self.cfg.bits == 8 else pack_codes(q, self.cfg.bits, check_range=False), s, z)

    def _dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        st = self._kv
        # 8-bit codes are stored unpacked: skip the copy unpack_codes would make
        q = st.codes if self.cfg.bits == 8 else unpack_codes(st.codes, self.cfg.bits, self._head_dim)
        # through `out`, as QuantStaticKV does: the same ops, so the same values also with float32
        # scales (where the fused addcmul of the out-less path rounds q * scale differently)
        out = torch.empty(q.shape, dtype=dtype)
        return dequantize_groupwise(q, st.scales, st.zeros, self.cfg.bits, dtype, out=out)  # [2, B, H, T, head_dim]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        kv = torch.stack([key_states, value_states])  # [2, B, H, T_new, head_dim]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)  # sets keys/values to empty (dtype, device)
            self._head_dim = key_states.shape[-1]
            self._kv = self._quantize(kv)
        else:
            self._kv = self._kv.cat(self._quantize(kv))
        out = self._dequantize(key_states.dtype)
        return out[0], out[1]

    def get_seq_length(self) -> int:
        return 0 if self._kv is None else self._kv.codes.shape[-2]

    def nbytes(self) -> int:
        """Bytes actually held for this layer's quantized K and V."""
        return 0 if self._kv is None else self._kv.nbytes()

    def reset(self) -> None:
        super().reset()
        self._kv = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise SplitLLMError("crop takes a negative number of tokens to remove")
        if tokens_to_remove == 0 or self._kv is None:
            return
        keep = self.get_seq_length() + tokens_to_remove
        self._kv = self._kv.map(lambda t: t[..., :keep, :])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._kv is not None:
            self._kv = self._kv.map(lambda t: t[:, indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._kv is not None:
            self._kv = self._kv.map(lambda t: t.repeat_interleave(repeats, dim=1))


class QuantizedKVCache(Cache):
    """Drop-in for DynamicCache (full-attention models): layers appear lazily at the global
    `layer_idx` transformers passes to `update`, so an edge half running layers [0, l) works."""

    def __init__(self, cfg: KVQuantConfig | None = None):
        self.cfg = cfg or KVQuantConfig()
        super().__init__(layer_class_to_replicate=partial(QuantizedKVLayer, self.cfg))

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
