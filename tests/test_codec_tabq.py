"""TAB-Q (Algorithm 1, eqs. 5-7): hand-computed codes, the Δ bound and the width search."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from splitcli.codec.tabq import q_max, reconstruct, tab_q


def _rel_err(below, tq):
    rec = reconstruct(tq.symbols, tq.widths, tq.scales, tq.zeros)
    num = np.linalg.norm(rec.astype(np.float64) - below, axis=1)
    den = np.linalg.norm(below.astype(np.float64), axis=1)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def test_q_max_counts_the_sign_bit():
    assert [q_max(q) for q in (2, 3, 4, 8)] == [1, 3, 7, 127]


def test_hand_computed_three_bit_token():
    # magnitudes 0..3 at Q=3 (Qmax=3): s = 1, z = 0, levels = magnitudes, exact.
    below = np.array([[0.0, -1.0, 2.0, -3.0]], np.float32)
    tq = tab_q(below, q_bar=3, q_min=3, delta=0.0)
    assert tq.widths.tolist() == [3] and tq.zeros.tolist() == [0]
    assert tq.scales[0] == pytest.approx(1.0, rel=1e-6)
    # symbol = Qmax+1+level for x >= 0, Qmax-level for x < 0
    assert tq.symbols.tolist() == [[4, 2, 6, 0]]
    np.testing.assert_allclose(reconstruct(tq.symbols, tq.widths, tq.scales, tq.zeros), below, rtol=1e-6)


def test_zero_point_maps_t_min_to_level_zero():
    below = np.array([[10.0, 11.0, 12.0, -13.0]], np.float32)   # T_min = 10, range 3
    tq = tab_q(below, q_bar=3, q_min=3, delta=0.0)
    assert tq.zeros[0] == -10                                   # z = -round(T_min/s), s = 1
    np.testing.assert_allclose(reconstruct(tq.symbols, tq.widths, tq.scales, tq.zeros), below, rtol=1e-6)


def test_width_is_last_one_within_delta():
    rng = np.random.default_rng(0)
    below = rng.standard_normal((64, 96)).astype(np.float32)
    delta = 0.12
    tq = tab_q(below, q_bar=8, q_min=2, delta=delta)
    err = _rel_err(below, tq)
    assert (err <= delta * (1 + 1e-4)).all()
    # one bit fewer than chosen must break Δ (or the chosen width is already q_min)
    for i in range(below.shape[0]):
        w = int(tq.widths[i])
        if w > 2:
            lower = tab_q(below[i:i + 1], q_bar=w - 1, q_min=w - 1, delta=0.0)
            assert _rel_err(below[i:i + 1], lower)[0] > delta


def test_q_bar_is_a_hard_cap_even_when_delta_breaks():
    below = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    tq = tab_q(below, q_bar=2, q_min=2, delta=1e-6)
    assert (tq.widths == 2).all() and (tq.distortion > 1e-6).all()


def test_constant_zero_and_huge_tokens():
    below = np.array([[3.5] * 8, [0.0] * 8, [-2.0] * 8, [3e38, -3e38, 1e38, 0, 0, 0, 0, 5]], np.float32)
    tq = tab_q(below, q_bar=4, q_min=2, delta=0.01)
    rec = reconstruct(tq.symbols, tq.widths, tq.scales, tq.zeros)
    np.testing.assert_array_equal(rec[:3], below[:3])
    assert np.isfinite(rec).all()
    assert _rel_err(below[3:], tq_row(below[3:]))[0] <= 0.01 or tq.widths[3] == 4


def tq_row(row):
    return tab_q(row, q_bar=4, q_min=2, delta=0.01)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(0, 5), st.integers(1, 40)),
              elements=st.floats(-1e6, 1e6, width=32)),
       st.integers(2, 8), st.floats(0.0, 0.5))
def test_delta_bound_property(below, q_bar, delta):
    tq = tab_q(below, q_bar=q_bar, q_min=2, delta=delta)
    err = _rel_err(below, tq)
    ok = (err <= delta * (1 + 1e-4) + 1e-6) | (tq.widths == q_bar)
    assert ok.all()
    assert ((tq.widths >= 2) & (tq.widths <= q_bar)).all()
    assert (tq.symbols.astype(int) < (1 << tq.widths.astype(int))[:, None]).all()


def test_subnormal_token_keeps_q_bar_and_reports_true_distortion():
    # found by hypothesis: s * max underflowed to 0 while δ (measured on max-normalized values)
    # said 0; the scale is now kept a normal float and δ stays honest.
    below = np.array([[1e-45, 0.0]], np.float32)
    tq = tab_q(below, q_bar=3, q_min=2, delta=0.0)
    err = _rel_err(below, tq)
    assert tq.widths[0] == 3 and np.isfinite(tq.scales).all()
    assert tq.distortion[0] == pytest.approx(err[0], abs=1e-6)
