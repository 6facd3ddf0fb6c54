"""Quantized drop-in modules: Int4Linear (splitllm's AVX2 kernel or torch's CPU int4 kernel),
Int8Linear (torch CPU int8 weight-only kernel, per-output-channel symmetric; one-token products on
splitllm's where it runs), QuantLinear (any bit width, dequantized on the fly: the planner does not
pick widths that only run here) and QuantEmbedding (row gather, then dequantize only the rows used).

Every module keeps only its quantized tensors in memory and can `export()` them in the portable
storage format of `splitcli.quant.rtn` (packed uint8 codes + bf16 scales + bf16 zeros + optional
float32 bias) and be rebuilt from that export with `from_export` without materializing float
weights, so a reloaded module computes bit-identical outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from splitcli.errors import SplitLLMError
from splitcli.quant import kernels
from splitcli.quant.rtn import (
    check_bits,
    check_group_size,
    dequantize_groupwise,
    dequantize_symmetric_rows,
    pack_codes,
    quantize_groupwise,
    quantize_symmetric_rows,
    unpack_codes,
)

WEIGHT_SCALE_DTYPE = torch.bfloat16  # the CPU int4 kernel takes bf16 scales and zeros
INT4_KERNEL_GROUP_SIZES = (32, 64, 128, 256)
_INT4_KERNEL_ROW_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu refuses other row counts
_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu  # looked up here once (and patchable by tests)


def int4_kernel_supports(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether `Int4Linear` can serve this shape on torch's CPU int4 kernel; other shapes fall
    back to `QuantLinear`. The same answer on every CPU: it depends on the shape only."""
    return (
        group_size in INT4_KERNEL_GROUP_SIZES
        and in_features % group_size == 0
        and out_features % _INT4_KERNEL_ROW_MULTIPLE == 0
        and out_features > 0
    )


def _check_int4_shape(out_features: int, in_features: int, group_size: int) -> None:
    if not int4_kernel_supports(out_features, in_features, group_size):
        raise SplitLLMError(
            f"Int4Linear cannot serve a {out_features}x{in_features} weight with group size "
            f"{group_size}: needs out % {_INT4_KERNEL_ROW_MULTIPLE} == 0 and a group in "
            f"{INT4_KERNEL_GROUP_SIZES} dividing in"
        )


def int4_kernel_pack(q: torch.Tensor) -> torch.Tensor:
    """Codes q [N, K] (0..15) -> the CPU kernel's packed uint8 [N, K/2].

    The byte layout is private to this process on this CPU: torch tiles rows by the vector
    width (64 rows with AVX-512, 32 with AVX2, plain pairs elsewhere). It must never reach a
    file, a hash or a test's expected bytes; `int4_kernel_unpack` is its only inverse.
    """
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def int4_kernel_unpack(packed: torch.Tensor, out_features: int, in_features: int, group_size: int) -> torch.Tensor:
    """Codes q [N, K] back from a kernel-packed weight, on whatever layout this CPU uses.

    The kernel itself reads the codes out: with scale 1 and zero 8 it computes w = q - 8 + 8 = q,
    and the identity as input gives y = I @ w.T, so y.T = q. Every value is a small integer,
    exact in bf16, so the result is exact; no layout table is assumed.
    """
    k, n = in_features, out_features
    sz = torch.empty(k // group_size, n, 2, dtype=torch.bfloat16)  # [K/g, N, (scale, zero)]
    sz[..., 0], sz[..., 1] = 1.0, 8.0
    eye = torch.eye(k, dtype=torch.bfloat16)  # [K, K]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, group_size, sz)  # [K, N]
    return y.t().to(torch.uint8).contiguous()  # [N, K]


class QuantLinear(nn.Module):
    """Linear layer with group-wise `bits`-bit weights, dequantized at every forward.

    Only the packed codes, scales and zeros are held, so resident memory equals the stored size
    (what eq. (1) counts). Dequantizing per call is slow — measured at batch 1 on this 2-core
    host, 576x576 at 8 bits: 0.20 ms vs 0.027 ms for fp32 (best of repeats) — but a cached float
    copy would hold 4 bytes per weight, more than the unquantized layer, which defeats OPSC on
    the edge. So no cache: 4-bit layers go through Int4Linear and 8-bit ones through Int8Linear;
    2- and 3-bit layers (and shapes the kernels refuse) stay here, and the planner refuses those
    widths (`splitcli.plan.enumerate.KERNEL_BITS`). Output dtype follows the input.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None,
    ):
        super().__init__()
        check_bits(bits)
        check_group_size(in_features, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.register_buffer("codes", codes)  # [N, packed_width(K)] uint8
        self.register_buffer("scales", scales)  # [N, K/group] bf16
        self.register_buffer("zeros", zeros)  # [N, K/group] bf16
        self.register_buffer("bias", bias)  # [N] float32 or None

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int) -> "QuantLinear":
        q, s, z = quantize_groupwise(linear.weight, bits, group_size, WEIGHT_SCALE_DTYPE)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        return cls(linear.in_features, linear.out_features, bits, group_size, pack_codes(q, bits), s, z, bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # 8-bit codes are stored unpacked: skip the copy unpack_codes would make
        q = self.codes if self.bits == 8 else unpack_codes(self.codes, self.bits, self.in_features)  # [N, K]
        return dequantize_groupwise(q, self.scales, self.zeros, self.bits, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized_weight(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, w, b)

    def export(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes, "scales": self.scales, "zeros": self.zeros}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}"


class Int4Linear(nn.Module):
    """4-bit linear on a CPU kernel: splitllm's own (`kernels`, x86-64 AVX2, chosen at construction
    where it is available) or torch's `_weight_int4pack_mm_for_cpu` (everywhere else).

    Drop-in for a float32 nn.Linear. `layout` says which kernel holds the weights:
    - "splitllm": packed [N, K/2] uint8 in splitllm's layout (the same on every CPU) and
      `scales_and_zeros` [N/4, K/group, 4, 2] bf16 (blocks of four rows); float32 in and out
      (relative error ~3e-5 vs the dequantized reference, from the int16 input).
    - "torch": torch's packed [N, K/2] (laid out for this CPU at construction) and
      `scales_and_zeros` [K/group, N, 2] bf16; the input is cast to bf16 for the kernel and the
      output back (relative error ~3e-3).
    Both hold the same numbers as the portable format, only re-laid out; `export()` always gives
    portable codes.

    `act_bits` (a run-time setting, not stored in shards): the width splitllm's one-token kernel
    rounds its input to, per weight group: 16 (default) or 8 (`use_act_bits`, a plan's
    edge_act_bits: faster, coarser). Torch's kernel always takes bf16 and ignores it.
    """

    bits = 4

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        packed: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        bias: torch.Tensor | None,
        layout: str = "torch",
    ):
        super().__init__()
        _check_int4_shape(out_features, in_features, group_size)
        if layout not in ("torch", "splitllm"):
            raise SplitLLMError(f"unknown Int4Linear layout {layout!r}")
        if layout == "splitllm":
            kernels.check_operands4(in_features, packed, scales_and_zeros, group_size)
            if packed.shape[0] != out_features:
                raise SplitLLMError(f"Int4Linear: {packed.shape[0]} packed rows for {out_features} outputs")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.layout = layout
        self.register_buffer("packed", packed)  # [N, K/2] uint8 in `layout`
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [K/group, N, 2] or [N/4, K/group, 4, 2] bf16
        self.register_buffer("bias", bias)  # [N] float32 or None
        # a contiguous copy of scales_and_zeros for the kernel, made at the first eager call after it
        # became a strided view (model.fused); None while it is contiguous. Non-persistent: not saved
        self.register_buffer("_sz_kernel", None, persistent=False)
        self._sz_version = -1
        self.act_bits = 16

    @classmethod
    def from_portable(
        cls,
        in_features: int,
        out_features: int,
        group_size: int,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> "Int4Linear":
        _check_int4_shape(out_features, in_features, group_size)
        q = unpack_codes(codes, 4, in_features)  # [N, K]
        if kernels.use_for_int4() and kernels.supports4(in_features, group_size):
            sz = torch.stack([scales, zeros], dim=-1).to(torch.bfloat16)  # [N, K/g, 2]
            return cls(in_features, out_features, group_size, kernels.pack4(q), kernels.block_pairs4(sz), bias,
                       "splitllm")
        sz = torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()  # [K/g, N, 2]
        return cls(in_features, out_features, group_size, int4_kernel_pack(q), sz, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "Int4Linear":
        q, s, z = quantize_groupwise(linear.weight, 4, group_size, WEIGHT_SCALE_DTYPE)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        return cls.from_portable(
            linear.in_features, linear.out_features, group_size, pack_codes(q, 4), s, z, bias
        )

    def export(self) -> dict[str, torch.Tensor]:
        if self.layout == "splitllm":
            q = kernels.unpack4(self.packed)  # [N, K]
            sz = kernels.unblock_pairs4(self.scales_and_zeros)  # [N, K/g, 2]
        else:
            q = int4_kernel_unpack(self.packed, self.out_features, self.in_features, self.group_size)  # [N, K]
            sz = self.scales_and_zeros.transpose(0, 1)  # [N, K/g, 2]
        out = {"codes": pack_codes(q, 4), "scales": sz[..., 0].contiguous(), "zeros": sz[..., 1].contiguous()}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        e = self.export()
        q = unpack_codes(e["codes"], 4, self.in_features)
        return dequantize_groupwise(q, e["scales"], e["zeros"], 4, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.layout == "splitllm":
            y = kernels.mm4(x.reshape(-1, self.in_features).float(), self.packed, self.scales_and_zeros,
                            self.group_size, self.act_bits)
            y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)  # [..., N]
            return y if self.bias is None else y + self.bias.to(x.dtype)
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # [tokens, K]
        sz = self.scales_and_zeros
        if not sz.is_contiguous():  # a view into a fused [K/g, N', 2] (model.fused): the kernel misreads strides
            # copied once, not per call; again only if the view was written in place since (its
            # version counter, shared with the fused tensor, moved: e.g. load_state_dict)
            if self._sz_kernel is None or self._sz_version != sz._version:
                self._sz_kernel, self._sz_version = sz.contiguous(), sz._version
            sz = self._sz_kernel
        y = _INT4_MM(x2, self.packed, self.group_size, sz)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)  # [..., N]
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def use_act_bits(self, bits: int) -> None:
        """Round one-token inputs to `bits` (kernels.ACT_BITS) on splitllm's kernel from now on."""
        if bits not in kernels.ACT_BITS or isinstance(bits, bool):
            raise SplitLLMError(f"Int4Linear input bits must be one of {kernels.ACT_BITS}, got {bits!r}")
        self.act_bits = bits

    def use_scales_and_zeros(self, sz: torch.Tensor) -> None:
        """Point scales_and_zeros at `sz` in this module's layout (e.g. a view of a fused tensor:
        strided for the torch layout, a row slice for splitllm's); the eager torch kernel's
        contiguous copy of the old one is dropped."""
        self.scales_and_zeros, self._sz_kernel = sz, None

    def extra_repr(self) -> str:
        kernel = "splitllm-avx2" if self.layout == "splitllm" else "cpu-int4"
        inp = f"int{self.act_bits}" if self.layout == "splitllm" else "bf16"
        return (f"in={self.in_features}, out={self.out_features}, bits=4, group={self.group_size}, kernel={kernel}, "
                f"input={inp}")


def use_int4_act_bits_(module: nn.Module, bits: int) -> int:
    """Every Int4Linear under `module` rounds its one-token inputs to `bits` (kernels.ACT_BITS) from
    now on; returns how many there are. Call it before a fast half is built over them (model.fused
    copies the setting when it joins their weights)."""
    if bits not in kernels.ACT_BITS or isinstance(bits, bool):
        raise SplitLLMError(f"edge activation bits must be one of {kernels.ACT_BITS}, got {bits!r}")
    mods = [m for m in module.modules() if isinstance(m, Int4Linear)]
    for m in mods:
        m.use_act_bits(bits)
    return len(mods)


INT8_KERNEL_COL_MULTIPLE = 16  # _weight_int8pack_mm crashes (AVX-512) on other input widths


def int8_kernel_supports(in_features: int) -> bool:
    """Whether `Int8Linear` runs this input width on torch's int8 kernel (else it dequantizes)."""
    return in_features > 0 and in_features % INT8_KERNEL_COL_MULTIPLE == 0


class Int8Linear(nn.Module):
    """8-bit linear on torch's CPU weight-only kernel `_weight_int8pack_mm`, and for up to
    `kernels.GEMV_MAX_TOKENS` tokens on splitllm's AVX2 kernel where it is available (`gemv`,
    decided at construction) and torch runs on one thread (`kernels.use_for_int8`, per call; int16
    input, relative error ~3e-5 against ~3e-3 for torch's bf16 input).

    Weights are per-output-channel symmetric int8 codes [N, K] with one bf16 scale per row
    (`quantize_symmetric_rows`): exactly the kernel's operands, so the stored, held and computed
    numbers are the same on every CPU and `export()` is the held tensors themselves. The input is
    cast to bf16 (fp32 activations take the kernel's slow path: measured 0.62 vs 0.026 ms for
    1536x576) and the output back to the input dtype. Input widths the kernel cannot take
    (`int8_kernel_supports`) are served by dequantizing, which is slow but exact to the format.
    """

    bits = 8

    def __init__(self, in_features: int, out_features: int, codes: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None):
        super().__init__()
        if tuple(codes.shape) != (out_features, in_features) or codes.dtype != torch.int8:
            raise SplitLLMError(f"Int8Linear codes must be int8 [{out_features}, {in_features}], got "
                                f"{codes.dtype} {tuple(codes.shape)}")
        if tuple(scales.shape) != (out_features,):
            raise SplitLLMError(f"Int8Linear scales must be [{out_features}], got {tuple(scales.shape)}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size = in_features  # one scale per output row
        self.register_buffer("codes", codes.contiguous())  # [N, K] int8
        self.register_buffer("scales", scales.to(WEIGHT_SCALE_DTYPE).contiguous())  # [N] bf16
        self.register_buffer("bias", bias)  # [N] float32 or None
        self._kernel = int8_kernel_supports(in_features)
        self.gemv = kernels.available() and kernels.supports8(in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, s = quantize_symmetric_rows(linear.weight, WEIGHT_SCALE_DTYPE)
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        return cls(linear.in_features, linear.out_features, q, s, bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_symmetric_rows(self.codes, self.scales, dtype)  # [N, K]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._kernel:
            b = None if self.bias is None else self.bias.to(x.dtype)
            return nn.functional.linear(x, self.dequantized_weight(x.dtype), b)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # [tokens, K]
        if self.gemv and kernels.use_for_int8(x2.shape[0]):
            y = kernels.mm8(x2, self.codes, self.scales)  # [tokens, N] float32
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.codes, self.scales)  # bf16
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def export(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes, "scales": self.scales}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def extra_repr(self) -> str:
        kernel = ("splitllm-avx2 / cpu-int8" if self.gemv else "cpu-int8") if self._kernel else "dequantize"
        return f"in={self.in_features}, out={self.out_features}, bits=8, per-channel symmetric, kernel={kernel}"


_EMBED_BLOCK_ROWS = 512


class QuantEmbedding(nn.Module):
    """Embedding table with group-wise quantized rows (8-bit by default).

    Only the rows looked up are dequantized. A model with tie_word_embeddings shares this table
    with its LM head; the edge never runs the LM head, so quantizing the edge's embedding copy
    leaves the cloud's full-precision head untouched (the split runtime must untie them).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        group_size: int,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        padding_idx: int | None = None,
    ):
        super().__init__()
        check_bits(bits)
        check_group_size(embedding_dim, group_size)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size, self.padding_idx = bits, group_size, padding_idx
        self.register_buffer("codes", codes)  # [V, packed_width(D)] uint8
        self.register_buffer("scales", scales)  # [V, D/group] bf16
        self.register_buffer("zeros", zeros)  # [V, D/group] bf16

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int = 8, group_size: int | None = None) -> "QuantEmbedding":
        if type(emb) is not nn.Embedding:  # e.g. Gemma's scaled embedding: its scale would be lost
            raise SplitLLMError(f"an embedding quantized to {bits} bits must be a plain nn.Embedding, not "
                                f"{type(emb).__name__}: keep it at 16 bits")
        g = emb.embedding_dim if group_size is None else group_size
        # a block of rows at a time: groups never span rows, so the codes are the whole table's, and
        # the float64 temporaries stay a block's (SmolLM2's table: peak memory +132 MB in 0.4 s,
        # against +873 MB in 2.8 s all at once)
        blocks = [quantize_groupwise(emb.weight[a:a + _EMBED_BLOCK_ROWS], bits, g, WEIGHT_SCALE_DTYPE)
                  for a in range(0, max(emb.num_embeddings, 1), _EMBED_BLOCK_ROWS)]
        q, s, z = (torch.cat(parts) for parts in zip(*blocks))
        return cls(emb.num_embeddings, emb.embedding_dim, bits, g, pack_codes(q, bits), s, z, emb.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        q = unpack_codes(self.codes[flat], self.bits, self.embedding_dim)  # [tokens, D]
        rows = dequantize_groupwise(q, self.scales[flat], self.zeros[flat], self.bits, torch.float32)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def export(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scales": self.scales, "zeros": self.zeros}

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group={self.group_size}"
