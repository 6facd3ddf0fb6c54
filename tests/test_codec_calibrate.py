"""Per-channel calibration and class-conditional entropy coding."""

import numpy as np
import pytest
import torch

from splitcli.codec import (CodecConfig, FrameError, calibrate_channel_class, calibrate_channel_scale,
                            calibrate_config, calibrate_symbol_model, decode, encode_with_stats)
from splitcli.errors import SplitLLMError


def _hidden(tokens=256):
    g = torch.Generator().manual_seed(11)
    spread = torch.logspace(-1, 1.5, 48)                      # channels from quiet to loud
    return torch.randn(tokens, 48, generator=g) * spread


def test_channel_rms_and_classes_hand_checked():
    x = torch.tensor([[1.0, 3.0, 100.0], [-1.0, -3.0, 0.0]])
    scale = calibrate_channel_scale(x, tau=50.0)              # the 100 is an outlier, excluded
    assert scale == pytest.approx((1.0, 3.0, 2.0))            # empty channel -> median of 1 and 3
    assert calibrate_channel_class(torch.tensor([[1.0, 2.0, 4.0, 8.0]]), 1e9, 2) == (0, 0, 1, 1)


def test_class_models_are_lossless_and_smaller():
    x = _hidden()
    cfg = calibrate_config(x, CodecConfig(q_bar=6, delta=0.0), tau_quantile=0.999, n_classes=8, symbol_model=False)
    assert cfg.tau_quantile is None and len(cfg.channel_class) == 48
    pooled = CodecConfig(tau=cfg.tau, tau_quantile=None, q_bar=6, delta=0.0)
    f_cls, s_cls = encode_with_stats(x, cfg)
    f_pool, s_pool = encode_with_stats(x, pooled)
    assert s_cls.path == "rans-class" and s_pool.path == "rans"
    assert len(f_cls) < len(f_pool)
    assert torch.equal(decode(f_cls, cfg), decode(f_pool))    # same quantization, other coder
    with pytest.raises(FrameError):
        decode(f_cls)                                         # needs the classes
    other = CodecConfig(tau=cfg.tau, tau_quantile=None, channel_class=tuple(reversed(cfg.channel_class)))
    with pytest.raises(FrameError):
        decode(f_cls, other)


def test_single_token_frames_skip_class_models():
    x = _hidden()
    cfg = calibrate_config(x, n_classes=4)
    _, stats = encode_with_stats(x[:1], cfg)
    assert stats.path in ("raw", "rans", "rans-static")


@pytest.mark.parametrize("bad", [(), (0, 16), (-1, 0), (0.5, 1.0), ((0, 1),)])
def test_bad_channel_class_is_rejected(bad):
    with pytest.raises(SplitLLMError):
        CodecConfig(channel_class=bad)


def test_class_and_scale_lengths_must_agree():
    with pytest.raises(SplitLLMError):
        CodecConfig(channel_class=(0, 1), channel_scale=(1.0, 2.0, 3.0))
    with pytest.raises(SplitLLMError):
        encode_with_stats(torch.zeros(2, 3), CodecConfig(channel_class=(0, 1)))
    assert np.isfinite(calibrate_channel_scale(_hidden(4), 1e9)).all()


@pytest.mark.parametrize("n_classes", [None, 4])
def test_static_model_makes_decode_step_frames_smaller(n_classes):
    x = _hidden()
    cfg = calibrate_config(x[:200], CodecConfig(q_bar=5, q_min=3, delta=0.0), n_classes=n_classes)
    assert [len(m) for m in cfg.symbol_model] == [w for w in (8, 16, 32) for _ in range(n_classes or 1)]
    plain = CodecConfig(tau=cfg.tau, tau_quantile=None, q_bar=5, q_min=3, delta=0.0)
    for i in range(200, 210):
        f_static, s_static = encode_with_stats(x[i:i + 1], cfg)
        f_plain, _ = encode_with_stats(x[i:i + 1], plain)
        assert s_static.path == "rans-static" and s_static.model_bytes == 0
        assert len(f_static) < len(f_plain)
        assert torch.equal(decode(f_static, cfg), decode(f_plain))
    with pytest.raises(FrameError):
        decode(f_static)
    with pytest.raises(FrameError):
        decode(f_static, calibrate_config(x[:100], CodecConfig(q_bar=5, q_min=3, delta=0.0), n_classes=n_classes))


def test_symbol_model_needs_absolute_tau_and_valid_counts():
    with pytest.raises(SplitLLMError):
        calibrate_symbol_model(_hidden(8), CodecConfig())
    good = calibrate_symbol_model(_hidden(8), CodecConfig(tau=10.0, tau_quantile=None, q_bar=3, q_min=2))
    assert CodecConfig(tau=10.0, tau_quantile=None, q_bar=3, q_min=2, symbol_model=good).symbol_model == good
    for bad in (good[:1], (good[0], good[1][:-1]), (good[0], (0,) * 8), (good[0], (70000,) * 8)):
        with pytest.raises(SplitLLMError):
            CodecConfig(tau=10.0, tau_quantile=None, q_bar=3, q_min=2, symbol_model=bad)


def test_channel_scale_alpha_and_normalization_hand_checked():
    x = torch.tensor([[1.0, 4.0, 100.0], [-1.0, -4.0, 0.0]])  # rms below 50: 1, 4, median 2.5
    assert calibrate_channel_scale(x, 50.0, alpha=0.5) == pytest.approx((1.0, 2.0, 2.5 ** 0.5))
    norm = calibrate_channel_scale(x, 50.0, alpha=0.5, normalize=True)   # geometric mean 1
    gm = (1.0 * 2.0 * 2.5 ** 0.5) ** (1 / 3)
    assert norm == pytest.approx((1.0 / gm, 2.0 / gm, 2.5 ** 0.5 / gm), rel=1e-6)
    assert calibrate_channel_scale(x, 50.0, alpha=0.0, normalize=True) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("samples, msg", [
    ([], "empty"), (torch.zeros(0, 8), "empty"), ([np.zeros((0, 8), np.float32)], "empty"),
    (torch.tensor([[1.0, float("nan")]]), "NaN or Inf"), ([torch.ones(2, 2), torch.tensor([[float("inf"), 0.0]])], "NaN or Inf"),
])
def test_every_calibration_entry_refuses_empty_or_non_finite_samples(samples, msg):
    from splitcli.codec.calibrate import calibrate_from_samples, calibrate_settings
    from splitcli.plan.codec_settings import CodecSettings

    # channel scale used to return all ones from zero tokens; calibrate_from_samples([]) raised a
    # bare ValueError from np.concatenate
    for call in (lambda: calibrate_channel_scale(samples, 1.0), lambda: calibrate_channel_class(samples, 1.0),
                 lambda: calibrate_from_samples(samples, CodecSettings()),
                 lambda: calibrate_settings(samples, CodecSettings(channel_alpha=0.5))):
        with pytest.raises(SplitLLMError, match=msg):
            call()


def test_target_calibration_computes_the_channel_scale_once_per_tau(monkeypatch):
    import splitcli.codec.calibrate as cal
    from splitcli.plan.codec_settings import CodecSettings

    calls = []
    real = cal.channel_rms_below
    monkeypatch.setattr(cal, "channel_rms_below", lambda s, tau: calls.append(tau) or real(s, tau))
    x = _hidden(128).numpy()
    settings = CodecSettings(target_rel_error=0.1, channel_alpha=0.5, entropy=False)
    cfg, report = cal.calibrate_to_target(x, settings)
    # one scale per tau tried (quantiles, and the bulk's with _hidden's loud channels), none per
    # q_bar or for the result: was one per candidate plus one
    assert report["massive_channels"] > 0 and report["candidates"] == 3 * len(cal.TARGET_Q_BARS)
    assert len(calls) == 3 and len(set(calls)) == 3 and report["tau"] in calls
    assert cfg.channel_scale == cal.calibrate_channel_scale(x, report["tau"], 0.5, normalize=True)
