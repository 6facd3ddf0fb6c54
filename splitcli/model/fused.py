"""Fused projections for the fast decode path (`splitcli.model.fast`): linears that read the same
input (q/k/v, gate/up) run as ONE product, and a layer's last product adds into the residual.

Why: at batch 1 on a slow 2-core host every torch op costs ~3-8 µs of dispatch before any
arithmetic, and a quantized product pays two casts (to bf16 and back) on top. Measured on this host
(1 thread, 15 layers' distinct weights, µs per layer): int4 q/k/v 114 as three module calls vs 59
as one; int8 164 vs 78; fp32 207 vs 174; int4 gate/up 170 vs 149.

Memory: the fused weight REPLACES the separate ones. The modules' own tensors are re-pointed to
views of the concatenated tensor (float weights: columns of one [K, N1 + N2 + ...] tensor, the
layout `relayout_linear_` gives a single linear; int8 codes/scales and the int4 kernel's packed
rows: row slices), so the model holds each weight once. The eager modules then compute what they
computed after `relayout_linear_`: quantized ones bit for bit as before fusing, float ones not
bit for bit as a never-fused [N, K] weight (the transposed layout rounds differently, ~1e-6 at
T = 1). The one exception is the int4 kernel's scales_and_zeros [K/g, N, 2]: a slice along N is not
contiguous (the kernel reads a strided one wrong), so an eager `Int4Linear` call copies its view
once and keeps the copy (8/g of its packed bytes: 1/8 at g = 64), and only when the eager module
runs after fusing; the fast path reads the fused tensor and holds no copy. Building twice over the
same modules finds the joined tensor again (`_joined`) instead of concatenating a second copy.
The modules' state_dict hands out contiguous copies of such views (`_contiguous_state`).

Every fused output equals the separate products concatenated: bit for bit for the int4 / int8
kernels (each output column comes from its own row of weights; tested), and for float up to the
GEMM's blocking of the reduction, which may change with N (equal on the AVX2 / AVX-512 dispatch seen
so far; ~1e-7 apart under ATEN_CPU_CAPABILITY=default on an AMD Zen 3). The split and the unsplit
model both run the fused products, so the split still equals the unsplit model bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..quant import kernels
from ..quant.modules import _INT4_MM, Int4Linear, Int8Linear, int4_kernel_pack, int4_kernel_unpack

_INT8_MM = torch.ops.aten._weight_int8pack_mm


def _contiguous_strides(size: list[int]) -> list[int]:
    strides, acc = [], 1
    for n in reversed(size):
        strides.append(acc)
        acc *= n
    return strides[::-1]


def _joined(parts: list[torch.Tensor], dim: int) -> torch.Tensor | None:
    """The contiguous tensor whose consecutive slices along `dim` are exactly `parts` (same storage,
    adjacent offsets), or None if they are not laid out that way."""
    t0 = parts[0]
    size = list(t0.shape)
    size[dim] = sum(t.shape[dim] for t in parts)
    strides = _contiguous_strides(size)
    offset = t0.storage_offset()
    for t in parts:
        same_rest = all(t.shape[d] == size[d] for d in range(len(size)) if d != dim)
        if t.dtype != t0.dtype or t.untyped_storage().data_ptr() != t0.untyped_storage().data_ptr() or \
                not same_rest or list(t.stride()) != strides or t.storage_offset() != offset:
            return None
        offset += t.shape[dim] * strides[dim]
    return t0.as_strided(size, strides)


def _join(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """`parts` concatenated along `dim` as one contiguous tensor: the one they already are slices
    of, else a new one (the caller re-points the modules at its slices, so nothing is duplicated)."""
    whole = _joined(parts, dim)
    return whole if whole is not None else torch.cat(parts, dim).contiguous()


def _contiguous_state(module: nn.Module, state: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook of a fused module: its own tensors that are strided views of a fused one
    go out as contiguous copies. Why: transformers' save_pretrained views every tensor that shares a
    storage flat (`_find_disjoint`), which a column view of [K, N1 + N2 + ...] cannot be. Costs one
    transient copy of those tensors per state_dict call; nothing is held."""
    for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        key = prefix + name
        if t is not None and key in state and not state[key].is_contiguous():
            state[key] = state[key].contiguous()


def _save_contiguous(mods: list[nn.Module]) -> None:
    for m in mods:
        if not getattr(m, "_fused_state_hook", False):
            m.register_state_dict_post_hook(_contiguous_state)
            m._fused_state_hook = True


def _kind(mods: list[nn.Module]) -> str | None:
    """"float" / "int4" / "int8" when every module runs on that product with the same input width
    and bias presence; None otherwise (e.g. QuantLinear, mixed kinds)."""
    m0 = mods[0]
    if any(type(m) is not type(m0) or m.in_features != m0.in_features or (m.bias is None) != (m0.bias is None)
           for m in mods):
        return None
    if type(m0) is nn.Linear and all(m.weight.dtype == torch.float32 and m.weight.device.type == "cpu" for m in mods):
        return "float"
    if type(m0) is Int4Linear and all(m.group_size == m0.group_size and m.layout == m0.layout
                                      and m.act_bits == m0.act_bits for m in mods):
        return "int4"
    if type(m0) is Int8Linear and all(m._kernel and m.gemv == m0.gemv for m in mods):
        return "int8"
    return None


def is_float_linear(m: nn.Module) -> bool:
    """Whether m is a float32 CPU nn.Linear, whose weight `FusedLinear` (and `relayout_linear_`)
    re-lays out as the transpose of a contiguous [K, N] tensor."""
    return _kind([m]) == "float"


def _int4_repacked(mods: list[Int4Linear]) -> torch.Tensor | None:
    """The int4 kernel's packed [N, K/2] of the modules' rows stacked, when each module's own packed
    bytes are a row slice of it (so the modules can hold views); None when they are not.

    The packed layout is private to this CPU (tiles of 64 rows with AVX-512, 32 with AVX2): the
    codes are read back through the kernel (exact) and packed again, and every module's rows are
    compared with its bytes. A module whose rows straddle a tile would need a second copy of the
    weight, so those layers are not fused (SmolLM2's widths are multiples of 64: always fused).
    splitllm's layout is row by row: its rows always stack."""
    joined = _joined([m.packed for m in mods], 0)
    if joined is not None:
        return joined
    if mods[0].layout == "splitllm":
        return torch.cat([m.packed for m in mods], 0)
    k, g = mods[0].in_features, mods[0].group_size
    codes = torch.cat([int4_kernel_unpack(m.packed, m.out_features, k, g) for m in mods])  # [N, K]
    packed = int4_kernel_pack(codes)  # [N, K/2]
    rows = packed.split([m.out_features for m in mods], 0)
    return packed if all(torch.equal(r, m.packed) for r, m in zip(rows, mods)) else None


class FusedLinear:
    """y = cat([m(x) for m in mods], -1) as one product; x [..., K] -> y [..., N1 + N2 + ...].
    Build with `FusedLinear.build(mods)` (None when the modules cannot be fused)."""

    __slots__ = ("kind", "in_features", "out_features", "sizes", "weight", "bias", "packed", "scales_and_zeros",
                 "group_size", "codes", "scales", "layout", "gemv", "act_bits")

    def __init__(self, kind: str, mods: list[nn.Module]):
        self.kind = kind
        self.in_features = mods[0].in_features
        self.sizes = [m.out_features for m in mods]
        self.out_features = sum(self.sizes)
        self.bias = None
        _save_contiguous(mods)
        with torch.no_grad():
            getattr(self, "_fuse_" + kind)(mods)
            if mods[0].bias is not None:
                self.bias = _join([m.bias.detach() for m in mods], 0)
                for m, b in zip(mods, self.bias.split(self.sizes, 0)):
                    if isinstance(m.bias, nn.Parameter):
                        m.bias.data = b
                    else:  # a buffer (Int4Linear, Int8Linear)
                        m.bias = b

    @classmethod
    def build(cls, mods: list[nn.Module]) -> "FusedLinear | None":
        kind = _kind(mods)
        if kind == "int4" and len(mods) > 1:
            packed = _int4_repacked(mods)
            if packed is None:
                return None
            with torch.no_grad():
                for m, rows in zip(mods, packed.split([m.out_features for m in mods], 0)):
                    m.packed = rows
        return None if kind is None else cls(kind, mods)

    def _fuse_float(self, mods) -> None:
        # [K, N1 + N2 + ...] contiguous: the batch-1 layout relayout_linear_ gives one linear
        wt = _join([m.weight.detach().t() for m in mods], 1)
        for m, part in zip(mods, wt.split(self.sizes, 1)):
            m.weight.data = part.t()  # [N_i, K] view, same values
        self.weight = wt.t()  # [N, K]

    def _fuse_int8(self, mods) -> None:
        self.gemv = mods[0].gemv
        self.codes = _join([m.codes for m in mods], 0)  # [N, K] int8
        self.scales = _join([m.scales for m in mods], 0)  # [N] bf16
        for m, c, s in zip(mods, self.codes.split(self.sizes, 0), self.scales.split(self.sizes, 0)):
            m.codes, m.scales = c, s

    def _fuse_int4(self, mods) -> None:
        self.group_size, self.layout, self.act_bits = mods[0].group_size, mods[0].layout, mods[0].act_bits
        self.packed = _join([m.packed for m in mods], 0)  # joined by build() (one module: its own)
        # torch's [K/g, N, 2] joins along N (strided views: an eager Int4Linear.forward copies its
        # one once); splitllm's [N/4, K/g, 4, 2] along blocks of four rows (contiguous views; every
        # Int4Linear has N % 16 == 0)
        dim, sizes = (0, [n // 4 for n in self.sizes]) if self.layout == "splitllm" else (1, self.sizes)
        self.scales_and_zeros = _join([m.scales_and_zeros for m in mods], dim)
        for m, sz in zip(mods, self.scales_and_zeros.split(sizes, dim)):
            m.use_scales_and_zeros(sz)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> the raw product [tokens, N] (bf16 for torch's quantized kernels, no bias)."""
        if self.kind == "int4" and self.layout == "splitllm":
            return kernels.mm4(x.reshape(-1, self.in_features).float(), self.packed, self.scales_and_zeros,
                               self.group_size, self.act_bits)
        if self.kind == "int4":
            return _INT4_MM(x.reshape(-1, self.in_features).to(torch.bfloat16), self.packed, self.group_size,
                            self.scales_and_zeros)
        if self.kind == "int8" and self.gemv and kernels.use_for_int8(x.numel() // self.in_features):
            return kernels.mm8(x.reshape(-1, self.in_features), self.codes, self.scales)
        if self.kind == "int8":
            return _INT8_MM(x.reshape(-1, self.in_features).to(torch.bfloat16), self.codes, self.scales)
        return F.linear(x.reshape(-1, self.in_features), self.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., K] -> [..., N] in x's dtype
        if self.kind == "float":
            return F.linear(x, self.weight, self.bias)
        y = self.product(x).to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + self(x) with the cast back from bf16 folded into the add (same values: a
        bf16 -> fp32 cast is exact and the add promotes)."""
        if self.bias is not None:
            return residual + self(x)
        return residual + self.product(x).view(residual.shape)


def fused_call(mods: list[nn.Module]):
    """A callable x -> cat([m(x) for m in mods], -1): one FusedLinear product where the modules
    allow it, else their own forwards concatenated."""
    fused = FusedLinear.build(mods)
    if fused is not None:
        return fused
    fns = [m.forward for m in mods]
    return lambda x: torch.cat([f(x) for f in fns], -1)


def residual_call(m: nn.Module):
    """A callable (residual, x) -> residual + m(x), with m's product called directly where it
    runs on a kernel (one module: nothing is re-laid out but a float weight's batch-1 layout)."""
    fused = FusedLinear.build([m])
    if fused is not None:
        return fused.add_to
    fn = m.forward
    return lambda residual, x: residual + fn(x)
