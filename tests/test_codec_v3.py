"""Codec format v3: the seeded Hadamard rotation, the calibrated channel scale (channel_alpha),
calibration to a distortion target, and saturation instead of silent overflow."""

import hashlib
import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch

from splitcli.codec import CodecConfig, FrameError, decode, encode, encode_with_stats
from splitcli.codec.calibrate import (bulk_channels, bulk_rel_error, calibrate_channel_scale, calibrate_from_samples,
                                      calibrate_to_target)
from splitcli.codec.frame import FLAG_ROTATION
from splitcli.codec.transform import rotate, rotation_supported, unrotate
from splitcli.errors import SplitLLMError
from splitcli.plan.codec_settings import CodecSettings


@pytest.mark.parametrize("n", [1, 7, 64, 96, 576, 4096])
def test_rotation_is_orthogonal_and_inverted_exactly_up_to_rounding(n):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((5, n)) * 10).astype(np.float32)
    y = rotate(x, 3)
    assert np.allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)
    assert np.abs(unrotate(y, 3) - x).max() <= 1e-5 * np.abs(x).max()
    if n <= 576:
        r = rotate(np.eye(n, dtype=np.float32), 3)                        # rows: R e_i = columns of R^T
        assert np.abs(r @ r.T - np.eye(n)).max() < 1e-5


def test_rotation_spreads_a_massive_channel_and_depends_on_the_seed():
    x = np.zeros((1, 576), np.float32)
    x[0, 247] = 1e4
    y = rotate(x, 0)
    assert np.abs(y).max() < 1e4 / 10 and np.count_nonzero(y) == 576      # over all 576 coordinates
    assert not np.array_equal(rotate(x, 0), rotate(x, 1))
    assert np.array_equal(rotate(x, 5), rotate(x, 5))


def test_unsupported_hidden_size_is_a_clear_error():
    assert not rotation_supported(1031) and rotation_supported(576)
    with pytest.raises(SplitLLMError, match="rotation"):
        rotate(np.ones((1, 1031), np.float32), 0)
    cfg = CodecConfig(tau=10.0, tau_quantile=None, rotation_seed=0)
    with pytest.raises(SplitLLMError, match="rotation"):
        encode(torch.ones(2, 1031), cfg)


def _input():
    # hidden 64: the rotation is H_64 alone (entries ±1/8), so every sum of these dyadic inputs is
    # exact in float32 whatever order the BLAS adds in, and the pinned bytes hold on any machine
    i = torch.arange(64 * 64)
    x = (((i * 7919) % 61) - 30).float().reshape(64, 64) / 8
    x[:, 17] *= 40                                                        # a dominant channel
    x[::9, 5] = 100.0
    return x


ROT_SHA256 = "7251f1ebf0bab26c980f136b2754a308a0bee3256c89a1506afaf020bfa50eef"
ALPHA_SHA256 = "ea457b889b405192e615b1c4b68b1e754a6e96b69d477f5cbeb243e7f338e99d"


def test_rotated_frame_is_version_3_and_pinned():
    x = _input()
    cfg = CodecConfig(tau=90.0, tau_quantile=None, q_bar=4, delta=0.05, rotation_seed=11)
    frame, stats = encode_with_stats(x, cfg)
    assert frame[4] == 3 and frame[6] & FLAG_ROTATION
    assert hashlib.sha256(frame).hexdigest() == ROT_SHA256, len(frame)
    y = decode(frame)                                     # the seed travels: no config needed
    assert torch.equal(y[::9, 5], x[::9, 5])              # outliers exact
    plain = decode(encode(x, CodecConfig(tau=90.0, tau_quantile=None, q_bar=4, delta=0.05)))
    assert float((y - x).norm()) < 0.5 * float((plain - x).norm())       # rotation helps at 4 bits here


def test_channel_scale_frame_is_pinned_and_needs_its_config():
    x = _input()
    # power-of-two scales keep the rotated sums exact (see _input); calibration is tested below
    cfg = CodecConfig(tau=90.0, tau_quantile=None, q_bar=4, rotation_seed=2, entropy=False,
                      channel_scale=tuple(2.0 ** ((c % 5) - 2) for c in range(64)))
    frame = encode(x, cfg)
    assert frame[4] == 3
    assert hashlib.sha256(frame).hexdigest() == ALPHA_SHA256, len(frame)
    with pytest.raises(FrameError, match="channel scale"):
        decode(frame)
    assert float((decode(frame, cfg) - x).norm() / x.norm()) < 0.1


def test_channel_alpha_is_calibrated_with_the_rotation():
    x = _input()
    settings = CodecSettings(tau=90.0, q_bar=4, rotation="hadamard", rotation_seed=2, channel_alpha=0.5)
    cfg = calibrate_from_samples(x, settings)
    assert cfg.channel_scale is not None and cfg.rotation_seed == 2 and cfg.symbol_model is not None
    assert float((decode(encode(x, cfg), cfg) - x).norm() / x.norm()) < 0.1
    assert float((decode(encode(x[:1], cfg), cfg) - x[:1]).norm() / x[:1].norm()) < 0.1   # static model path


def test_unrotated_frames_stay_version_2():
    frame = encode(_input(), CodecConfig(tau=90.0, tau_quantile=None, q_bar=4))
    assert frame[4] == 2


def _forge(frame: bytes, version: int, flags: int) -> bytes:
    b = bytearray(frame[:-4])
    b[4], b[6] = version, flags
    return bytes(b) + struct.pack("<I", zlib.crc32(bytes(b)))


def test_rotation_flag_is_tied_to_version_3():
    x = _input()
    rot = encode(x, CodecConfig(tau=90.0, tau_quantile=None, q_bar=4, rotation_seed=1))
    plain = encode(x, CodecConfig(tau=90.0, tau_quantile=None, q_bar=4))
    with pytest.raises(FrameError):
        decode(_forge(rot, 2, rot[6]))                    # a v2 frame cannot carry the rotation flag
    with pytest.raises(FrameError):
        decode(_forge(plain, 3, plain[6]))                # a v3 frame without it is invalid
    with pytest.raises(FrameError, match="version"):
        decode(_forge(plain, 4, plain[6]))


@pytest.mark.parametrize("seed", [None, 0])
def test_fp16_reconstruction_saturates_instead_of_turning_inf(seed):
    x = torch.full((3, 64), 65504.0, dtype=torch.float16)
    x[:, ::2] = -65504.0
    x[1] = torch.linspace(-65504, 65504, 64).half()
    for q_bar in (2, 3, 8):
        y = decode(encode(x, CodecConfig(tau=math.inf, tau_quantile=None, q_bar=q_bar, rotation_seed=seed)))
        assert y.dtype == torch.float16 and torch.isfinite(y).all()


def test_rotating_values_near_the_float32_limit_is_refused():
    x = torch.full((1, 64), 3e38)
    with pytest.raises(SplitLLMError, match="too large to rotate"):
        encode(x, CodecConfig(tau=math.inf, tau_quantile=None, rotation_seed=0))
    assert torch.isfinite(decode(encode(x, CodecConfig(tau=math.inf, tau_quantile=None)))).all()


@pytest.mark.parametrize("kwargs", [dict(rotation="fft"), dict(rotation_seed=-1), dict(rotation_seed=2**32),
                                    dict(channel_alpha=1.5), dict(channel_alpha=math.nan), dict(target_rel_error=0),
                                    dict(target_rel_error=1.0), dict(rotation_seed=1.5)])
def test_settings_bounds(kwargs):
    with pytest.raises(SplitLLMError):
        CodecSettings(**kwargs)


def test_settings_and_config_round_trip_through_json():
    s = CodecSettings(rotation="hadamard", rotation_seed=9, channel_alpha=0.5, target_rel_error=0.1)
    assert CodecSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    x = _input()
    cfg = calibrate_from_samples(x, CodecSettings(rotation="hadamard", rotation_seed=9, channel_alpha=0.5))
    back = CodecConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    one = x[3:4]
    assert encode(one, back) == encode(one, cfg)
    assert torch.equal(decode(encode(x, cfg), back), decode(encode(x, cfg), cfg))
    with pytest.raises(SplitLLMError, match="version 3"):
        CodecConfig(rotation_seed=1, version=2)


def _massive_fixture(seed: int, tokens: int = 1024) -> np.ndarray:
    """Gemma-like hidden states: a heavy-tailed bulk with uneven channel scales, and three
    channels at ~1e4 in every token (one sink token at ~5e4)."""
    rng = np.random.default_rng(seed)
    scale = np.exp(rng.normal(0, 0.6, 576))
    x = rng.standard_t(5, (tokens, 576)) * scale
    for c, m in ((17, 1.2e4), (300, -9e3), (451, 2e4)):
        x[:, c] = m * (1 + 0.05 * rng.standard_normal(tokens))
    x[0, 17] = 5e4
    return x.astype(np.float32)


def test_stress_fixture_meets_the_target_without_manual_settings():
    calib, held_out = _massive_fixture(0), _massive_fixture(1)
    target = 0.1
    cfg, chosen = calibrate_to_target(calib, CodecSettings(target_rel_error=target))
    assert chosen["met"] and chosen["massive_channels"] == 3
    y = decode(encode(held_out, cfg), cfg).numpy()
    assert np.isfinite(y).all()
    cols = bulk_channels(held_out)
    assert bulk_rel_error(y, held_out, cols) <= target * 1.1           # out of sample, small slack
    # the massive channels travel exactly
    assert np.array_equal(y[:, [17, 300, 451]], held_out[:, [17, 300, 451]])
    # fixed defaults put τ inside the massive channels: their range swamps the bulk
    fixed = calibrate_from_samples(calib, CodecSettings())
    y_fixed = decode(encode(held_out, fixed), fixed).numpy()
    assert bulk_rel_error(y_fixed, held_out, cols) > 3 * target


def test_target_not_reachable_is_reported_not_hidden():
    x = _massive_fixture(2, tokens=256)
    _, chosen = calibrate_to_target(x, CodecSettings(target_rel_error=1e-6))
    assert not chosen["met"] and chosen["bulk_rel_error"] > 1e-6 and chosen["q_bar"] >= 7


def test_channel_alpha_scale_has_unit_geometric_mean():
    x = _massive_fixture(3, tokens=128)
    s = np.asarray(calibrate_channel_scale(x, 1e3, 0.5, normalize=True))
    assert abs(float(np.exp(np.log(s).mean())) - 1) < 1e-4 and (s > 0).all()


def test_defaults_fall_back_to_the_stated_target_on_massive_activations():
    from splitcli.codec.calibrate import calibrate_settings
    from splitcli.plan.codec_settings import DEFAULT_TARGET_REL_ERROR

    calib, held_out = _massive_fixture(0), _massive_fixture(1)
    cfg, report = calibrate_settings(calib, CodecSettings())          # no manual setting at all
    assert report["met"] and "fallback" in report and report["target_rel_error"] == DEFAULT_TARGET_REL_ERROR
    y = decode(encode(held_out, cfg), cfg).numpy()
    assert bulk_rel_error(y, held_out, bulk_channels(held_out)) <= DEFAULT_TARGET_REL_ERROR * 1.1
    # an ordinary hidden state keeps the fixed recipe (the guard does not trip) and says what it measured
    rng = np.random.default_rng(4)
    plain = (rng.standard_normal((512, 64)) * np.exp(rng.normal(0, 0.5, 64))).astype(np.float32)
    cfg, report = calibrate_settings(plain, CodecSettings())
    assert "fallback" not in report and report["met"] and cfg.q_bar == 6 and report["bulk_rel_error"] < 0.1
    # a hand-set tau is the user's choice: reported, not overridden
    cfg, report = calibrate_settings(calib, CodecSettings(tau=3e4))
    assert cfg.tau == 3e4 and not report["met"] and "fallback" not in report


def test_bench_sweep_calibrates_each_recipe_as_deployment_does():
    # the sweep's "paper" row on massive activations: deployment's guard falls back to the default
    # target; the sweep used to calibrate the fixed settings (calibrate_from_samples) instead
    from splitcli.bench.codec import PAPER, SWEEP_RECIPES, recipe_config, recipe_settings
    from splitcli.codec.calibrate import calibrate_settings
    from splitcli.plan.codec_settings import DEFAULT_TARGET_REL_ERROR

    calib = _massive_fixture(0)
    paper = recipe_settings(CodecSettings(), dict(SWEEP_RECIPES)[PAPER])
    cfg, chosen = recipe_config(calib, paper)
    deployed, report = calibrate_settings(calib, paper)
    assert cfg == deployed and chosen == report
    assert "fallback" in chosen and chosen["target_rel_error"] == DEFAULT_TARGET_REL_ERROR and chosen["met"]
    assert cfg != calibrate_from_samples(calib, paper)
    # an ordinary hidden state keeps the fixed recipe, and the row then has no "chosen"
    rng = np.random.default_rng(4)
    plain = (rng.standard_normal((512, 64)) * np.exp(rng.normal(0, 0.5, 64))).astype(np.float32)
    cfg, chosen = recipe_config(plain, paper)
    assert chosen is None and cfg == calibrate_from_samples(plain, paper) and cfg.q_bar == 6
