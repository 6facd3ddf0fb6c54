import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitcli.cost.latency import (
    LinkModel, delay_per_bit, g_paper, log_inv_outage, optimal_rate, outage_latency,
    outage_probability, total_latency, transmissions_needed,
)
from splitcli.errors import SplitLLMError


def test_eq10_hand_values():
    # R = W, gamma = 1: 2^1 - 1 = 1, P_o = 1 - e^-1.
    assert outage_probability(1e6, 1e6, 1.0) == pytest.approx(1 - math.exp(-1), rel=1e-15)
    # R = 2W, gamma = 3: (4 - 1) / 3 = 1 again.
    assert outage_probability(2e6, 1e6, 3.0) == pytest.approx(1 - math.exp(-1), rel=1e-15)
    # Tiny rate: P_o ~ R ln2 / (W gamma), no cancellation to 0.
    assert outage_probability(1e-3, 1e6, 10.0) == pytest.approx(1e-3 * math.log(2) / 1e7, rel=1e-6)


def test_eq10_extremes():
    assert outage_probability(1e9, 1e6, 10.0) == 1.0  # 2^1000 overflows: certain outage
    assert log_inv_outage(1e9, 1e6, 10.0) == 0.0
    assert log_inv_outage(5e-324, 1e6, 1e300) == math.inf  # P_o underflows to 0
    for bad_rate in (0.0, -1.0, math.nan):
        with pytest.raises(SplitLLMError, match="rate"):
            outage_probability(bad_rate, 1e6, 10.0)
    with pytest.raises(SplitLLMError, match="bandwidth"):
        outage_probability(1.0, 0.0, 10.0)
    with pytest.raises(SplitLLMError, match="SNR"):
        outage_probability(1.0, 1e6, -1.0)


def test_eq9_hand_values():
    # R = W = 1 Mbit/s, gamma = 1, eps = 0.01: ln 0.01 / ln(1 - e^-1) = 10.04 -> 11 tries.
    assert outage_latency(1e6, 1e6, 1e6, 1.0, 0.01) == pytest.approx(11.0, rel=1e-12)
    # P_o = 0.1 exactly, eps = 0.01: ratio is exactly 2 -> 2 tries, not 3 from float noise.
    rate = 1e6 * math.log2(1 - math.log(0.9))
    assert outage_probability(rate, 1e6, 1.0) == pytest.approx(0.1, rel=1e-12)
    assert outage_latency(8000, rate, 1e6, 1.0, 0.01) == pytest.approx(8000 / rate * 2, rel=1e-12)
    assert outage_latency(0, 1e6, 1e6, 1.0, 0.01) == 0.0


def test_transmissions_edges():
    assert transmissions_needed(math.inf, 0.01) == 1.0  # P_o = 0: one try
    assert transmissions_needed(1e3, 0.01) == 1.0  # P_o tiny: still one try
    assert transmissions_needed(0.0, 0.01) == math.inf  # P_o = 1: never
    assert transmissions_needed(5e-324, 0.01) == math.inf
    for bad in (0.0, 1.0, -0.1, math.nan):
        with pytest.raises(SplitLLMError, match="eps"):
            transmissions_needed(1.0, bad)
    assert outage_latency(1.0, 1e9, 1e6, 10.0, 0.01) == math.inf


def test_eq11_adds_compute():
    comm = outage_latency(8 * 1000, 1e6, 1e6, 1.0, 0.01)
    assert total_latency(0.25, 1000, 1e6, 1e6, 1.0, 0.01) == pytest.approx(0.25 + comm, rel=1e-15)
    with pytest.raises(SplitLLMError):
        total_latency(-1.0, 1000, 1e6, 1e6, 1.0, 0.01)
    link = LinkModel(1e6, 1.0, 0.01)
    assert link.step_seconds(0.25, 1000, 1e6) == total_latency(0.25, 1000, 1e6, 1e6, 1.0, 0.01)
    assert link.comm_seconds(1000, 1e6) == comm
    with pytest.raises(SplitLLMError):
        LinkModel(1e6, 1.0, 1.5)


def test_paper_g_is_monotone_decreasing():
    """Why eq. (13) is not minimized as printed: g(R) = ln(1/P_o)/R only falls with R."""
    rates = np.geomspace(1e3, 8e6, 400)
    values = [g_paper(float(r), 1e6, 10.0) for r in rates]
    assert all(b < a for a, b in zip(values, values[1:]))


def _brute(bandwidth, snr, r_min, r_max, eps, n=20001):
    grid = np.concatenate([np.geomspace(r_min, r_max, n), np.linspace(r_min, r_max, n)])
    return min(delay_per_bit(float(r), bandwidth, snr, eps) for r in grid)


def test_eq13_matches_brute_force_smooth():
    r_star = optimal_rate(1e6, 10.0, 1e4, 2e7)
    best = _brute(1e6, 10.0, 1e4, 2e7, None)
    assert delay_per_bit(r_star, 1e6, 10.0) <= best * (1 + 1e-9)
    assert 1e4 <= r_star <= 2e7


def test_eq13_matches_brute_force_exact():
    r_star = optimal_rate(1e6, 10.0, 1e4, 2e7, eps=1e-3)
    best = _brute(1e6, 10.0, 1e4, 2e7, 1e-3)
    assert delay_per_bit(r_star, 1e6, 10.0, 1e-3) <= best


def test_eq13_interval_edges():
    # An interval far below the optimum: the delay per bit falls with R, so R* = R_max.
    assert optimal_rate(1e6, 10.0, 10.0, 100.0) == pytest.approx(100.0, rel=1e-6)
    assert optimal_rate(1e6, 10.0, 5e5, 5e5) == 5e5
    for r_min, r_max in ((0.0, 1e6), (-1.0, 1e6), (1e6, 1e5), (1.0, math.inf)):
        with pytest.raises(SplitLLMError, match="R_m"):
            optimal_rate(1e6, 10.0, r_min, r_max)


@settings(max_examples=15, deadline=None)
@given(
    st.floats(1e3, 1e8), st.floats(0.1, 1e3), st.floats(1e-3, 10.0), st.floats(1.5, 1e3),
    st.sampled_from([None, 1e-2, 1e-4]),
)
def test_eq13_never_worse_than_dense_grid(bandwidth, snr, lo_frac, span, eps):
    r_min = lo_frac * bandwidth
    r_max = r_min * span
    r_star = optimal_rate(bandwidth, snr, r_min, r_max, eps)
    assert r_min <= r_star <= r_max
    best = _brute(bandwidth, snr, r_min, r_max, eps, n=2001)
    assert delay_per_bit(r_star, bandwidth, snr, eps) <= best * (1 + 1e-9)
