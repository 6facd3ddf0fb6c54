"""Frame format 4's decode steps: a few rows' products on the fp16 kernel (splitcli.codec.predictive
`_mm`), the float32 path elsewhere, and frames that cross between the two."""

import warnings

import numpy as np
import pytest
import torch

from splitcli.codec import predictive
from splitcli.codec.predictive import NO_TOKEN, decode, encode
from splitcli.codec.predictive_fit import fit_predictive
from splitcli.quant import kernels

from test_codec_predictive import _emb, _rows, _synthetic_windows, _toy

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.why_unavailable()}")


@pytest.fixture(scope="module")
def fitted():
    emb, wins = _synthetic_windows(7)
    return fit_predictive(emb, wins[:6], step=0.1), emb, wins[6]


def _steps(pc, emb, ids, h):
    """Each row of a window as its own one-row frame, with its previous token."""
    return [encode(h[t:t + 1], ids[t:t + 1], pc, emb, int(ids[t - 1]) if t else NO_TOKEN) for t in range(len(ids))]


@needs_kernel
def test_a_few_rows_go_through_the_fp16_kernel_and_more_through_float32():
    x, w = torch.randn(3, 16), torch.randn(16, 5)
    w16 = w.t().contiguous().half()
    assert torch.equal(predictive._mm(x, w, w16), kernels.mm16(x, w16))
    assert torch.equal(predictive._mm(x, w, None), x @ w)                     # weights fp16 cannot hold
    many = torch.randn(kernels.GEMV_MAX_TOKENS + 1, 16)
    assert torch.equal(predictive._mm(many, w, w16), many @ w)
    with kernels.disabled():
        assert torch.equal(predictive._mm(x, w, w16), x @ w)


@needs_kernel
def test_decode_steps_on_the_kernel_code_as_float32_ones_and_cross_decode(fitted):
    pc, emb, (ids, h) = fitted
    fast = _steps(pc, emb, ids, h)
    with kernels.disabled():
        slow = _steps(pc, emb, ids, h)
        slow_of_fast = torch.cat([decode(f, pc, emb) for f in fast])
    fast_of_fast, fast_of_slow = (torch.cat([decode(f, pc, emb) for f in fr]) for fr in (fast, slow))
    same = sum(a == b for a, b in zip(fast, slow))
    assert same >= 0.9 * len(fast)              # a symbol flips only where y sits on a rounding edge
    err = [float((y - h).pow(2).sum()) for y in (fast_of_fast, slow_of_fast, fast_of_slow)]
    assert max(err) <= 1.01 * min(err) and err[0] > 0
    # an end on the kernel and one without differ by the fp16 weights' rounding: ~1e-4 of the row
    diff = (slow_of_fast - fast_of_fast).norm(dim=1)
    assert bool((diff <= 1e-3 * h.norm(dim=1)).all()) and float(diff.max()) > 0


def test_toy_frames_are_the_same_bytes_on_every_path():
    # binary fractions and a permutation: every path's arithmetic is exact, so a row alone (the
    # kernel's path where it runs) and a prefill of 12 (float32, distinct tokens once) agree
    pc, emb = _toy(), _emb()
    x, ids = _rows(12)
    whole = decode(encode(x, ids, pc, emb), pc, emb)
    steps = _steps(pc, emb, ids, x)
    assert torch.equal(whole, torch.cat([decode(f, pc, emb) for f in steps]))
    with kernels.disabled():
        assert _steps(pc, emb, ids, x) == steps


def test_a_predictor_past_fp16s_range_stays_in_float32():
    W = _toy().W.copy()
    W[0, 0] = 1e5                                                # one weight fp16 would turn into inf
    U = _toy().U * 7e4                                           # not a fitted (orthogonal) U: nor this
    pc, emb = _toy(W=W), _emb()
    assert pc.W16 is None and _toy(U=U).Uw16 is None and _toy(U=U).Uw16T is None
    x, ids = _rows(3)
    ref = torch.from_numpy(np.hstack([emb[ids].numpy(), np.vstack([emb[:1].numpy() * 0, emb[ids[:-1]].numpy()]),
                                      np.ones((3, 1), np.float32)]).astype(np.float64) @ W.astype(np.float64))
    assert torch.allclose(predictive.prediction(pc, emb, ids, NO_TOKEN).double(), ref, rtol=1e-6, atol=1e-3)
    frame = encode(x, ids, pc, emb)
    assert predictive._header(frame)[3][3] == 0                 # no row went raw (an inf prediction sends all)
    y = decode(frame, pc, emb)
    assert float((y - x).abs().max()) <= pc.step / 2 + 1e-3


def test_numpy_quantizer_handles_escapes_nan_and_no_rows():
    pc = _toy()
    y = np.zeros((3, 8), np.float32)
    y[0, 1] = 1e3                                                # |s| 2000 > K: an escape
    y[1, :] = np.nan                                             # a NaN row: raw
    s, levels, raw, (et, ej) = predictive.quantize(pc, y)
    assert raw.tolist() == [False, True, False] and s[0, 1] == 0 and (et.tolist(), ej.tolist()) == ([0], [1])
    assert levels.shape == (3,) and levels.dtype.kind == "i"
    s, levels, raw, (et, ej) = predictive.quantize(pc, np.zeros((0, 8), np.float32))
    assert s.shape == (0, 8) and levels.shape == raw.shape == et.shape == (0,)


def test_no_rows_after_a_previous_token_and_huge_rows_warn_nothing():
    pc, emb = _toy(), _emb()
    frame = encode(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), pc, emb, prev_id=3)
    assert decode(frame, pc, emb).shape == (0, 8)
    x, ids = _rows(2)
    x[1] = 1e30                                                  # y² overflows float32; every component escapes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = encode(x, ids, pc, emb, prev_id=3)
    assert torch.equal(decode(frame, pc, emb)[1], x[1])          # escapes travel exactly
