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
With splitllm's CPU kernels (`quant.kernels`), an 8-bit prefix with fp16 scales is dequantized in one
pass of C, bit for bit the same (~0.6 ms less per 15-layer step at 257 positions on this host).
What the cache itself holds is exactly `kv_bytes_per_token` x capacity (`nbytes`).
"""

from __future__ import annotations

import torch

from splitcli.errors import SplitLLMError
from splitcli.quant import kernels
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

    @property
    def rows(self) -> int:
        """Batch rows allocated (0 before the first forward)."""
        first = self._tensors()[0]
        return 0 if first is None else first.shape[self.BATCH_DIM]

    def copy_rows(self, row: int, at: int, src: "StaticCache", src_row: int, src_at: int, n: int) -> None:
        """Copy positions [src_at, src_at + n) of `src`'s batch row `src_row` into positions
        [at, at + n) of this cache's row `row`, every tensor (a batched server stacks sessions'
        caches into one and writes each row's new position back). Both caches must be allocated,
        of one class and layout; `length` is the caller's to set. Values are copied bit for bit."""
        if type(src) is not type(self) or not self.rows or not src.rows:
            raise SplitLLMError("copy_rows needs two allocated caches of the same kind")
        if at + n > self._capacity or src_at + n > src._capacity:
            raise SplitLLMError(f"copy_rows of {n} positions past a cache's capacity")
        for dst_t, src_t in zip(self._tensors(), src._tensors()):
            dst = dst_t.narrow(self.BATCH_DIM, row, 1).narrow(self.POS_DIM, at, n)
            dst.copy_(src_t.narrow(self.BATCH_DIM, src_row, 1).narrow(self.POS_DIM, src_at, n))

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
        self._scratch = None  # [2, B, kv_heads, capacity, D] float: one layer's dequantized K, V
        self._step = None  # (start, T, dtype): the step `_views` were cut for
        self._views = ()  # per layer: the new positions' and the prefix's (codes, scales, zeros) views
        self._scratch_view = None  # the scratch's [0, start + T) prefix

    def _tensors(self) -> tuple:
        return self.codes, self.scales, self.zeros

    def _store(self, tensors: tuple) -> None:
        self.codes, self.scales, self.zeros = tensors
        self._scratch = None  # sized to the old capacity
        self._step = None  # views of the old tensors

    def _alloc(self, batch: int, capacity: int):
        lead = (self.n_layers, 2, batch, self.n_kv, capacity)
        groups = self.head_dim // self.group
        return (torch.zeros(*lead, packed_width(self.head_dim, self.bits), dtype=torch.uint8),
                torch.zeros(*lead, groups, dtype=self.scale_dtype), torch.zeros(*lead, groups, dtype=self.scale_dtype))

    def _cut(self, start: int, t: int, dtype: torch.dtype) -> None:
        """Cut every layer's views for positions [start, start + t) and the prefix [0, start + t) at
        once: the layers of a step share them, and ~7 narrows per layer cost ~35 us each step."""
        if self._scratch is None or self._scratch.dtype != dtype:
            self._scratch = torch.empty(*self.codes.shape[1:5], self.head_dim, dtype=dtype)
        new = [x.narrow(4, start, t).unbind(0) for x in self._tensors()]
        prefix = [x.narrow(4, 0, start + t).unbind(0) for x in self._tensors()]
        self._views = tuple(zip(zip(*new), zip(*prefix)))
        self._scratch_view = self._scratch.narrow(3, 0, start + t)
        self._step = (start, t, dtype)

    def write(self, i: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Quantize k, v [B, kv_heads, T, D] into positions [start, start + T) of layer i; returns
        the dequantized K, V over [0, start + T) (what attention sees, new tokens included)."""
        t = k.shape[2]
        if self._step != (start, t, k.dtype):
            self._cut(start, t, k.dtype)
        new, (codes, scales, zeros) = self._views[i]  # [2, B, kv_heads, T or start + T, ...]
        kv = torch.stack([k, v])
        if self.bits == 8:  # codes, scales and zeros written in place (8-bit codes are stored unpacked)
            quantize_kv(kv, 8, self.group, self.scale_dtype, out=new)
        else:
            q, _, _ = quantize_kv(kv, self.bits, self.group, self.scale_dtype,
                                  out=(torch.empty(kv.shape, dtype=torch.uint8), new[1], new[2]))
            new[0].copy_(pack_codes(q, self.bits, check_range=False))
            codes = unpack_codes(codes, self.bits, self.head_dim)
        if self.bits == 8 and kernels.kv8_dequantize(codes, scales, zeros, self._scratch_view):
            return self._scratch_view.unbind(0)  # the same values in one pass (fp16 scales, float32)
        return dequantize_groupwise(codes, scales, zeros, self.bits, k.dtype,
                                    out=self._scratch_view).unbind(0)  # K, V [B, kv_heads, start + T, D]
