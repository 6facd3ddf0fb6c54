"""Exact top-k of a large product x @ W.T for one input row, reading an 8-bit copy of W instead
of W: the LM head of a greedy decode step.

Why: the LM head is the largest weight a decode step reads (SmolLM2: 49152 x 576 fp32, 113 MB,
a fifth of the model), yet greedy decoding needs only its largest entry and a server's top-k
reply only k of them. `Int8Screen` reads per-row int8 codes of W (a quarter of the bytes) on
splitllm's 8-bit kernel, bounds each row's error rigorously, and computes in float32 only the rows
whose bound reaches the k-th largest value found. Every row it skips is provably below that value,
so the top k (indices and float32 values, ties included) are those of the float product of the
kept rows; measured on SmolLM2-135M over 512 WikiText-2 positions: 2 rows kept for top-1 (median;
at most 18), 178 for top-64 (at most 338).

The bound, for row j with float32 weights w, codes q, bf16 scale s (w_hat = q s, symmetric RTN
per row, `_quantize_rows`) and the kernel's input rounding x = sx_g x16 + r per group g of 64
inputs (`kernels.c`: x16 = round(x 32767 / max|x_g|), sx_g = max|x_g| / 32767):
    x.w = S_exact + x.(w - w_hat) + s sum_i r_i q_i,   S_exact = s sum_g sx_g (x16_g . q_g)
    |x.(w - w_hat)|      <= E_j ||x||_1                 E_j = max_i |w_i - w_hat_i| (~ s / 2)
    |s sum r_i q_i|       <= 0.51 max_g sx_g ||w_hat||_1 (|r_i| <= 0.506 sx_g: half a step plus the
                                                        float roundings of the scale, its inverse
                                                        and x * inverse; 0.5038 seen)
    |S - S_exact|         <= (K/64 + 5) 1.01 u 127 s (||x||_1 + 0.51 K max_g sx_g)
                             (the kernel's int32 -> float conversions, one FMA per group, the
                             horizontal sum and the scale: at most K/64 + 5 roundings of u = 2^-24
                             on terms bounded by 127 s sx_g |x16_i|)
    |R_j - x.w|           <= 1.01 K u M_j ||x||_1        for the float32 value R_j of the row in any
                                                        summation order (M_j = max_i |w_i|)
so R_j <= S_j + e_j with e_j = a_j ||x||_1 + b_j max_g sx_g, whatever order R_j is summed in.
The threshold T is a lower bound of the k largest rows' values in any order too: with the k rows
of largest S_j computed, T = min (R_j - 2.02 K u M_j ||x||_1). A skipped row then lies below k
kept rows however either is summed, so the kept rows' products (any kernel, any order) decide.
The coefficients are computed in float64 and stored rounded up; e and the margin are computed in
float32 and multiplied by 1 + 2^-4, which covers their own roundings (l1's sum: K u relative) and
the roundings of S + e and R - margin: both margins hold 1.01 K u M_j ||x||_1 >= 64 u |S_j| / 1.02
(K >= 64; |S_j|, |R_j| <= 1.01 M_j ||x||_1), so a sixteenth of them exceeds u |S_j| + u e_j. An
absolute (2 K + K/64 + 16) 2^-126 is added to both for roundings near and below the smallest
normal float (flush-to-zero included), where relative bounds say nothing. Inputs whose products
could overflow (||x||_1 max|W| >= 2^100) are declined, as are weights whose coefficients do not
fit float32.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..errors import SplitLLMError
from . import kernels

_U = 2.0**-24  # float32 unit roundoff
_ROWS_PER_BUILD_CHUNK = 4096  # rows quantized at a time (float32 temporaries of 4096 x K: ~10 MB at K = 576)


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [n, K] float32 -> (codes [n, K] int8, scales [n] bf16, E [n] float64 >= max_i |w_i - q_i s|).

    The format of `rtn.quantize_symmetric_rows`, computed in float32 (4-5x faster than its float64;
    the screen is built at run time): a scale rounded down in bf16 can clip a code at 127, and a
    code may round the other way than in float64, which only enlarges E, measured from the codes
    themselves. q s is exact in float32 (8 x 8 significant bits) but where it is subnormal; E is
    the float32 |w - q s| rounded up by a relative 2^-20 and an absolute 2^-140, which covers the
    one rounding of the difference and those subnormal products."""
    amax = w.abs().amax(-1)  # [n]
    s = (amax / 127).to(torch.bfloat16)
    sf = s.float()[:, None]
    q = torch.where(sf > 0, torch.round(w / torch.where(sf > 0, sf, 1.0)), 0.0).clamp_(-127, 127)
    err = (w - q * sf).abs_().amax(-1).double()
    return q.to(torch.int8), s, err * (1 + 2.0**-20) + 2.0**-140


class Int8Screen:
    """The screen of a float32 weight W [V, K] (any strides: it is read, never kept). Built in
    0.4-0.7 s for SmolLM2's 49152 x 576 head on one core of this host."""

    def __init__(self, weight: torch.Tensor):
        if weight.ndim != 2 or weight.dtype != torch.float32 or not kernels.supports8(weight.shape[1]):
            raise SplitLLMError(f"an int8 screen needs a float32 [rows, cols] weight with cols divisible by 64, "
                                f"got {tuple(weight.shape)} {weight.dtype}")
        v, k = weight.shape
        self.rows, self.cols = v, k
        self.codes = torch.empty(v, k, dtype=torch.int8)  # [V, K]
        self.scales = torch.empty(v, dtype=torch.bfloat16)  # [V]
        coef = torch.empty(v, 3, dtype=torch.float64)  # [V, (a, b, m)]
        roundings = (k // 64 + 5) * 1.01 * _U * 127
        with torch.no_grad():
            for r0 in range(0, v, _ROWS_PER_BUILD_CHUNK):
                w = weight[r0:r0 + _ROWS_PER_BUILD_CHUNK].detach()  # [n, K]
                if not bool(torch.isfinite(w).all()):
                    raise SplitLLMError("cannot screen a weight that holds NaN or Inf values")
                q, s, err = _quantize_rows(w)
                n, s64 = len(q), s.double()  # [n]
                # any float32 order's error per unit of ||x||_1 (max |w_i| is exact in float32)
                order = 1.01 * k * _U * w.abs().amax(-1).double()
                c = roundings * s64  # the kernel's roundings per unit of (||x||_1 + 0.51 K max sx)
                w_hat_l1 = s64 * q.abs().sum(-1, dtype=torch.int32).double()  # ||q s||_1, exact sum of codes
                coef[r0:r0 + n, 0] = err + c + order
                coef[r0:r0 + n, 1] = 0.51 * w_hat_l1 + 0.51 * k * c
                coef[r0:r0 + n, 2] = 2 * order
                self.codes[r0:r0 + n] = q
                self.scales[r0:r0 + n] = s
        up = coef.float()
        up = torch.where(up.double() < coef, torch.nextafter(up, torch.tensor(float("inf"))), up)
        if not bool(torch.isfinite(up).all()):  # weights near float32's limit: e would be inf or NaN
            raise SplitLLMError("the weight's error bounds do not fit float32: no screen")
        self.a, self.b, self.m = (up[:, i].contiguous() for i in range(3))  # [V] each
        self.w_max = float(coef[:, 2].max()) / (2.02 * k * _U) if v else 0.0  # max |W|
        self.tiny = (2 * k + k // 64 + 16) * 2.0**-126  # absolute slack (module docstring)

    @property
    def nbytes(self) -> int:
        """Bytes read by one screened product (codes, scales, bound coefficients)."""
        return self.codes.numel() + 10 * self.rows

    def top(self, x: torch.Tensor, k: int, weight: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """x [K] float32, the product's weight [V, K] (the float rows to compute) -> (logits [V]
        float32 holding x @ weight[j] for every row j that can be among the k largest and -inf
        for every other row, number of rows computed), or None where the screen cannot decide
        (the kernels are unavailable, or x holds NaN / inf / magnitudes the kernel leaves to
        float: the caller then computes the whole product)."""
        if not 1 <= k <= self.rows:
            raise SplitLLMError(f"top-k needs 1 <= k <= {self.rows}, got {k}")
        if not kernels.available() or x.shape != (self.cols,):
            return None
        x = x.detach().float().contiguous()
        screened = kernels.mm8_screen(x, self.codes, self.scales)  # [V] or None (x left to float)
        if screened is None:
            return None
        l1, amax = kernels.abs_stats(x)
        if l1 * self.w_max >= 2.0**100:  # products could overflow in some summation order
            return None
        first = screened.topk(k).indices if k > 1 else torch.tensor([kernels.argmax(screened)])  # [k]
        # keep = rows with screened + e >= T, e = (a ||x||_1 + b max|x| / 32767) slack + tiny and
        # T = min over `first` of (R - m ||x||_1 slack) - tiny, in float32 (one C pass; screened -> -inf)
        keep = kernels.screen_keep(screened, self.a, self.b, l1, amax / 32767, 1 + 2.0**-4, self.tiny,
                                   _product(x, weight, first), self.m[first])  # [C]
        if keep is None:  # a non-finite threshold
            return None
        if keep.numel() < k:  # cannot happen when the bound holds; the caller computes every row
            return None
        if 4 * keep.numel() > self.rows:  # e.g. x = 0: every row ties; one full product is cheaper
            return F.linear(x, weight), self.rows
        screened[keep] = _product(x, weight, keep)  # the rest are -inf
        return screened, int(keep.numel())


def _product(x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [K] @ weight[rows].T -> [C], with the rows gathered in the weight's own memory order (the
    fast path's head is a [V, K] view of [K, V] storage: its columns are gathered into [K, C]).
    Why: the float product then sums each row as the whole product does; on this host the values
    are bit for bit the full head's (MKL, C from 1 to 321 rows tested), where rows copied into
    [C, K] differ by up to 1e-5. Either way every value is a float32 product of its row."""
    if weight.stride(0) == 1 and weight.stride(1) != 1:  # column-major [V, K]
        part = weight.t()[:, rows].contiguous().t()  # [C, K] view of [K, C]
    else:
        part = weight[rows]
    return F.linear(x, part)
