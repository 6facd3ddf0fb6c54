"""One-time per-channel calibration stored with a CodecConfig (not part of the paper's recipe).

On SmolLM2 at the split a few channels carry most of T_below's energy (channel RMS ranges from
~1.7 to ~57 at l = 15), so symbol statistics depend strongly on the channel. Two optional uses:
`channel_class` groups channels of similar RMS so the entropy coder keeps one model per class
(measured: 3.08 -> 2.87 bits/symbol with 8 classes, no extra distortion), and `channel_scale`
divides channels by their RMS before the per-token step (equalizes relative error per channel;
costs more bits at equal L2 error, kept for experiments).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace

import numpy as np
import torch

from splitcli.codec.config import MAX_CLASSES, CodecConfig
from splitcli.codec.entropy import COUNT_TOTAL
from splitcli.codec.frame import decode, encode
from splitcli.codec.tabq import tab_q
from splitcli.codec.threshold import calibrate_tau, split_threshold
from splitcli.codec.transform import rotate
from splitcli.errors import SplitLLMError
from splitcli.plan.codec_settings import (DEFAULT_TARGET_REL_ERROR, DEFAULT_TAU_QUANTILE, GUARD_REL_ERROR,
                                          CodecSettings)


def _samples_2d(samples: torch.Tensor | np.ndarray | Iterable) -> np.ndarray:
    """Samples (one tensor/array [.., hidden] or an iterable of them) as float32 [tokens, hidden];
    no tokens, or NaN/Inf anywhere, raise."""
    if isinstance(samples, (torch.Tensor, np.ndarray)):
        samples = [samples]
    rows = [s.detach().to("cpu", torch.float32).numpy() if isinstance(s, torch.Tensor) else np.asarray(s, np.float32)
            for s in samples]
    if not rows:
        raise SplitLLMError("cannot calibrate the codec from empty samples")
    x = np.concatenate([r.reshape(-1, r.shape[-1]) for r in rows])              # [tokens, hidden]
    if x.size == 0:
        raise SplitLLMError("cannot calibrate the codec from empty samples")
    if not np.isfinite(x).all():
        raise SplitLLMError("cannot calibrate the codec: the samples contain NaN or Inf")
    return x


def channel_rms_below(samples, tau: float) -> np.ndarray:
    """RMS of T_below (entries with |x| < tau) per channel over samples [.., hidden]; channels
    that are empty or all-zero below tau get the median RMS."""
    a = _samples_2d(samples).astype(np.float64)                                # [tokens, hidden]
    keep = np.abs(a) < tau
    sq, n = np.where(keep, a * a, 0).sum(0), keep.sum(0)                        # [hidden] each
    rms = np.sqrt(np.divide(sq, n, out=np.zeros_like(sq), where=n > 0))
    good = rms[rms > 0]
    return np.where(rms > 0, rms, float(np.median(good)) if good.size else 1.0)


def calibrate_channel_scale(samples, tau: float, alpha: float = 1.0, normalize: bool = False) -> tuple[float, ...]:
    """Per-channel rms_c^alpha of T_below, for `CodecConfig.channel_scale`. With normalize, scaled
    to geometric mean 1 (so alpha only reshapes the channels, not the overall step): what
    `CodecSettings.channel_alpha` calibrates."""
    s = channel_rms_below(samples, tau) ** alpha
    if normalize:
        s = s / np.exp(np.log(s).mean())
    return tuple(float(v) for v in s.astype(np.float32))


def calibrate_channel_class(samples, tau: float, n_classes: int = 8) -> tuple[int, ...]:
    """Class 0..n_classes-1 per channel by quantiles of log RMS of T_below (class 0 = quietest),
    for `CodecConfig.channel_class`."""
    if not 1 <= n_classes <= MAX_CLASSES:
        raise SplitLLMError(f"channel classes must number 1..{MAX_CLASSES}, got {n_classes}")
    log_rms = np.log(channel_rms_below(samples, tau))
    edges = np.quantile(log_rms, np.linspace(0, 1, n_classes + 1)[1:-1])
    return tuple(int(c) for c in np.searchsorted(edges, log_rms, side="right"))


def coded_below(x: np.ndarray, cfg: CodecConfig) -> np.ndarray:
    """What TAB-Q sees of x [tokens, hidden] under cfg (absolute tau): T_below, divided by the
    channel scale, rotated; the domain the channel classes and the symbol model describe."""
    _, below = split_threshold(x, cfg.tau)
    if cfg._scale is not None:
        below = below / cfg._scale
    return rotate(below, cfg.rotation_seed) if cfg.rotation_seed is not None else below


def calibrate_symbol_model(samples, cfg: CodecConfig) -> tuple[tuple[int, ...], ...]:
    """Symbol counts per (width, channel class) for `CodecConfig.symbol_model`: the samples are
    split at cfg's tau (which must be absolute), scaled by its channel_scale if any, and
    quantized at each width in turn; counts get +1 (every symbol stays cheap enough to code)
    and are normalized to the entropy coder's COUNT_TOTAL."""
    if cfg.tau is None:
        raise SplitLLMError("calibrate the symbol model with an absolute tau (calibrate tau first)")
    x = _samples_2d(samples)                                                     # [tokens, hidden]
    below = coded_below(x, cfg)
    class_cols = cfg._class_cols if cfg._class_cols is not None else [np.arange(x.shape[1])]
    model = []
    for width in range(cfg.q_min, cfg.q_bar + 1):
        symbols = tab_q(below, width, width, 0.0).symbols
        for cols in class_cols:
            hist = np.bincount(symbols[:, cols].reshape(-1), minlength=1 << width).astype(np.float64) + 1
            model.append(tuple(int(c) for c in np.maximum(np.rint(hist * COUNT_TOTAL / hist.sum()), 1)))
    return tuple(model)


def calibrate_config(samples, base: CodecConfig | None = None, *, tau_quantile: float = DEFAULT_TAU_QUANTILE,
                     n_classes: int | None = 8, symbol_model: bool = True) -> CodecConfig:
    """The deployment recipe: `base` with tau fixed at the `tau_quantile` of |x| over the
    samples, (unless n_classes is None) channel classes for class-conditional rANS of large
    frames, and (if symbol_model) a static symbol model for small ones.
    Measured on SmolLM2-135M at l = 15 (see the codec report): 0.999 / q_bar 6 / 8 classes."""
    base = base if base is not None else CodecConfig()
    tau = calibrate_tau(samples, tau_quantile)
    classes = calibrate_channel_class(samples, tau, n_classes) if n_classes is not None else None
    cfg = replace(base, tau=tau, tau_quantile=None, channel_class=classes, symbol_model=None)
    return replace(cfg, symbol_model=calibrate_symbol_model(samples, cfg)) if symbol_model else cfg


def calibrate_from_samples(samples, settings: CodecSettings) -> CodecConfig:
    """The deployment config from hidden states [tokens, hidden]: τ fixed (from the quantile,
    or as given), the channel scale (channel_alpha > 0), and, with entropy coding, channel
    classes + a static symbol model, all in the domain TAB-Q codes (after rotation). With a
    `target_rel_error`, `calibrate_to_target` picks τ and q̄ first (see there)."""
    if settings.target_rel_error is not None:
        return calibrate_to_target(samples, settings)[0]
    return _fixed_config(_samples_2d(samples), settings)


def _alpha_scale(x: np.ndarray, tau: float, settings: CodecSettings) -> tuple[float, ...] | None:
    """The channel scale `settings.channel_alpha` asks for at this tau, or None (alpha 0)."""
    if settings.channel_alpha == 0:
        return None
    return calibrate_channel_scale(x, tau, settings.channel_alpha, normalize=True)


def _fixed_config(x: np.ndarray, settings: CodecSettings,
                  channel_scale: tuple[float, ...] | None = None) -> CodecConfig:
    """`calibrate_from_samples` without a target on checked samples x [tokens, hidden];
    channel_scale: `_alpha_scale` at settings.tau if the caller has it already (calibrate_to_target
    computes it once per tau, not once per q_bar)."""
    cfg = CodecConfig.from_settings(settings)
    if settings.tau is None:
        cfg = replace(cfg, tau=calibrate_tau(x, settings.tau_quantile), tau_quantile=None)
    if settings.channel_alpha > 0:
        cfg = replace(cfg, channel_scale=channel_scale if channel_scale is not None else
                      _alpha_scale(x, cfg.tau, settings))
    if settings.entropy:
        if cfg._scale is None and cfg.rotation_seed is None:    # the paper's domain: as before v3
            classes = calibrate_channel_class(x, cfg.tau, settings.n_classes)
        else:
            classes = calibrate_channel_class(coded_below(x, cfg), math.inf, settings.n_classes)
        cfg = replace(cfg, channel_class=classes)
        cfg = replace(cfg, symbol_model=calibrate_symbol_model(x, cfg))
    return cfg


#: A channel is "massive" (Gemma-style, or SmolLM2's few dominant ones) when its RMS exceeds
#: this multiple of the median channel RMS; the distortion target is measured without them,
#: because a token's norm is then theirs and any error on the other channels would look tiny.
MASSIVE_RATIO = 8.0
#: q̄ values and τ quantiles `calibrate_to_target` tries.
TARGET_Q_BARS = (3, 4, 5, 6, 7, 8)
TARGET_TAU_QUANTILES = (0.999, 0.9999)


def bulk_channels(x: np.ndarray) -> np.ndarray:
    """Indices of the channels of x [tokens, hidden] that are not massive (see MASSIVE_RATIO)."""
    rms = np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=0))        # [hidden]
    med = float(np.median(rms))
    keep = np.flatnonzero(rms <= MASSIVE_RATIO * med) if med > 0 else np.arange(x.shape[1])
    return keep if keep.size else np.arange(x.shape[1])


def bulk_rel_error(y: np.ndarray, x: np.ndarray, cols: np.ndarray) -> float:
    """Mean over tokens of ||(y - x)_S|| / ||x_S|| with S = cols (tokens with x_S = 0 skipped):
    the distortion `target_rel_error` bounds."""
    d = (y[:, cols] - x[:, cols]).astype(np.float64)
    ref = np.sqrt(np.einsum("ij,ij->i", x[:, cols].astype(np.float64), x[:, cols].astype(np.float64)))
    err = np.sqrt(np.einsum("ij,ij->i", d, d))
    ok = ref > 0
    return float(np.mean(err[ok] / ref[ok])) if ok.any() else 0.0


def calibrate_to_target(samples, settings: CodecSettings) -> tuple[CodecConfig, dict]:
    """Pick τ and q̄ for `settings.target_rel_error` on these samples: among τ at the settings'
    quantile, at TARGET_TAU_QUANTILES, and at the 0.999 quantile of the non-massive channels
    alone (so massive channels travel exactly), and q̄ in TARGET_Q_BARS, the smallest frame over
    the samples whose `bulk_rel_error` is <= the target; if none meets it, the most accurate.
    Returns the calibrated config and what was chosen and measured (for the user to see)."""
    target = settings.target_rel_error
    if target is None:
        raise SplitLLMError("calibrate_to_target needs settings with a target_rel_error")
    x = _samples_2d(samples)
    cols = bulk_channels(x)
    taus = {}
    if settings.tau is not None:
        taus["given"] = settings.tau
    else:
        for q in dict.fromkeys((settings.tau_quantile, *TARGET_TAU_QUANTILES)):
            taus[f"quantile {q}"] = calibrate_tau(x, q)
        if cols.size < x.shape[1]:
            taus["bulk quantile 0.999"] = calibrate_tau(x[:, cols], 0.999)
    tried = []
    for tau_name, tau in taus.items():
        scale = _alpha_scale(x, tau, settings)                 # depends on tau only, not on q_bar
        for q_bar in TARGET_Q_BARS:
            trial = replace(settings, tau=tau, tau_quantile=None, q_bar=q_bar, q_bar_min=min(settings.q_bar_min, q_bar),
                            target_rel_error=None)
            cfg = _fixed_config(x, replace(trial, entropy=False), scale)      # reconstruction only
            frame = encode(x, replace(cfg, entropy=settings.entropy))
            err = bulk_rel_error(decode(frame, cfg).numpy(), x, cols)
            tried.append(dict(tau_from=tau_name, tau=tau, q_bar=q_bar, bytes_per_token=len(frame) / x.shape[0],
                              bulk_rel_error=err, settings=trial, scale=scale))
    met = [t for t in tried if t["bulk_rel_error"] <= target]
    best = min(met, key=lambda t: t["bytes_per_token"]) if met else min(tried, key=lambda t: t["bulk_rel_error"])
    report = dict(target_rel_error=target, met=bool(met), tau_from=best["tau_from"], tau=best["tau"],
                  q_bar=best["q_bar"], bulk_rel_error=best["bulk_rel_error"],
                  bytes_per_token=best["bytes_per_token"], massive_channels=int(x.shape[1] - cols.size),
                  candidates=len(tried))
    return _fixed_config(x, best["settings"], best["scale"]), report


def calibrate_settings(samples, settings: CodecSettings) -> tuple[CodecConfig, dict]:
    """What deployment calibrates: the config for `settings` and a report of the distortion it
    leaves on the samples (`bulk_rel_error`). With a target, `calibrate_to_target`. Without one,
    the fixed settings are checked: when they leave more than GUARD_REL_ERROR on the non-massive
    channels (τ inside massive activations wipes the other channels out) and τ was not set by
    hand, calibration falls back to DEFAULT_TARGET_REL_ERROR and says so in the report."""
    if settings.target_rel_error is not None:
        return calibrate_to_target(samples, settings)
    x = _samples_2d(samples)
    cfg = _fixed_config(x, settings)
    cols = bulk_channels(x)
    err = bulk_rel_error(decode(encode(x, replace(cfg, entropy=False)), cfg).numpy(), x, cols)
    if err > GUARD_REL_ERROR and settings.tau is None:
        cfg, chosen = calibrate_to_target(x, replace(settings, target_rel_error=DEFAULT_TARGET_REL_ERROR))
        return cfg, dict(chosen, fallback=f"the fixed settings left error {err:.3f} > {GUARD_REL_ERROR} on the "
                                          "non-massive channels; calibrated to the default target instead")
    return cfg, dict(bulk_rel_error=err, massive_channels=int(x.shape[1] - cols.size), guard=GUARD_REL_ERROR,
                     met=err <= GUARD_REL_ERROR)
