"""Group-wise asymmetric round-to-nearest (RTN) integer quantization and bit packing.

Used for the OPSC weight bits Q_w of paper eq. (1) and, per token, for the KV cache bits Q_a of
eq. (2).

Number format (one group of `group_size` consecutive values along the last axis):

    w_hat = (q - mid) * scale + zero,   q in [0, 2**bits - 1],   mid = 2**(bits - 1)

`zero` is the value the *middle* code stands for (not the group minimum). That is the layout
torch's CPU int4 kernel consumes directly (it subtracts 8 from each nibble), so one stored format
serves every bit width and the 4-bit kernel without recomputing anything at load time.

Scales and zeros are stored in a low-precision float (`scale_dtype`, bf16 for weights). Rounding
them naively could push the group's extreme values outside the representable range, so the
stored zero is rounded to nearest first and the stored scale is then rounded *up* until the code
range covers [min, max]. Codes are computed against the stored (rounded) values, so every element
is reconstructed within half a stored step: |w - w_hat| <= scale / 2. A constant group gets
scale 0 when its value is representable in `scale_dtype` and is then reconstructed exactly.

Packing: codes are packed along the last axis into uint8, little-endian within a chunk. A chunk
is lcm(bits, 8) bits: 2-bit packs 4 codes per byte, 4-bit 2 per byte, 8-bit 1 per byte, and
3-bit packs 8 codes into 3 bytes (exactly 3 bits per code). The last axis is zero-padded to a
whole chunk; `unpack_codes` needs the original length to drop the padding.
"""

from __future__ import annotations

import functools
import math

import torch

from splitcli.cost.memory import KEEP_BITS  # its one home is torch-free; splitcli.quant re-exports it
from splitcli.errors import SplitLLMError

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise SplitLLMError(
            f"unsupported quantization bit width {bits}; choose one of "
            f"{', '.join(map(str, SUPPORTED_BITS))} (or {KEEP_BITS} to keep the layer unquantized)"
        )


def valid_group_sizes(width: int) -> list[int]:
    """All group sizes that divide `width` (the input width of a weight, or head_dim)."""
    return [g for g in range(1, width + 1) if width % g == 0]


def check_group_size(width: int, group_size: int) -> None:
    if group_size <= 0 or width <= 0 or width % group_size != 0:
        raise SplitLLMError(
            f"group size {group_size} does not divide the input width {width}; "
            f"valid group sizes: {', '.join(map(str, valid_group_sizes(width)))}"
        )


def _round_up_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Smallest value of `dtype` that is >= x (x is float64)."""
    r = x.to(dtype)
    low = r.double() < x
    if bool(low.any()):
        r = torch.where(low, torch.nextafter(r, torch.full_like(r, float("inf"))), r)
    return r


def quantize_groupwise(
    w: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric RTN of `w` [..., width] in groups of `group_size` along the last axis.

    Returns (q, scale, zero): q uint8 [..., width] codes, scale and zero [..., width/group_size]
    in `scale_dtype`. Raises SplitLLMError for a bad bit width, a group size that does not divide
    the width, or non-finite input.
    """
    check_bits(bits)
    width = w.shape[-1]
    check_group_size(width, group_size)
    # float64 so that hi - lo cannot overflow for values near the float32 limit
    x = w.detach().double()
    if not bool(torch.isfinite(x).all()):
        raise SplitLLMError("cannot quantize a tensor that holds NaN or Inf values")
    qmax = 2**bits - 1
    mid = 2 ** (bits - 1)
    g = x.reshape(*x.shape[:-1], width // group_size, group_size)  # [..., groups, group_size]
    lo = g.amin(dim=-1)  # [..., groups]
    hi = g.amax(dim=-1)
    zero = (lo + mid * (hi - lo) / qmax).to(scale_dtype)
    z = zero.double()
    # the step must reach down to lo from the middle code and up to hi from it
    need = torch.maximum((z - lo) / mid, (hi - z) / (qmax - mid))
    scale = _round_up_to(need, scale_dtype)
    if not bool(torch.isfinite(scale).all()) or not bool(torch.isfinite(zero).all()):
        raise SplitLLMError(f"value range too large for {scale_dtype} scales")
    s = scale.double().unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((g - z.unsqueeze(-1)) / safe) + mid
    q = torch.where(s > 0, q, torch.full_like(q, mid)).clamp_(0, qmax)
    return q.to(torch.uint8).reshape(x.shape), scale, zero


# Margins that make the float32 step a provable upper bound of the step the group needs: relative
# (covers the few float32 roundings and fp16's rounding to nearest) and absolute (covers underflow,
# so a stored step is never 0). Derivation in `quantize_kv`'s docstring.
_KV_STEP_MARGIN = {torch.float16: (2.0**-10, 2.0**-24), torch.float32: (2.0**-20, 2.0**-126)}


@functools.cache
def _kv_constants(bits: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(k_lo, k_hi, d, mid) as float32 0-dim tensors: a Python scalar costs a wrap and a cast per
    op (~4 us each here, per layer per step). k_lo = (1 + c) / mid is exact (mid a power of two);
    k_hi = (1 + c) / (qmax - mid) is rounded to float32 once."""
    qmax, mid = 2**bits - 1, 2 ** (bits - 1)
    rel, absolute = _KV_STEP_MARGIN[scale_dtype]
    return tuple(torch.tensor(v, dtype=torch.float32) for v in ((1 + rel) / mid, (1 + rel) / (qmax - mid), absolute, mid))


def quantize_kv(
    x: torch.Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The KV cache's per-token quantizer: the number format of `quantize_groupwise` (asymmetric
    RTN along the last axis, w_hat = (q - mid) * scale + zero), computed in float32 with 15 small
    ops and no host sync, since it runs per layer per decode step. Weights keep
    `quantize_groupwise` (float64, minimal scales), whose shards are pinned.

    x [..., width] (cast to float32) -> (q uint8 [..., width] unpacked codes, scale, zero
    [..., width/group_size] in `scale_dtype`, float16 or float32). With `out` = (q, scale, zero)
    destinations (views are fine) the results are written there and returned, so a static cache
    stores them in place; without it they are allocated. Both ways run the same ops (same bits).

    Per group: lo, hi = min, max; zero = lo + (mid / qmax) (hi - lo) rounded to `scale_dtype`;
    N = max((zero - lo) / mid, (hi - zero) / (qmax - mid)) is the step the stored zero needs;
    scale = fl_sd(max(d + fl32(zero - lo) k_lo, d + fl32(hi - zero) k_hi)) in float32, with
    k_lo = (1 + c) / mid, k_hi = (1 + c) / (qmax - mid) and (c, d) = (2^-10, 2^-24) for float16,
    (2^-20, 2^-126) for float32 (`_KV_STEP_MARGIN`); codes q = round(mid + fl32(x - zero) / scale).

    Guarantees, for a group whose stored scale and zero are finite (x float32, bits <= 8):
    - scale >= N (the margins exceed the float32 evaluation's <= 4 roundings of 2^-24, fp16's
      half-ulp 2^-11 relative and its half subnormal spacing 2^-25; underflow adds at most 2^-148),
      so no code is clipped, and scale > 0 (scale >= 2^-24 for float16). Not much more:
      scale <= N (1 + 2^-9) + 2^-23 for float16, <= N (1 + 2^-19) + 2^-125 for float32.
    - Every element is reconstructed within (1/2 + 2^-15) stored steps:
          |x - ((q - mid) * scale + zero)| <= (1/2 + 2^-15) * scale   (exact arithmetic)
      since t = (x - zero) / scale lies in [-mid, qmax - mid] (scale >= N), mid + t is evaluated in
      float32 within mid * 2^-23 + 2^-17 <= 2^-16 + 2^-17 of its value, and rounding adds 1/2.
      `dequantize_groupwise` in float32 then adds its own rounding, at most
      2^-22 * (|zero| + qmax * scale).
    - A constant group whose value `scale_dtype` represents is reconstructed exactly (t = 0).
    Non-finite input and overflow are not checked (a check would cost a host sync per step) but
    cannot yield finite garbage: a NaN or +-Inf in a group, or a zero / step beyond
    `scale_dtype`'s range (float16: |zero| or N past 65504; values themselves beyond it are fine
    when the group's zero and step fit; float32: hi - lo past 3.4e38), makes that group's stored
    scale or zero non-finite and so every dequantized value of the group NaN or Inf. Its codes are
    then unspecified; other groups are unaffected.
    """
    check_bits(bits)
    width = x.shape[-1]
    check_group_size(width, group_size)
    if scale_dtype not in _KV_STEP_MARGIN:
        raise SplitLLMError(f"KV scales must be float16 or float32, got {scale_dtype}")
    k_lo, k_hi, d, mid = _kv_constants(bits, scale_dtype)
    lead, groups = x.shape[:-1], width // group_size
    if out is None:
        out = (torch.empty(x.shape, dtype=torch.uint8), torch.empty(*lead, groups, dtype=scale_dtype),
               torch.empty(*lead, groups, dtype=scale_dtype))
    q_out, s_out, z_out = out
    # detached: a cache holds codes, never an autograd graph (HF may call it with grad enabled)
    x = x.detach() if x.dtype == torch.float32 else x.detach().float()
    g = x.reshape(*lead, groups, group_size)  # [..., groups, group_size]: a view for the caches' input
    lo, hi = torch.aminmax(g, dim=-1)  # NaN-propagating
    z_out.copy_(torch.lerp(lo, hi, 2 ** (bits - 1) / (2**bits - 1)))  # the cast to scale_dtype rounds to nearest
    z = z_out.float()  # exact
    s_out.copy_(torch.maximum(torch.addcmul(d, z - lo, k_lo), torch.addcmul(d, hi - z, k_hi)))
    t = torch.addcdiv(mid, g - z.unsqueeze(-1), s_out.float().unsqueeze(-1))  # mid + (x - zero) / scale
    # clamp is a no-op for finite groups (mid + t in [0, qmax] up to 2^-15); it keeps +-Inf in range,
    # and NaN becomes a defined code (NaN -> uint8 is undefined, and a packed code past qmax would
    # spill into the next group's bits); the group itself still dequantizes non-finite (its scale/zero)
    q_out.view(*lead, groups, group_size).copy_(t.round_().nan_to_num_(0.0).clamp_(0, 2**bits - 1))
    return q_out, s_out, z_out


def quantize_symmetric_rows(
    w: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric 8-bit RTN (the int8 weight kernel's format): w [N, K] ->
    (q int8 [N, K] in [-127, 127], scale [N] in `scale_dtype`), w_hat = q * scale.

    The stored scale is max|row| / 127 rounded *up* in `scale_dtype`, so no code is clipped and
    every element is within half a step: |w - w_hat| <= scale / 2. An all-zero row gets scale 0
    and codes 0 (exact)."""
    if w.ndim != 2 or w.shape[1] == 0:
        raise SplitLLMError(f"per-row int8 quantization needs a non-empty [rows, cols] matrix, got {tuple(w.shape)}")
    x = w.detach().double()
    if not bool(torch.isfinite(x).all()):
        raise SplitLLMError("cannot quantize a tensor that holds NaN or Inf values")
    scale = _round_up_to(x.abs().amax(dim=-1) / 127, scale_dtype)  # [N]
    if not bool(torch.isfinite(scale).all()):
        raise SplitLLMError(f"value range too large for {scale_dtype} scales")
    s = scale.double().unsqueeze(-1)
    q = torch.where(s > 0, torch.round(x / torch.where(s > 0, s, torch.ones_like(s))), torch.zeros_like(x))
    return q.clamp_(-127, 127).to(torch.int8), scale


def dequantize_symmetric_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_symmetric_rows`: q [N, K], scale [N] -> w_hat = q * scale [N, K] in `dtype`."""
    return q.to(dtype) * scale.to(dtype)[:, None]


def dequantize_groupwise(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of `quantize_groupwise`: q [..., width] codes -> [..., width] in `dtype`. With `out`
    (a [..., width] tensor of `dtype`, a view is fine) the result is written there and returned,
    with no new tensor the size of the result (the codes are read as they are stored: exact)."""
    groups = scale.shape[-1]
    width = q.shape[-1]
    g = q.reshape(*q.shape[:-1], groups, width // groups)  # [..., groups, group_size]
    s = scale.to(dtype).unsqueeze(-1)  # [..., groups, 1]
    if out is None:
        offset = zero.to(dtype).unsqueeze(-1) - 2 ** (bits - 1) * s
        # one fused pass over the big tensor: w = q * s + (zero - mid * s)
        return torch.addcmul(offset, g.to(dtype), s).reshape(q.shape)
    # the same offset in one op (mid * s is exact, one rounding either way): 19 vs 39 us for a
    # 256-token prefix's fp16 scales, which the KV caches dequantize per layer per step
    offset = torch.sub(zero.unsqueeze(-1), s, alpha=2 ** (bits - 1))
    # three in-place passes beat addcmul's out= path (which promotes the int8 codes through a
    # temporary): 46 vs 154 us per layer for a 256-token 8-bit KV prefix, same values
    o = out.view(*out.shape[:-1], groups, width // groups)
    o.copy_(g)
    o.mul_(s).add_(offset)
    return out


def _chunk(bits: int) -> tuple[int, int]:
    """(codes per chunk, bytes per chunk)."""
    chunk_bits = math.lcm(bits, 8)
    return chunk_bits // bits, chunk_bits // 8


def packed_width(n: int, bits: int) -> int:
    """Bytes that `n` codes of `bits` bits occupy after `pack_codes` (padding included)."""
    check_bits(bits)
    per, nbytes = _chunk(bits)
    return -(-n // per) * nbytes


def pack_codes(q: torch.Tensor, bits: int, check_range: bool = True) -> torch.Tensor:
    """Pack codes q [..., n] (values < 2**bits) into uint8 [..., packed_width(n, bits)].
    `check_range=False` skips the range check (two host syncs) for codes in range by construction
    (`quantize_kv`'s, per decode step)."""
    check_bits(bits)
    per, nbytes = _chunk(bits)
    n = q.shape[-1]
    if bits == 8:
        return q.to(torch.uint8).clone()
    # int32 holds a whole chunk (at most 24 bits) and is far faster than int64 here
    x = q.to(torch.int32)
    if check_range and (bool((x < 0).any()) or bool((x >= 2**bits).any())):
        raise SplitLLMError(f"codes out of range for {bits}-bit packing")
    pad = -n % per
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    chunks = (n + pad) // per
    x = x.reshape(*x.shape[:-1], chunks, per)  # [..., chunks, per]
    word = x[..., 0].clone()  # [..., chunks]
    for i in range(1, per):
        word |= x[..., i] << (i * bits)
    out = torch.stack([(word >> (8 * j)) & 0xFF for j in range(nbytes)], dim=-1)  # [..., chunks, nbytes]
    return out.reshape(*q.shape[:-1], chunks * nbytes).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 [..., packed_width(n, bits)] -> uint8 codes [..., n]."""
    check_bits(bits)
    per, nbytes = _chunk(bits)
    if packed.shape[-1] != packed_width(n, bits):
        raise SplitLLMError(
            f"packed width {packed.shape[-1]} does not match {n} codes at {bits} bits"
        )
    if bits == 8:
        return packed.to(torch.uint8).clone()
    chunks = packed.shape[-1] // nbytes
    mask = 2**bits - 1
    if nbytes == 1:  # 2- and 4-bit: every code sits inside one byte, stay in uint8
        word = packed
    else:  # 3-bit: three bytes hold 8 codes
        b = packed.reshape(*packed.shape[:-1], chunks, nbytes).to(torch.int32)  # [..., chunks, 3]
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)  # [..., chunks]
    x = torch.stack([(word >> (i * bits)) & mask for i in range(per)], dim=-1)  # [..., chunks, per]
    return x.reshape(*packed.shape[:-1], chunks * per)[..., :n].to(torch.uint8)
