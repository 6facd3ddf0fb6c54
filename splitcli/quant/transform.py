"""Module transforms, OPSC bit assignment (paper eq. (1), Table 4), exact byte accounting and
safetensors-ready state dicts for quantized layers.

Storage format of one quantized module at prefix `p` (all tensors contiguous):
  p.codes  uint8 [rows, packed_width(cols, bits)]   (see splitcli.quant.rtn for the packing)
  p.scales bf16  [rows, cols / group_size]
  p.zeros  bf16  [rows, cols / group_size]          (value of the middle code)
  p.bias   float32 [rows]                            (linears with a bias only)
  p.qmeta  int32 [6] = (FORMAT_VERSION, kind, bits, group_size, cols, rows)
8-bit linears (Int8Linear, kind 3) instead hold the int8 kernel's own operands: p.codes int8
[rows, cols] symmetric codes, p.scales bf16 [rows] (one per output channel), no p.zeros; their
group_size in qmeta is cols.
Everything that is not quantized (norm weights, layers kept at 16 "bits") is stored as it sits in
the module, so on the float32 CPU runtime it costs 4 bytes per value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from splitcli.errors import SplitLLMError
from splitcli.quant.modules import (
    Int4Linear,
    Int8Linear,
    QuantEmbedding,
    QuantLinear,
    WEIGHT_SCALE_DTYPE,
    int4_kernel_supports,
)
from splitcli.quant.rtn import (
    KEEP_BITS,
    SUPPORTED_BITS,
    check_bits,
    check_group_size,
    dequantize_groupwise,
    dequantize_symmetric_rows,
    packed_width,
    quantize_groupwise,
    quantize_symmetric_rows,
)

FORMAT_VERSION = 1
_KIND = {QuantLinear: 0, Int4Linear: 1, QuantEmbedding: 2, Int8Linear: 3}
QMETA_NUMEL = 6
_SCALE_BYTES = torch.empty((), dtype=WEIGHT_SCALE_DTYPE).element_size()
_QUANTIZED = (QuantLinear, Int4Linear, QuantEmbedding, Int8Linear)
_LINEARS = (nn.Linear, QuantLinear, Int4Linear, Int8Linear)


def opsc_bits(L: int, l_w: int, q_w1: int, q_w2: int | None, method: str = "front") -> list[int | None]:
    """Per-layer weight bits for OPSC (eq. (1)).

    "front": layers [0, l_w) at q_w1 and [l_w, L) at q_w2 (the paper's 1..l_w, 0-based here).
    "back": the LAST l_w layers at q_w1 and the first L - l_w at q_w2 (Table 4's back-end method).
    q_w2=None marks layers that are not kept at all (e.g. they live on the other side); 16 means
    kept unquantized.
    """
    if method not in ("front", "back"):
        raise SplitLLMError(f"unknown OPSC method {method!r}; use 'front' or 'back'")
    if L < 0 or not 0 <= l_w <= L:
        raise SplitLLMError(f"OPSC split l_w={l_w} must lie in [0, {L}]")
    for q in (q_w1,) + (() if q_w2 is None else (q_w2,)):
        if q not in SUPPORTED_BITS + (KEEP_BITS,):
            raise SplitLLMError(f"unsupported weight bits {q}; choose one of {SUPPORTED_BITS + (KEEP_BITS,)}")
    if method == "front":
        return [q_w1] * l_w + [q_w2] * (L - l_w)
    return [q_w2] * (L - l_w) + [q_w1] * l_w


@dataclass(frozen=True)
class LayerShapes:
    """What `layer_weight_bytes` needs to know about one decoder layer.

    linears: (name, out_features, in_features, has_bias); others: (name, numel) of every other
    stored tensor (norm weights), kept unquantized.
    """

    linears: tuple[tuple[str, int, int, bool], ...]
    others: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        for name, out_f, in_f, _ in self.linears:
            if out_f <= 0 or in_f <= 0:
                raise SplitLLMError(f"linear {name} has a non-positive shape {out_f}x{in_f}")
        for name, n in self.others:
            if n < 0:
                raise SplitLLMError(f"tensor {name} has a negative size {n}")


def layer_shapes_of(layer: nn.Module) -> LayerShapes:
    """Shapes of a (float or already quantized) decoder layer."""
    linears, others, inside = [], [], []
    for name, m in layer.named_modules():
        if isinstance(m, _LINEARS):
            linears.append((name, m.out_features, m.in_features, m.bias is not None))
            inside.append(name + ".")
    for name, t in layer.state_dict().items():
        if not any(name.startswith(p) for p in inside):
            others.append((name, t.numel()))
    return LayerShapes(tuple(linears), tuple(others))


def llama_layer_shapes(config) -> LayerShapes:
    """Shapes of one Llama-style decoder layer from a transformers config (no weights needed)."""
    h, i = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    nq, nkv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    ab, mb = bool(getattr(config, "attention_bias", False)), bool(getattr(config, "mlp_bias", False))
    return LayerShapes(
        linears=(
            ("self_attn.q_proj", nq, h, ab),
            ("self_attn.k_proj", nkv, h, ab),
            ("self_attn.v_proj", nkv, h, ab),
            ("self_attn.o_proj", h, nq, ab),
            ("mlp.gate_proj", i, h, mb),
            ("mlp.up_proj", i, h, mb),
            ("mlp.down_proj", h, i, mb),
        ),
        others=(("input_layernorm.weight", h), ("post_attention_layernorm.weight", h)),
    )


def quantized_matrix_bytes(rows: int, cols: int, bits: int, group_size: int) -> int:
    """Stored bytes of one quantized [rows, cols] matrix: codes + scales + zeros + qmeta."""
    check_bits(bits)
    check_group_size(cols, group_size)
    groups = cols // group_size
    return rows * packed_width(cols, bits) + 2 * rows * groups * _SCALE_BYTES + 4 * QMETA_NUMEL


def linear_matrix_bytes(rows: int, cols: int, bits: int, group_size: int) -> int:
    """Stored bytes of one quantized linear weight as `quantize_layers_` builds it: 8 bits is
    Int8Linear (int8 codes + one bf16 scale per row + qmeta), other widths group-wise
    (`quantized_matrix_bytes`)."""
    if bits == 8:
        return rows * cols + rows * _SCALE_BYTES + 4 * QMETA_NUMEL
    return quantized_matrix_bytes(rows, cols, bits, group_size)


def layer_weight_bytes(shapes: LayerShapes, bits: int | None, group_size: int, float_bytes: int = 4) -> int:
    """Exact stored bytes of one decoder layer at `bits` (None: not kept -> 0; 16: unquantized).

    Quantized linears cost codes + bf16 scales/zeros + qmeta (+ 4 bytes per bias value); every
    unquantized value costs `float_bytes` (4 for the float32 runtime; pass 2 for the paper's fp16).
    """
    if bits is None:
        return 0
    total = sum(n for _, n in shapes.others) * float_bytes
    for _, out_f, in_f, has_bias in shapes.linears:
        if bits == KEEP_BITS:
            total += (out_f * in_f + (out_f if has_bias else 0)) * float_bytes
        else:
            total += linear_matrix_bytes(out_f, in_f, bits, group_size) + (4 * out_f if has_bias else 0)
    return total


def opsc_weight_bytes(
    shapes: LayerShapes | list[LayerShapes], bits_per_layer: list[int | None], group_size: int, float_bytes: int = 4
) -> int:
    """M(l_w, Q_w) of eq. (1): sum of each layer's stored bytes at its bits (see `opsc_bits`)."""
    per = shapes if isinstance(shapes, list) else [shapes] * len(bits_per_layer)
    if len(per) != len(bits_per_layer):
        raise SplitLLMError(f"{len(per)} layer shapes for {len(bits_per_layer)} bit widths")
    return sum(layer_weight_bytes(s, b, group_size, float_bytes) for s, b in zip(per, bits_per_layer))


def default_group_size(shapes: LayerShapes, preferred: tuple[int, ...] = (128, 64)) -> int:
    """Largest preferred group size dividing every linear's input width (64 for SmolLM2-135M,
    whose 576 is not a multiple of 128). 32 is deliberately not preferred: that model's GGUF
    weights already sit on a 4-bit grid of blocks of 32, so group 32 is nearly lossless there
    (measured +0.1% ppl at 4 bits on all 30 layers) and would flatter OPSC."""
    widths = {in_f for _, _, in_f, _ in shapes.linears}
    for g in preferred:
        if all(w % g == 0 for w in widths):
            return g
    raise SplitLLMError(
        f"none of the group sizes {preferred} divides every input width {sorted(widths)}; pass one explicitly"
    )


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, ...]:
    """`weight` [N, K] in the scheme `quantize_layers_` stores at `bits`: 8 -> (q int8, scale [N])
    per-channel symmetric; other widths -> (q, scale, zero) group-wise RTN with bf16 scales."""
    if bits == 8:
        return quantize_symmetric_rows(weight, WEIGHT_SCALE_DTYPE)
    return quantize_groupwise(weight, bits, group_size, WEIGHT_SCALE_DTYPE)


def dequantize_weight(quantized: tuple[torch.Tensor, ...], bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_weight`: the [N, K] weight the runtime computes with."""
    if bits == 8:
        return dequantize_symmetric_rows(*quantized, dtype)
    return dequantize_groupwise(*quantized, bits, dtype)


def fake_quantized_weight(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """`weight` quantized and dequantized back to its dtype exactly as the runtime stores it, so an
    accuracy proxy measures the scheme the runtime uses."""
    return dequantize_weight(quantize_weight(weight, bits, group_size), bits, weight.dtype)


def _quantize_linear(linear: nn.Linear, bits: int, group_size: int, use_int4_kernel: bool) -> nn.Module:
    if bits == 8:
        return Int8Linear.from_linear(linear)
    if bits == 4 and use_int4_kernel and int4_kernel_supports(linear.out_features, linear.in_features, group_size):
        return Int4Linear.from_linear(linear, group_size)
    return QuantLinear.from_linear(linear, bits, group_size)


def quantize_layers_(
    decoder_layers: nn.ModuleList,
    layer_ids,
    bits: int | list[int | None],
    group_size: int,
    use_int4_kernel: bool = True,
) -> None:
    """Swap every nn.Linear in `decoder_layers[i]` (i in layer_ids) for a quantized module, in place.

    `bits` is one width for all given layers or one per id (as from `opsc_bits`); 16 or None leaves
    a layer alone. 8-bit linears become Int8Linear (per-channel, `group_size` does not apply);
    4-bit ones use Int4Linear where the kernel supports the shape. All shapes are checked before
    anything is changed.
    """
    ids = list(layer_ids)
    per = bits if isinstance(bits, list) else [bits] * len(ids)
    if len(per) != len(ids):
        raise SplitLLMError(f"{len(per)} bit widths for {len(ids)} layers")
    plan = []
    for i, b in zip(ids, per):
        if not 0 <= i < len(decoder_layers):
            raise SplitLLMError(f"layer {i} does not exist (model has {len(decoder_layers)} layers)")
        if b is None or b == KEEP_BITS:
            continue
        check_bits(b)
        for name, m in decoder_layers[i].named_modules():
            if isinstance(m, nn.Linear):
                if b != 8:
                    check_group_size(m.in_features, group_size)
                plan.append((decoder_layers[i], name, m, b))
    for layer, name, m, b in plan:
        layer.set_submodule(name, _quantize_linear(m, b, group_size, use_int4_kernel))


def quantized_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with every quantized submodule in the portable storage format (see top)."""
    sd = module.state_dict()
    out: dict[str, torch.Tensor] = {}
    qprefixes = []
    for name, m in module.named_modules():
        if isinstance(m, _QUANTIZED):
            if name == "":
                raise SplitLLMError("quantized_state_dict needs a container module, not a quantized leaf")
            qprefixes.append(name + ".")
            if isinstance(m, QuantEmbedding):
                rows, cols, b = m.num_embeddings, m.embedding_dim, m.bits
            else:
                rows, cols, b = m.out_features, m.in_features, m.bits
            for k, t in m.export().items():
                out[f"{name}.{k}"] = t.contiguous()
            out[f"{name}.qmeta"] = torch.tensor(
                [FORMAT_VERSION, _KIND[type(m)], b, m.group_size, cols, rows], dtype=torch.int32
            )
    for k, t in sd.items():
        if not any(k.startswith(p) for p in qprefixes):
            out[k] = t.contiguous()
    return out


def _build(prefix: str, sd: dict[str, torch.Tensor]) -> nn.Module:
    meta = sd[prefix + "qmeta"].tolist()
    if len(meta) != QMETA_NUMEL or meta[0] != FORMAT_VERSION:
        raise SplitLLMError(f"{prefix}qmeta: unsupported quantized format {meta[:1]} (expected {FORMAT_VERSION})")
    _, kind, bits, group, cols, rows = meta
    if kind == _KIND[Int8Linear]:
        return _build_int8(prefix, sd, rows, cols, meta)
    try:
        codes, scales, zeros = sd[prefix + "codes"], sd[prefix + "scales"], sd[prefix + "zeros"]
    except KeyError as e:
        raise SplitLLMError(f"quantized tensor {e.args[0]} is missing") from None
    expect = (rows, packed_width(cols, bits))
    if tuple(codes.shape) != expect or tuple(scales.shape) != (rows, cols // group):
        raise SplitLLMError(f"{prefix}codes/scales have shapes that do not match their qmeta {meta}")
    bias = sd.get(prefix + "bias")
    if kind == _KIND[QuantLinear]:
        return QuantLinear(cols, rows, bits, group, codes, scales, zeros, bias)
    if kind == _KIND[Int4Linear]:
        return Int4Linear.from_portable(cols, rows, group, codes, scales, zeros, bias)
    if kind == _KIND[QuantEmbedding]:
        return QuantEmbedding(rows, cols, bits, group, codes, scales, zeros)
    raise SplitLLMError(f"{prefix}qmeta: unknown quantized module kind {kind}")


def _build_int8(prefix: str, sd: dict[str, torch.Tensor], rows: int, cols: int, meta: list) -> Int8Linear:
    try:
        codes, scales = sd[prefix + "codes"], sd[prefix + "scales"]
    except KeyError as e:
        raise SplitLLMError(f"quantized tensor {e.args[0]} is missing") from None
    if codes.dtype != torch.int8 or tuple(codes.shape) != (rows, cols) or tuple(scales.shape) != (rows,):
        raise SplitLLMError(f"{prefix}codes/scales have dtypes or shapes that do not match their qmeta {meta}")
    return Int8Linear(cols, rows, codes, scales, sd.get(prefix + "bias"))


def load_quantized_(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load `quantized_state_dict` output into `module` in place.

    Quantized submodules are rebuilt straight from their stored tensors (no float weights are
    made), everything else is assigned, so `module` may be built on the meta device. Missing or
    unexpected keys raise SplitLLMError.
    """
    prefixes = [k[: -len("qmeta")] for k in state_dict if k.endswith(".qmeta")]
    for p in prefixes:
        module.set_submodule(p[:-1], _build(p, state_dict))
    rest = {k: v for k, v in state_dict.items() if not any(k.startswith(p) for p in prefixes)}
    missing, unexpected = module.load_state_dict(rest, strict=False, assign=True)
    missing = [k for k in missing if not any(k.startswith(p) for p in prefixes)]
    if missing or unexpected:
        raise SplitLLMError(
            f"state dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


load_quantized_layers_ = load_quantized_
