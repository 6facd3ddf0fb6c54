"""The preallocated KV caches of the fast decode path (`splitcli.model.fast`): `StaticCache`, what
every one shares (allocate at the first forward, refuse a batch change, grow by doubling with one
prefix copy), and `QuantStaticKV`, the quantized one, with the same numbers as
`kv_cache.QuantizedKVCache`. The float one, `model.fast.StaticKV`, is a StaticCache too.

Per layer, QuantStaticKV stacks K and V and stores packed codes [2, B, kv_heads, capacity, P] uint8
plus scales / zeros [2, B, kv_heads, capacity, G] (per-token groups along head_dim, asymmetric RTN
of `splitcli.quant.rtn.quantize_kv`, KVQuantConfig's layout, the eager cache's quantizer). A step
quantizes only its new tokens, in float32 with no host sync, straight into the cache; attention
reads the dequantized [0, length) prefix of one layer at a time, written into one float scratch
[2, B, kv_heads, capacity, D] shared by all layers (the transient term of the edge memory model,
allocated once instead of per layer and step: 30 vs 71 us per layer at 256 tokens, same values).
What the cache itself holds is exactly `kv_bytes_per_token` x capacity (`nbytes`).
"""

from __future__ import annotations

import torch

from splitcli.errors import SplitLLMError
from splitcli.quant.kv_format import SCALE_DTYPES, KVQuantConfig
from splitcli.quant.rtn import dequantize_groupwise, pack_codes, packed_width, quantize_kv, unpack_codes

DEFAULT_CAPACITY = 256  # positions preallocated when the caller does not say (grown on demand)


class StaticCache:
    """Tensors preallocated for `capacity` positions, `length` of them filled. A subclass names its
    tensors (`_tensors`, `_store`), how to allocate them (`_alloc`) and which dims hold the batch
    and the positions (BATCH_DIM, POS_DIM, the same in every tensor)."""

    BATCH_DIM: int
    POS_DIM: int

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise SplitLLMError(f"a KV cache needs capacity >= 1, got {capacity}")
        self._capacity = capacity
        self.length = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def _tensors(self) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError

    def _store(self, tensors: tuple) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _alloc(self, batch: int, capacity: int) -> tuple:  # pragma: no cover - abstract
        raise NotImplementedError

    def reserve(self, total: int, batch: int | None = None) -> None:
        """Make room for `total` positions of `batch` rows (None: the rows already held). Before the
        first forward this only raises the capacity to allocate; later it doubles (one copy)."""
        first = self._tensors()[0]
        if first is None:
            self._capacity = max(self._capacity, total)
            if batch is not None:
                self._store(self._alloc(batch, self._capacity))
            return
        held = first.shape[self.BATCH_DIM]
        if batch is not None and batch != held:
            raise SplitLLMError(f"this KV cache holds {held} rows, the input has {batch}")
        if total <= self._capacity:
            return
        cap = max(total, 2 * self._capacity)
        new = self._alloc(held, cap)
        for old, fresh in zip(self._tensors(), new):
            fresh.narrow(self.POS_DIM, 0, self.length).copy_(old.narrow(self.POS_DIM, 0, self.length))
        self._store(new)
        self._capacity = cap

    def nbytes(self) -> int:
        """Bytes the cache holds for its allocated capacity."""
        if self._tensors()[0] is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._tensors())


class QuantStaticKV(StaticCache):
    """Drop-in for `model.fast.StaticKV` holding K/V at `bits` (8 or 4)."""

    BATCH_DIM, POS_DIM = 2, 4  # [n_layers, 2, B, kv_heads, capacity, ...]

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, bits: int, capacity: int = DEFAULT_CAPACITY,
                 cfg: KVQuantConfig | None = None):
        self.cfg = cfg or KVQuantConfig(bits=bits)
        if self.cfg.bits != bits:
            raise SplitLLMError(f"KV config holds {self.cfg.bits} bits, the cache was asked for {bits}")
        super().__init__(capacity)
        self.n_layers, self.n_kv, self.head_dim, self.bits = n_layers, n_kv, head_dim, bits
        self.group = self.cfg.group_for(head_dim)
        self.scale_dtype = SCALE_DTYPES[self.cfg.scale_dtype]
        self.codes = self.scales = self.zeros = None
        self._layers = ()  # per layer (codes, scales, zeros) views [2, B, kv_heads, capacity, ...], made once
        self._scratch = None  # [2, B, kv_heads, capacity, D] float: one layer's dequantized K, V

    def _tensors(self) -> tuple:
        return self.codes, self.scales, self.zeros

    def _store(self, tensors: tuple) -> None:
        self.codes, self.scales, self.zeros = tensors
        self._layers = tuple(zip(*(t.unbind(0) for t in tensors)))
        self._scratch = None  # sized to the old capacity

    def _alloc(self, batch: int, capacity: int):
        lead = (self.n_layers, 2, batch, self.n_kv, capacity)
        groups = self.head_dim // self.group
        return (torch.zeros(*lead, packed_width(self.head_dim, self.bits), dtype=torch.uint8),
                torch.zeros(*lead, groups, dtype=self.scale_dtype), torch.zeros(*lead, groups, dtype=self.scale_dtype))

    def write(self, i: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Quantize k, v [B, kv_heads, T, D] into positions [start, start + T) of layer i; returns
        the dequantized K, V over [0, start + T) (what attention sees, new tokens included)."""
        t = k.shape[2]
        end = start + t
        codes, scales, zeros = self._layers[i]  # [2, B, kv_heads, capacity, ...]: views, no indexing per step
        kv = torch.stack([k, v])
        if self.bits == 8:  # codes, scales and zeros written in place (8-bit codes are stored unpacked)
            quantize_kv(kv, 8, self.group, self.scale_dtype,
                        out=tuple(x.narrow(3, start, t) for x in (codes, scales, zeros)))
        else:
            q, _, _ = quantize_kv(kv, self.bits, self.group, self.scale_dtype,
                                  out=(torch.empty(kv.shape, dtype=torch.uint8), scales.narrow(3, start, t),
                                       zeros.narrow(3, start, t)))
            codes.narrow(3, start, t).copy_(pack_codes(q, self.bits, check_range=False))
        codes = codes.narrow(3, 0, end)
        if self.bits != 8:  # 8-bit codes are stored unpacked
            codes = unpack_codes(codes, self.bits, self.head_dim)
        if self._scratch is None or self._scratch.dtype != k.dtype:
            self._scratch = torch.empty(*self.codes.shape[1:5], self.head_dim, dtype=k.dtype)
        kv = dequantize_groupwise(codes, scales.narrow(3, 0, end), zeros.narrow(3, 0, end), self.bits,
                                  k.dtype, out=self._scratch.narrow(3, 0, end))  # [2, B, kv_heads, end, D]
        return kv[0], kv[1]
