"""The quantized KV cache of the fast decode path (`splitcli.model.fast`): preallocated, written in
place, the same numbers as `kv_cache.QuantizedKVCache`.

Per layer, K and V are stacked and stored as packed codes [2, B, kv_heads, capacity, P] uint8 plus
scales / zeros [2, B, kv_heads, capacity, G] (per-token groups along head_dim, asymmetric RTN of
`splitcli.quant.rtn`, KVQuantConfig's layout). A step quantizes only its new tokens; attention
reads the dequantized [0, length) prefix of one layer at a time, written into one float scratch
[2, B, kv_heads, capacity, D] shared by all layers (the transient term of the edge memory model,
allocated once instead of per layer and step: 30 vs 71 us per layer at 256 tokens, same values).
What the cache itself holds is exactly `kv_bytes_per_token` x capacity (`nbytes`).
"""

from __future__ import annotations

import torch

from splitcli.errors import SplitLLMError
from splitcli.quant.kv_format import SCALE_DTYPES, KVQuantConfig
from splitcli.quant.rtn import pack_codes, packed_width, quantize_groupwise, unpack_codes


class QuantStaticKV:
    """Drop-in for `model.fast.StaticKV` holding K/V at `bits` (8 or 4)."""

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, bits: int, capacity: int = 256,
                 cfg: KVQuantConfig | None = None):
        self.cfg = cfg or KVQuantConfig(bits=bits)
        if self.cfg.bits != bits:
            raise SplitLLMError(f"KV config holds {self.cfg.bits} bits, the cache was asked for {bits}")
        if capacity < 1:
            raise SplitLLMError(f"a KV cache needs capacity >= 1, got {capacity}")
        self.n_layers, self.n_kv, self.head_dim, self.bits = n_layers, n_kv, head_dim, bits
        self.group = self.cfg.group_for(head_dim)
        self.scale_dtype = SCALE_DTYPES[self.cfg.scale_dtype]
        self._capacity = capacity
        self.codes = self.scales = self.zeros = None
        self._scratch = None  # [2, B, kv_heads, capacity, D] float: one layer's dequantized K, V
        self.length = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def _alloc(self, batch: int, capacity: int):
        lead = (self.n_layers, 2, batch, self.n_kv, capacity)
        groups = self.head_dim // self.group
        return (torch.zeros(*lead, packed_width(self.head_dim, self.bits), dtype=torch.uint8),
                torch.zeros(*lead, groups, dtype=self.scale_dtype), torch.zeros(*lead, groups, dtype=self.scale_dtype))

    def reserve(self, total: int, batch: int | None = None) -> None:
        """As `StaticKV.reserve`: allocate at the first forward, double (one copy) when outgrown."""
        if self.codes is None:
            self._capacity = max(self._capacity, total)
            if batch is not None:
                self.codes, self.scales, self.zeros = self._alloc(batch, self._capacity)
                self._scratch = None
            return
        held = self.codes.shape[2]
        if batch is not None and batch != held:
            raise SplitLLMError(f"this KV cache holds {held} rows, the input has {batch}")
        if total <= self._capacity:
            return
        cap = max(total, 2 * self._capacity)
        new = self._alloc(held, cap)
        for old, fresh in zip((self.codes, self.scales, self.zeros), new):
            fresh[:, :, :, :, : self.length] = old[:, :, :, :, : self.length]
        self.codes, self.scales, self.zeros = new
        self._scratch = None
        self._capacity = cap

    def write(self, i: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Quantize k, v [B, kv_heads, T, D] into positions [start, start + T) of layer i; returns
        the dequantized K, V over [0, start + T) (what attention sees, new tokens included)."""
        end = start + k.shape[2]
        q, s, z = quantize_groupwise(torch.stack([k, v]), self.bits, self.group, self.scale_dtype)
        self.codes[i, :, :, :, start:end] = pack_codes(q, self.bits) if self.bits != 8 else q
        self.scales[i, :, :, :, start:end] = s
        self.zeros[i, :, :, :, start:end] = z
        codes = self.codes[i, :, :, :, :end]
        if self.bits != 8:  # 8-bit codes are stored unpacked
            codes = unpack_codes(codes, self.bits, self.head_dim)
        if self._scratch is None or self._scratch.dtype != k.dtype:
            self._scratch = torch.empty(*self.codes.shape[1:5], self.head_dim, dtype=k.dtype)
        kv = self._scratch[:, :, :, :end]  # [2, B, kv_heads, end, D]
        # dequantize_groupwise's arithmetic (w = q * s + (zero - mid * s)) into the scratch
        g = self.head_dim // self.group
        s = self.scales[i, :, :, :, :end].to(k.dtype).unsqueeze(-1)  # [2, B, H, end, G, 1]
        offset = self.zeros[i, :, :, :, :end].to(k.dtype).unsqueeze(-1) - 2 ** (self.bits - 1) * s
        view = kv.unflatten(-1, (g, self.group))  # [2, B, H, end, G, group]
        torch.mul(codes.unflatten(-1, (g, self.group)), s, out=view)
        view.add_(offset)
        return kv[0], kv[1]

    def nbytes(self) -> int:
        """Bytes held (codes + scales + zeros) for the allocated capacity."""
        if self.codes is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))
