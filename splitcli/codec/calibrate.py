"""One-time per-channel calibration stored with a CodecConfig (not part of the paper's recipe).

On SmolLM2 at the split a few channels carry most of T_below's energy (channel RMS ranges from
~1.7 to ~57 at l = 15), so symbol statistics depend strongly on the channel. Two optional uses:
`channel_class` groups channels of similar RMS so the entropy coder keeps one model per class
(measured: 3.08 -> 2.87 bits/symbol with 8 classes, no extra distortion), and `channel_scale`
divides channels by their RMS before the per-token step (equalizes relative error per channel;
costs more bits at equal L2 error, kept for experiments).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import numpy as np
import torch

from splitcli.codec.config import MAX_CLASSES, CodecConfig
from splitcli.codec.entropy import COUNT_TOTAL
from splitcli.codec.tabq import tab_q
from splitcli.codec.threshold import calibrate_tau, split_threshold
from splitcli.errors import SplitLLMError
from splitcli.plan.codec_settings import DEFAULT_TAU_QUANTILE, CodecSettings


def channel_rms_below(samples: torch.Tensor | np.ndarray | Iterable, tau: float) -> np.ndarray:
    """RMS of T_below (entries with |x| < tau) per channel over samples [.., hidden]; channels
    that are empty or all-zero below tau get the median RMS."""
    if isinstance(samples, (torch.Tensor, np.ndarray)):
        samples = [samples]
    sq, n = None, None
    for s in samples:
        a = s.detach().to("cpu", torch.float32).numpy() if isinstance(s, torch.Tensor) else np.asarray(s, np.float32)
        a = a.reshape(-1, a.shape[-1]).astype(np.float64)                     # [rows, hidden]
        if not np.isfinite(a).all():
            raise SplitLLMError("cannot calibrate channels: the samples contain NaN or Inf")
        keep = np.abs(a) < tau
        part_sq, part_n = np.where(keep, a * a, 0).sum(0), keep.sum(0)
        sq, n = (part_sq, part_n) if sq is None else (sq + part_sq, n + part_n)
    if sq is None or sq.size == 0:
        raise SplitLLMError("cannot calibrate channels from empty samples")
    rms = np.sqrt(np.divide(sq, n, out=np.zeros_like(sq), where=n > 0))
    good = rms[rms > 0]
    return np.where(rms > 0, rms, float(np.median(good)) if good.size else 1.0)


def calibrate_channel_scale(samples, tau: float) -> tuple[float, ...]:
    """Per-channel RMS of T_below, for `CodecConfig.channel_scale`."""
    return tuple(float(v) for v in channel_rms_below(samples, tau).astype(np.float32))


def calibrate_channel_class(samples, tau: float, n_classes: int = 8) -> tuple[int, ...]:
    """Class 0..n_classes-1 per channel by quantiles of log RMS of T_below (class 0 = quietest),
    for `CodecConfig.channel_class`."""
    if not 1 <= n_classes <= MAX_CLASSES:
        raise SplitLLMError(f"channel classes must number 1..{MAX_CLASSES}, got {n_classes}")
    log_rms = np.log(channel_rms_below(samples, tau))
    edges = np.quantile(log_rms, np.linspace(0, 1, n_classes + 1)[1:-1])
    return tuple(int(c) for c in np.searchsorted(edges, log_rms, side="right"))


def calibrate_symbol_model(samples, cfg: CodecConfig) -> tuple[tuple[int, ...], ...]:
    """Symbol counts per (width, channel class) for `CodecConfig.symbol_model`: the samples are
    split at cfg's tau (which must be absolute), scaled by its channel_scale if any, and
    quantized at each width in turn; counts get +1 (every symbol stays cheap enough to code)
    and are normalized to the entropy coder's COUNT_TOTAL."""
    if cfg.tau is None:
        raise SplitLLMError("calibrate the symbol model with an absolute tau (calibrate tau first)")
    if isinstance(samples, (torch.Tensor, np.ndarray)):
        samples = [samples]
    rows = [s.detach().to("cpu", torch.float32).numpy() if isinstance(s, torch.Tensor) else np.asarray(s, np.float32)
            for s in samples]
    x = np.concatenate([r.reshape(-1, r.shape[-1]) for r in rows])              # [tokens, hidden]
    if x.size == 0 or not np.isfinite(x).all():
        raise SplitLLMError("cannot calibrate the symbol model from empty or non-finite samples")
    _, below = split_threshold(x, cfg.tau)
    if cfg._scale is not None:
        below = below / cfg._scale
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


def calibrate_from_samples(samples: torch.Tensor, settings: CodecSettings) -> CodecConfig:
    """The deployment config from hidden states [tokens, hidden]: τ fixed (from the quantile,
    or as given), and, with entropy coding, channel classes + a static symbol model."""
    cfg = CodecConfig.from_settings(settings)
    if settings.tau is None:
        cfg = replace(cfg, tau=calibrate_tau(samples, settings.tau_quantile), tau_quantile=None)
    if settings.entropy:
        cfg = replace(cfg, channel_class=calibrate_channel_class(samples, cfg.tau, settings.n_classes))
        cfg = replace(cfg, symbol_model=calibrate_symbol_model(samples, cfg))
    return cfg
