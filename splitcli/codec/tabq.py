"""TAB-Q: token-wise adaptive-bit asymmetric integer quantization (paper eqs. 5-7, Algorithm 1).

How the paper was read (it is ambiguous in places):

- Bit width Q counts the sign bit. A Q-bit code is one sign bit plus an unsigned magnitude level
  in [0, Qmax] with Qmax = 2^(Q-1) - 1 (eq. 6), so a token at width Q costs exactly Q bits per
  value before entropy coding. Sign and magnitude travel together as one symbol in [0, 2^Q):
  symbol = Qmax + 1 + level for x >= 0 and Qmax - level for x < 0. A negative value whose level
  reconstructs to exactly 0 is sent as +0 (its sign carries no information).
- AIQ (eqs. 5-6) quantizes the token's magnitudes |T_below| with s = (T_max - T_min) / Qmax and
  level = round(|T|/s + z). Eq. 6's z = round(T_min/s) together with eq. 5's "+ z" would push
  T_min to level 2·T_min/s, outside [0, Qmax]; we read the zero point with the sign that makes
  eq. 7's (level - z)·s the inverse: z = -round(T_min/s), so T_min maps to level 0.
- The distortion δ of Algorithm 1 line 10 compares integer codes of two widths, which is about
  half a level for almost any input and does not bound any error a user can rely on. We measure
  δ against the *original* values instead: δ(Q) = ||T̃_Q - T_below||_2 / ||T_below||_2 per token,
  the relative L2 reconstruction error of that token's TAB-Q part at width Q (0 for an all-zero
  token). Tolerance Δ is in the same unit (e.g. 0.05 = 5%).
- Width search: start at Q̄ and lower Q one bit at a time while δ(Q) <= Δ; the chosen width is
  the LAST Q that kept δ <= Δ (the listing returns the first Q that broke it, which would exceed
  the tolerance). Q never goes below `q_min`. If even Q̄ breaks Δ the token keeps Q̄: Q̄ is a
  hard cap on bits, Δ a target. So either δ(chosen) <= Δ or chosen == Q̄ (up to float32
  rounding of the reconstruction, ~1e-6 relative).

Numerics: each token is divided by its max magnitude first so that huge inputs (up to the
float32 limit) do not overflow the error sums; s is clamped to >= 2^-20 of that max so that
|z| <= 2^20 and (level - z) stays exact in float32 (this also makes constant tokens exact), and
to the smallest normal float32, so tokens whose magnitudes are all below ~1e-32 reconstruct
coarsely (they keep Q̄ and report their true δ).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MIN_REL_SCALE = np.float32(2.0 ** -20)


@dataclass(frozen=True)
class TabQ:
    """Per-token quantization result. Symbols pack sign and level (see module docstring)."""

    widths: np.ndarray      # [tokens] uint8: chosen Q per token (sign bit included)
    scales: np.ndarray      # [tokens] float32: s per token, in the input's units
    zeros: np.ndarray       # [tokens] int32: z per token (<= 0)
    symbols: np.ndarray     # [tokens, hidden] uint8 in [0, 2^Q)
    distortion: np.ndarray  # [tokens] float32: δ at the chosen width


def q_max(q: np.ndarray | int) -> np.ndarray | int:
    """Largest magnitude level of a Q-bit code with one sign bit (eq. 6)."""
    return (1 << (np.asarray(q, np.int32) - 1)) - 1 if isinstance(q, np.ndarray) else (1 << (q - 1)) - 1


def _aiq_unit(u: np.ndarray, umin: np.ndarray, qmax: np.ndarray | int, s_floor: np.ndarray):
    """AIQ of magnitudes u in [0, 1] (rows already divided by their max), eqs. 5-6."""
    s = np.maximum((np.float32(1) - umin) / np.float32(qmax), s_floor)          # [tokens]
    z = -np.rint(umin / s)                                                     # [tokens]
    level = np.rint(u / s[:, None] + z[:, None])                              # [tokens, hidden]
    np.clip(level, 0, np.asarray(qmax, np.float32)[..., None] if isinstance(qmax, np.ndarray) else qmax,
            out=level)
    return level, s, z


def _rel_error(level, s, z, u, norm):
    rec = (level - z[:, None]) * s[:, None]
    rec -= u
    err = np.sqrt(np.einsum("ij,ij->i", rec, rec))
    return np.divide(err, norm, out=np.zeros_like(err), where=norm > 0)


def tab_q(below: np.ndarray, q_bar: int, q_min: int, delta: float) -> TabQ:
    """Algorithm 1 on T_below [tokens, hidden] float32 (finite). See the module docstring."""
    mag = np.abs(below)                                          # [tokens, hidden]
    tmax = mag.max(axis=1) if mag.shape[1] else np.zeros(mag.shape[0], np.float32)
    tmax = np.where(tmax > 0, tmax, np.float32(1)).astype(np.float32)
    u = mag / tmax[:, None]                                      # [tokens, hidden] in [0, 1]
    umin = u.min(axis=1) if u.shape[1] else np.zeros(u.shape[0], np.float32)
    norm = np.sqrt(np.einsum("ij,ij->i", u, u))                  # [tokens]
    # the scale sent is s * tmax in float32: keep it a normal float so that what the decoder
    # rebuilds is what δ was measured on (matters only for tokens below ~1e-32)
    s_floor = np.maximum(_MIN_REL_SCALE, np.finfo(np.float32).tiny / tmax)    # [tokens]

    widths = np.full(u.shape[0], q_bar, np.uint8)
    level, s, z = _aiq_unit(u, umin, q_max(q_bar), s_floor)
    distortion = _rel_error(level, s, z, u, norm).astype(np.float32)
    alive = np.arange(u.shape[0])        # tokens whose every width so far kept δ <= Δ
    for q in range(q_bar - 1, q_min - 1, -1):
        if alive.size == 0:
            break
        ua, umina = u[alive], umin[alive]
        lv, sa, za = _aiq_unit(ua, umina, q_max(q), s_floor[alive])
        err = _rel_error(lv, sa, za, ua, norm[alive])
        ok = err <= delta
        alive = alive[ok]
        widths[alive] = q
        distortion[alive] = err[ok]

    changed = np.flatnonzero(widths != q_bar)   # the Q̄ pass above already quantized the rest
    if changed.size:
        lv, sc, zc = _aiq_unit(u[changed], umin[changed], q_max(widths[changed]), s_floor[changed])
        level[changed], s[changed], z[changed] = lv, sc, zc
    level8 = level.astype(np.uint8)                              # [tokens, hidden]
    # level - z > 0 with z <= 0: a nonzero level, or a token whose zero point lifts level 0
    negative = (below < 0) & ((level8 > 0) | (z < 0)[:, None])
    qm = q_max(widths).astype(np.uint8)[:, None]                 # [tokens, 1]
    symbols = np.where(negative, qm - level8, qm + 1 + level8)
    return TabQ(widths=widths, scales=(s * tmax).astype(np.float32), zeros=z.astype(np.int32),
                symbols=symbols, distortion=distortion)


def reconstruct(symbols: np.ndarray, widths: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """Eq. 7 without T_above: sign · (level - z) · s, float32 [tokens, hidden]."""
    qm = q_max(widths.astype(np.int32)).astype(np.float32)[:, None]   # [tokens, 1]
    sym = symbols.astype(np.float32)
    positive = sym > qm
    level = np.where(positive, sym - qm - 1, qm - sym)
    mag = (level - zeros.astype(np.float32)[:, None]) * scales[:, None]
    return np.where(positive, mag, -mag)
