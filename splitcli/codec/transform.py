"""Orthogonal rotation known to both ends: a seeded randomized Hadamard transform (not in the paper).

Why: TAB-Q gives a token one step size for all its channels, and on SmolLM2 a few channels set
every token's range, so at 3-4 bits most channels land on one or two levels. Rotating T_below by
an orthogonal R spreads those channels' energy over all of them (each rotated coordinate is a
signed mix of many channels), so a token's range shrinks to a few of its RMS and a narrow code
resolves every direction equally. R is orthogonal, so the L2 error of the reconstruction is the
L2 error in the rotated domain, and R^-1 = R^T: the cloud inverts it exactly up to float rounding.
Nothing crosses the wire but the seed (one u32 in the frame header).

Construction for any hidden size n = a * b with b the largest power of two dividing n:
    R = (Q_a ⊗ H_b) · diag(signs)
- signs: ±1 per channel from a numpy PCG64 stream seeded with `seed` (the "randomized" part:
  it decorrelates the fixed Hadamard pattern from the model's channel layout);
- H_b: the normalized Walsh-Hadamard matrix of size b, applied as a Kronecker product of
  Hadamard factors of at most 64 (so n = 4096 costs two 64 x 64 matrix products per token);
- Q_a: the orthonormal DCT-II matrix of size a (a = 9 at hidden 576 = 9 * 64), which mixes the
  a blocks so that a channel's energy reaches all n coordinates, not only its own block.
a is capped (MAX_ODD_FACTOR): a hidden size whose odd part is larger has no rotation.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from splitcli.errors import SplitLLMError

#: Largest odd factor a of the hidden size handled by the dense DCT factor (a x a floats).
MAX_ODD_FACTOR = 1024
#: Largest Hadamard factor applied as one dense matrix product.
_MAX_H_FACTOR = 64


def _hadamard(m: int) -> np.ndarray:
    """Normalized Sylvester Hadamard matrix of size m (a power of two), float32 [m, m]."""
    h = np.ones((1, 1), np.float64)
    while h.shape[0] < m:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(m)).astype(np.float32)


def _dct(a: int) -> np.ndarray:
    """Orthonormal DCT-II matrix of size a, float32 [a, a] (rows = frequencies)."""
    k = np.arange(a)[:, None]
    i = np.arange(a)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * a)) * np.sqrt(2.0 / a)
    m[0] /= np.sqrt(2.0)
    return m.astype(np.float32)


def factor(n: int) -> tuple[int, list[int]]:
    """(a, [b1, b2, ...]): n = a * prod(b_i), a odd, each b_i a power of two <= 64."""
    if n < 1:
        raise SplitLLMError(f"rotation needs a hidden size >= 1, got {n}")
    b = n & -n                                       # largest power of two dividing n
    a = n // b
    parts = []
    while b > 1:
        f = min(b, _MAX_H_FACTOR)
        parts.append(f)
        b //= f
    return a, parts


def rotation_supported(n: int) -> bool:
    return n >= 1 and factor(n)[0] <= MAX_ODD_FACTOR


@lru_cache(maxsize=16)
def _plan(n: int, seed: int) -> tuple[np.ndarray, np.ndarray | None, tuple[np.ndarray, ...], tuple[int, ...]]:
    # cached: the decode-step path rotates one token at a time and must not rebuild matrices
    if not rotation_supported(n):
        raise SplitLLMError(f"hidden size {n} has an odd factor {factor(n)[0]} > {MAX_ODD_FACTOR}: "
                            "the Hadamard rotation does not support it (use rotation none)")
    a, parts = factor(n)
    signs = np.where(np.random.Generator(np.random.PCG64(seed)).integers(0, 2, n) == 1,
                     np.float32(1), np.float32(-1)).astype(np.float32)
    return signs, (_dct(a) if a > 1 else None), tuple(_hadamard(f) for f in parts), (a, *parts)


def _apply(y: np.ndarray, q: np.ndarray | None, hs: tuple[np.ndarray, ...], dims: tuple[int, ...],
           transpose: bool) -> np.ndarray:
    """Multiply every row of y [T, n] by Q_a ⊗ H_b1 ⊗ H_b2 ... (or its transpose). The factors act
    on separate axes of y viewed as [T, a, b1, b2, ...], so they commute; each is one matrix
    product on a contiguous view (Sylvester Hadamard matrices are symmetric: H^T = H). float32
    BLAS: the last bit may depend on the BLAS's summation order (so golden frames pin hidden = 64,
    where every sum of dyadic inputs is exact)."""
    t = y.shape[0]
    a = dims[0]
    b = y.shape[1] // a
    z = np.ascontiguousarray(y, dtype=np.float32).reshape(t * a, b)               # [T a, b]
    if len(hs) == 1:
        z = z @ hs[0]
    elif len(hs) == 2:                                                             # b = b1 b2
        z = np.matmul(hs[0], z.reshape(t * a, dims[1], dims[2]) @ hs[1]).reshape(t * a, b)
    elif hs:                                                                       # b > 64^2: rare
        w = z.reshape(t * a, *dims[1:])
        for axis, m in enumerate(hs, start=1):
            w = np.moveaxis(np.tensordot(w, m, axes=([axis], [0])), -1, axis)
        z = w.reshape(t * a, b)
    if q is not None:
        m = q.T if transpose else q
        zt = z.reshape(t, a, b).transpose(1, 0, 2).reshape(a, t * b)              # [a, T b]
        z = (m @ zt).reshape(a, t, b).transpose(1, 0, 2)                          # [T, a, b]
    return np.ascontiguousarray(z, dtype=np.float32).reshape(t, a * b)


def rotate(x: np.ndarray, seed: int) -> np.ndarray:
    """R x for every row of x [T, n] float32 -> [T, n] float32 (the edge side)."""
    signs, q, hs, dims = _plan(x.shape[1], seed)
    return _apply(x * signs, q, hs, dims, transpose=False)


def unrotate(y: np.ndarray, seed: int) -> np.ndarray:
    """R^T y for every row of y [T, n] float32 -> [T, n] float32 (the cloud side): rotate's inverse."""
    signs, q, hs, dims = _plan(y.shape[1], seed)
    return _apply(y, q, hs, dims, transpose=True) * signs
