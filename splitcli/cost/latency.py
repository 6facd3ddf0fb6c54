"""Latency model of the link and the edge: the paper's eqs. (9)-(11) and (13).

Units: rates R in bit/s, bandwidth W in Hz, SNR gamma linear (not dB), payloads D_tx in bits
(`total_latency` takes bytes and says so), times in seconds.

How the paper was read:
- Eq. (9) retransmits until the residual outage is below eps: n = ceil(ln eps / ln P_o(R)) tries.
  At least one transmission is always needed, so n >= 1 even when P_o underflows to 0; when
  P_o = 1 (the rate is far above capacity) no number of tries suffices and the latency is inf.
  The ratio is snapped to an integer when it is within 1e-9 (relative) of one, so that
  float noise in logarithms does not add a whole extra transmission.
- Eq. (13) as printed minimizes g(R) = ln(1/P_o(R)) / R. That g decreases monotonically in R
  (the numerator falls, the denominator grows), so its argmin is always the upper end R_max, where
  the outage is worst: the printed g is a slip. The worst-case delay per bit is
  L_eps / D_tx = ceil(ln(1/eps) / ln(1/P_o)) / R, which without the ceiling is
  ln(1/eps) * 1 / (R ln(1/P_o(R))); so `optimal_rate` minimizes h(R) = 1 / (R ln(1/P_o(R)))
  (or, given eps, the exact per-bit delay with the ceiling). `g_paper` keeps the printed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from splitcli.errors import SplitLLMError

_LN2 = math.log(2.0)


def _check_link(bandwidth_hz: float, snr: float) -> None:
    if not (math.isfinite(bandwidth_hz) and bandwidth_hz > 0):
        raise SplitLLMError(f"bandwidth W must be a finite number of Hz > 0, got {bandwidth_hz!r}")
    if not (math.isfinite(snr) and snr > 0):
        raise SplitLLMError(f"SNR gamma must be a finite linear ratio > 0, got {snr!r}")


def _check_rate(rate: float) -> None:
    if not (isinstance(rate, (int, float)) and not math.isnan(rate) and rate > 0):
        raise SplitLLMError(f"rate R must be > 0 bit/s, got {rate!r}")


def _check_eps(eps: float) -> None:
    if not (math.isfinite(eps) and 0 < eps < 1):
        raise SplitLLMError(f"outage target eps must lie in (0, 1), got {eps!r}")


def _outage_exponent(rate: float, bandwidth_hz: float, snr: float) -> float:
    """x = (2^(R/W) - 1) / gamma, so that P_o = 1 - exp(-x); inf when 2^(R/W) overflows."""
    power = rate / bandwidth_hz * _LN2
    if power > 700.0:
        return math.inf
    return math.expm1(power) / snr


def outage_probability(rate: float, bandwidth_hz: float, snr: float) -> float:
    """Eq. (10): P_o(R) = 1 - exp(-(2^(R/W) - 1) / gamma) for a Rayleigh-fading link."""
    _check_rate(rate)
    _check_link(bandwidth_hz, snr)
    if math.isinf(rate):
        return 1.0
    return -math.expm1(-_outage_exponent(rate, bandwidth_hz, snr))


def log_inv_outage(rate: float, bandwidth_hz: float, snr: float) -> float:
    """ln(1 / P_o(R)), computed without cancellation at both ends (inf when P_o = 0, 0 when 1)."""
    _check_rate(rate)
    _check_link(bandwidth_hz, snr)
    if math.isinf(rate):
        return 0.0
    x = _outage_exponent(rate, bandwidth_hz, snr)
    if x == 0.0:
        return math.inf
    if x > 1.0:
        return -math.log1p(-math.exp(-x))
    return -math.log(-math.expm1(-x))


def transmissions_needed(log_inv_p_o: float, eps: float) -> float:
    """ceil(ln eps / ln P_o) tries (>= 1), from ln(1/P_o); inf when P_o = 1."""
    _check_eps(eps)
    if log_inv_p_o <= 0.0:
        return math.inf
    ratio = math.log(1.0 / eps) / log_inv_p_o
    if not math.isfinite(ratio):
        return math.inf
    nearest = round(ratio)
    if nearest >= 1 and abs(ratio - nearest) <= 1e-9 * nearest:
        return float(nearest)
    return float(max(1, math.ceil(ratio)))


def outage_latency(d_tx_bits: float, rate: float, bandwidth_hz: float, snr: float, eps: float) -> float:
    """Eq. (9): L_eps(D_tx; R) = D_tx / R * ceil(ln eps / ln P_o(R)), seconds (D_tx in bits)."""
    if not (math.isfinite(d_tx_bits) and d_tx_bits >= 0):
        raise SplitLLMError(f"payload D_tx must be a finite number of bits >= 0, got {d_tx_bits!r}")
    tries = transmissions_needed(log_inv_outage(rate, bandwidth_hz, snr), eps)
    if d_tx_bits == 0:
        return 0.0
    return d_tx_bits / rate * tries


def g_paper(rate: float, bandwidth_hz: float, snr: float) -> float:
    """The paper's printed g(R) = ln(1/P_o(R)) / R (monotone decreasing; see module docstring)."""
    return log_inv_outage(rate, bandwidth_hz, snr) / rate


def delay_per_bit(rate: float, bandwidth_hz: float, snr: float, eps: float | None = None) -> float:
    """Objective of eq. (13) as used here: worst-case seconds per payload bit at rate R.

    eps None: the smooth form h(R) = 1 / (R ln(1/P_o(R))) (= L_eps / (D_tx ln(1/eps)) without the
    ceiling). eps given: the exact ceil(ln eps / ln P_o) / R.
    """
    rate = float(rate)
    log_inv = log_inv_outage(rate, bandwidth_hz, snr)
    if eps is not None:
        return transmissions_needed(log_inv, eps) / rate
    product = rate * log_inv
    if product < 1e-300:
        return math.inf
    return 1.0 / product


def _exact_breakpoints(bandwidth_hz: float, snr: float, eps: float, r_min: float, r_max: float,
                       max_tries: int = 100_000) -> list[float]:
    """Rates in [r_min, r_max] where the ceiling in eq. (9) steps up: P_o(R_n) = eps^(1/n).

    On each piece the number of tries n is constant and the delay per bit n / R falls with R, so
    the exact optimum sits at the right end of a piece (some R_n) or at r_max.
    """
    rates = []
    log_eps = math.log(eps)
    for n in range(1, max_tries + 1):
        p_n = math.exp(log_eps / n)  # the largest outage that n tries can afford
        if p_n >= 1.0:
            break
        r_n = bandwidth_hz * math.log2(1.0 + snr * -math.log1p(-p_n))
        if r_n > r_max:
            break
        if r_n >= r_min:
            rates.append(r_n)
    return rates


def optimal_rate(
    bandwidth_hz: float,
    snr: float,
    r_min: float,
    r_max: float,
    eps: float | None = None,
    grid_points: int = 513,
) -> float:
    """Eq. (13): R* = argmin over [r_min, r_max] of `delay_per_bit` (bit/s).

    Smooth objective (eps None): it need not be convex in general, so a log-spaced grid picks the
    best cell first and a bounded scalar minimization refines within the neighbouring cells; the
    better of the two points wins, so the answer is never worse than the grid's best.
    Exact objective (eps given): piecewise n / R, minimized exactly over the breakpoints where
    the number of tries n changes (plus both ends), since a grid misses the narrow best piece.
    """
    _check_link(bandwidth_hz, snr)
    if not (math.isfinite(r_min) and r_min > 0):
        raise SplitLLMError(f"R_min must be a finite rate > 0 bit/s, got {r_min!r}")
    if not (math.isfinite(r_max) and r_max >= r_min):
        raise SplitLLMError(f"R_max must be a finite rate >= R_min ({r_min}), got {r_max!r}")
    if grid_points < 3:
        raise SplitLLMError(f"grid_points must be >= 3, got {grid_points}")
    if r_max == r_min:
        return float(r_min)

    def objective(rate: float) -> float:
        return delay_per_bit(float(rate), bandwidth_hz, snr, eps)

    if eps is not None:
        _check_eps(eps)
        candidates = [r_min, *_exact_breakpoints(bandwidth_hz, snr, eps, r_min, r_max), r_max]
        # The breakpoint itself may land a hair above the piece in floating point; nudge down.
        candidates += [r * (1 - 1e-12) for r in candidates[1:-1]]
        return float(min(candidates, key=lambda r: (objective(r), -r)))

    grid = np.geomspace(r_min, r_max, grid_points)  # [grid_points]
    values = np.array([objective(r) for r in grid])  # [grid_points]
    best = int(np.argmin(values))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, grid_points - 1)]
    candidate_rate, candidate_value = float(grid[best]), float(values[best])
    if math.isfinite(candidate_value):
        refined = minimize_scalar(objective, bounds=(lo, hi), method="bounded",
                                  options={"xatol": 1e-9 * hi})
        if refined.success and float(refined.fun) < candidate_value:
            candidate_rate = float(refined.x)
    return candidate_rate


def total_latency(
    compute_s: float, io_bytes: float, rate: float, bandwidth_hz: float, snr: float, eps: float
) -> float:
    """Eq. (11): L_t = L_c(w) + L_eps(B_io, R); `io_bytes` is converted to bits here."""
    if not (math.isfinite(compute_s) and compute_s >= 0):
        raise SplitLLMError(f"compute time L_c must be finite seconds >= 0, got {compute_s!r}")
    return compute_s + outage_latency(8.0 * io_bytes, rate, bandwidth_hz, snr, eps)


@dataclass(frozen=True)
class LinkModel:
    """A Rayleigh link: bandwidth W (Hz), mean SNR gamma (linear) and outage target eps."""

    bandwidth_hz: float
    snr: float
    eps: float

    def __post_init__(self) -> None:
        _check_link(self.bandwidth_hz, self.snr)
        _check_eps(self.eps)

    def comm_seconds(self, io_bytes: float, rate: float) -> float:
        """L_eps for `io_bytes` at rate R (eq. 9)."""
        return outage_latency(8.0 * io_bytes, rate, self.bandwidth_hz, self.snr, self.eps)

    def step_seconds(self, compute_s: float, io_bytes: float, rate: float) -> float:
        """L_t for one step (eq. 11)."""
        return total_latency(compute_s, io_bytes, rate, self.bandwidth_hz, self.snr, self.eps)

    def optimal_rate(self, r_min: float, r_max: float, exact: bool = True) -> float:
        """R* on [r_min, r_max] (eq. 13); `exact` keeps the ceiling of eq. (9)."""
        return optimal_rate(self.bandwidth_hz, self.snr, r_min, r_max, self.eps if exact else None)
