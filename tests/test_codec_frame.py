"""Frame round trips, error bounds, fast path, stats, input rejection and hypothesis properties."""

import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from splitcli.codec import (CodecConfig, FrameError, calibrate_channel_scale, calibrate_tau, decode, encode,
                            encode_with_stats)
from splitcli.codec.frame import _COMPACT, _HEADER, _saturate
from splitcli.errors import SplitLLMError

CFG = CodecConfig(tau=4.0, tau_quantile=None, q_bar=6, delta=0.05)


def _token_rel_err(y, x, tau):
    below = torch.where(x.abs() >= tau, torch.zeros_like(x), x).double()
    num = (y.double() - below).where(x.abs() < tau, torch.zeros_like(below)).norm(dim=1)
    den = below.norm(dim=1)
    return torch.where(den > 0, num / den, torch.zeros_like(num))


def test_round_trip_meets_delta_per_token():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 64, generator=g) * 2
    frame, stats = encode_with_stats(x, CFG)
    y = decode(frame)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert (_token_rel_err(y, x, CFG.tau) <= CFG.delta * (1 + 1e-4) + 1e-6).all()
    assert stats.frame_bytes == len(frame) and stats.path == "rans"
    assert stats.n_symbols == 400 * 64 and stats.n_outliers == int((x.abs() >= 4).sum())
    assert 0 <= stats.entropy_overhead < 0.05   # coded body vs empirical symbol entropy


def test_raw_path_when_entropy_is_off_is_bit_packing():
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    cfg = CodecConfig(tau=math.inf, tau_quantile=None, q_bar=4, q_min=4, entropy=False)
    frame, stats = encode_with_stats(x, cfg)
    assert stats.path == "raw" and stats.body_bytes == 3 * 16 * 4 // 8
    assert torch.allclose(decode(frame), x, atol=float(x.abs().max()) / 7)


def test_tiny_frames_skip_entropy_coding_when_it_does_not_pay():
    x = torch.randn(1, 8, generator=torch.Generator().manual_seed(2))
    _, stats = encode_with_stats(x, CodecConfig(tau=math.inf, tau_quantile=None, q_bar=8, q_min=8))
    assert stats.path == "raw"   # 8 symbols: a 255-entry model costs more than it saves


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_round_trip(dtype):
    x = (torch.randn(5, 32, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    y = decode(encode(x, CFG))
    assert y.dtype == dtype
    assert float((y.float() - x.float()).norm() / x.float().norm()) < 0.06


def test_channel_scale_must_match_at_decode():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 24, generator=g) * torch.linspace(0.5, 8, 24)
    scale = calibrate_channel_scale(x, 10.0)
    cfg = CodecConfig(tau=10.0, tau_quantile=None, q_bar=5, delta=0.0, channel_scale=scale)
    frame = encode(x, cfg)
    y = decode(frame, cfg)
    assert float((y - x).norm() / x.norm()) < 0.05
    with pytest.raises(FrameError):
        decode(frame)
    with pytest.raises(FrameError):
        decode(frame, CodecConfig(channel_scale=[1.0] * 24))
    with pytest.raises(FrameError):
        decode(frame, CodecConfig(channel_scale=scale[:12]))
    with pytest.raises(SplitLLMError):
        encode(x[:, :12], cfg)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_rejected_at_encode(bad):
    x = torch.ones(2, 4)
    x[1, 2] = bad
    with pytest.raises(SplitLLMError, match="NaN or Inf"):
        encode(x, CFG)


@pytest.mark.parametrize("x", [torch.ones(4), torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.float64)])
def test_bad_shapes_and_dtypes_are_rejected(x):
    with pytest.raises(SplitLLMError):
        encode(x, CFG)


def test_per_frame_quantile_tau_is_recorded():
    x = torch.arange(100, dtype=torch.float32).reshape(4, 25)
    frame, stats = encode_with_stats(x, CodecConfig(tau_quantile=0.9))
    assert stats.tau == calibrate_tau(x, 0.9) and stats.n_outliers == 10


def test_decode_caps_apply_before_allocation():
    frame = encode(torch.zeros(8, 16), CFG)
    with pytest.raises(FrameError, match="caps"):
        decode(frame, max_tokens=4)
    with pytest.raises(FrameError, match="caps"):
        decode(frame, max_elements=100)


def test_forged_huge_shape_with_valid_crc_is_refused():
    frame = bytearray(encode(torch.zeros(1, 4), CFG))
    struct.pack_into("<I", frame, 10, 1 << 30)       # tokens
    frame[-4:] = struct.pack("<I", zlib.crc32(bytes(frame[:-4])))
    with pytest.raises(FrameError):
        decode(bytes(frame), max_tokens=1 << 31, max_elements=1 << 62)


shapes = st.tuples(st.integers(0, 6), st.integers(1, 48))


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, shapes, elements=st.floats(-3.0000000054977558e+38, 3.0000000054977558e+38, width=32)),
       st.sampled_from([0.0, 1.0, 100.0, 1e30, math.inf]), st.integers(2, 8), st.floats(0, 0.3),
       st.booleans(), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_round_trip_property(arr, tau, q_bar, delta, entropy, dtype):
    x = torch.from_numpy(arr).to(dtype)
    if not torch.isfinite(x).all():      # huge float32 values overflow the half dtypes
        return
    cfg = CodecConfig(tau=tau, tau_quantile=None, q_bar=q_bar, delta=delta, entropy=entropy)
    frame, stats = encode_with_stats(x, cfg)
    y = decode(frame)
    assert y.shape == x.shape and y.dtype == dtype and stats.frame_bytes == len(frame)
    xf = x.float()
    mask = xf.abs() >= tau
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(y[mask].view(bits), x[mask].view(bits))      # sparse part is exact
    if dtype == torch.float32:
        assert torch.isfinite(y).all()
        err = _token_rel_err(y, xf, tau)
        header = _COMPACT.size if x.shape[0] == 1 else _HEADER.size
        widths = np.frombuffer(frame, np.uint8, count=x.shape[0], offset=header)
        assert ((err <= delta * (1 + 1e-4) + 1e-5) | torch.from_numpy(widths == q_bar)).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 5), st.integers(1, 40), st.one_of(st.just(0.0), st.floats(1.0000000031710769e-30, 1.0000000150474662e+30, width=32)),
       st.booleans(), st.integers(2, 8))
def test_constant_tensors_are_exact(tokens, hidden, value, negative, q_bar):
    # exact while the scale (max * 2^-20) stays a normal float32, i.e. |value| >~ 1e-32
    value = -value if negative else value
    x = torch.full((tokens, hidden), value)
    cfg = CodecConfig(tau=math.inf, tau_quantile=None, q_bar=q_bar, delta=0.0)
    assert torch.equal(decode(encode(x, cfg)), x)


def test_all_outlier_tensor_is_lossless():
    x = torch.randn(7, 9, generator=torch.Generator().manual_seed(5)) * 1e4
    frame, stats = encode_with_stats(x, CodecConfig(tau=0.0, tau_quantile=None))
    assert stats.n_outliers == 63 and torch.equal(decode(frame), x)


def test_reconstruction_near_float32_max_saturates_instead_of_overflowing():
    # found by hypothesis: with q_bar=2 the zero point's rounding put eq. 7 past 3.4e38
    x = torch.tensor([[8.566811e37, 2.558093e38]])
    cfg = CodecConfig(tau=math.inf, tau_quantile=None, q_bar=2, delta=0.0, entropy=False)
    y = decode(encode(x, cfg))
    assert torch.isfinite(y).all() and float((y.double() - x.double()).norm() / x.double().norm()) < 0.5


@settings(max_examples=200, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(0, 3), st.integers(0, 9)),
              elements=st.floats(width=32, allow_nan=True, allow_infinity=True)),
       st.sampled_from([float(np.finfo(np.float32).max), 65504.0, float(torch.finfo(torch.bfloat16).max)]))
def test_saturate_maps_nan_to_zero_and_clips_everything_else(a, limit):
    # the decoder's one-pass check must catch NaN and +-inf exactly as the old isfinite().all() did
    expected = np.clip(np.nan_to_num(a.copy(), nan=0.0), -limit, limit)
    out = _saturate(a.copy(), limit)
    assert out.dtype == np.float32 and out.shape == a.shape and np.array_equal(out, expected)
    assert not np.isnan(out).any()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 70000.0])
def test_saturate_catches_a_single_bad_entry(bad):
    a = np.array([[1.0, -2.0, bad, 3.0]], np.float32)
    out = _saturate(a, 65504.0)
    assert np.array_equal(out, [[1.0, -2.0, 0.0 if math.isnan(bad) else math.copysign(65504.0, bad), 3.0]])


def test_saturate_leaves_values_within_the_limit_alone():
    a = np.array([[65504.0, -65504.0, 0.5]], np.float32)
    assert _saturate(a, 65504.0) is a and np.array_equal(a, [[65504.0, -65504.0, 0.5]])
    empty = np.zeros((0, 4), np.float32)
    assert _saturate(empty, 65504.0).shape == (0, 4)


def test_forged_scale_making_nan_in_the_unrotation_decodes_finite():
    # a valid CRC but a scale at float32 max: eq. 7 gives +-inf, the inverse Hadamard inf - inf = NaN
    x = torch.linspace(-1, 1, 64).reshape(1, 64)
    cfg = CodecConfig(tau=math.inf, tau_quantile=None, q_bar=4, rotation_seed=0, entropy=False)
    frame = bytearray(encode(x, cfg))
    struct.pack_into("<f", frame, _COMPACT.size + 4 + 1, 3e38)   # header, rotation seed, one width
    frame[-4:] = struct.pack("<I", zlib.crc32(bytes(frame[:-4])))
    y = decode(bytes(frame), cfg)
    assert y.shape == (1, 64) and torch.isfinite(y).all()
