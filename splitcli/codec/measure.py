"""Measurements behind `splitllm bench codec`: sizes, errors and speeds of the codec vs baselines.

Everything takes hidden states [tokens, hidden] (real ones, dumped at the split layer) and returns
plain dataclasses / dict rows; printing is the caller's job.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import zstandard

from splitcli.codec.config import CodecConfig
from splitcli.codec.frame import decode, encode, encode_with_stats
from splitcli.codec.threshold import calibrate_tau
from splitcli.errors import SplitLLMError


@dataclass(frozen=True)
class MethodRow:
    """One wire format: bytes per token and the relative L2 error it leaves (0 = lossless)."""

    method: str
    bytes_per_token: float
    ratio_vs_fp16: float
    rel_l2: float


@dataclass(frozen=True)
class CodecReport:
    methods: list[MethodRow]
    encode_ms_token: float       # one decode-step token, median of repeats
    decode_ms_token: float
    prefill_encode_mb_s: float   # MB (1e6 bytes) of fp32 input per second, `prefill_tokens` tokens
    prefill_tokens: int
    entropy_overhead: float      # coded_bits / entropy_bits - 1 over the prefill frame's body
    codec_path: str              # the body path of the all-tokens frame
    token_bytes: float           # mean size of a one-token (decode-step) frame
    token_ratio_vs_fp16: float
    token_path: str              # the path the first single token took
    tau: float
    mean_width: float
    outliers_per_token: float

    def as_dict(self) -> dict:
        return asdict(self)


def _rel_l2(y: torch.Tensor, x: torch.Tensor) -> float:
    n = float(x.norm())
    return float((y.float() - x).norm()) / n if n > 0 else 0.0


def _int8_absmax(x: torch.Tensor) -> torch.Tensor:
    """Symmetric per-token int8 with an absmax scale (the scale costs 4 bytes a token)."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127       # [tokens, 1]
    return torch.round(x / scale).clamp(-127, 127) * scale


def _median_ms(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of fn, ms (the codec benches' one timing rule)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _prepare(hidden) -> torch.Tensor:
    x = torch.as_tensor(hidden).detach().to("cpu", torch.float32)
    if x.dim() == 3:
        x = x.reshape(-1, x.shape[-1])
    if x.dim() != 2 or x.shape[0] == 0:
        raise SplitLLMError(f"codec benchmark needs hidden states [tokens, hidden], got {tuple(x.shape)}")
    return x.contiguous()


def measure_codec(hidden, cfg: CodecConfig, *, repeats: int = 50, prefill_tokens: int = 2048,
                  prefill_repeats: int = 3) -> CodecReport:
    """Compare fp32, fp16, int8 (per-token absmax), zstd-3(fp16) and the codec on `hidden`.

    Sizes and errors are over all of `hidden` (one frame). The decode-step timing and size use
    single-row frames; prefill throughput encodes `prefill_tokens` rows (tiled if fewer are
    given). Pass a calibrated config (`calibrate_config` on other samples) for deployment numbers;
    entropy_overhead compares the all-tokens frame's coded body with the empirical entropy of its
    symbols under the grouping its path used."""
    x = _prepare(hidden)                                                  # [tokens, hidden]
    tokens, width = x.shape
    fp16 = x.half()
    zstd_bytes = len(zstandard.ZstdCompressor(level=3).compress(fp16.numpy().tobytes()))
    frame, stats = encode_with_stats(x, cfg)
    y = decode(frame, cfg)
    fp16_bpt = 2 * width
    rows = [
        MethodRow("fp32", 4 * width, 0.5, 0.0),
        MethodRow("fp16", fp16_bpt, 1.0, _rel_l2(fp16, x)),
        MethodRow("int8", width + 4, fp16_bpt / (width + 4), _rel_l2(_int8_absmax(x), x)),
        MethodRow("zstd(fp16)", zstd_bytes / tokens, fp16_bpt * tokens / zstd_bytes, _rel_l2(fp16, x)),
        MethodRow("codec", len(frame) / tokens, fp16_bpt * tokens / len(frame), _rel_l2(y, x)),
    ]

    counter = iter(range(1 << 62))
    token_frames = [encode(x[i:i + 1], cfg) for i in range(min(tokens, 64))]
    enc_ms = _median_ms(lambda: encode(x[next(counter) % tokens:][:1], cfg), repeats)
    dec_ms = _median_ms(lambda: decode(token_frames[next(counter) % len(token_frames)], cfg), repeats)
    _, token_stats = encode_with_stats(x[:1], cfg)
    token_bytes = sum(len(f) for f in token_frames) / len(token_frames)

    reps = -(-prefill_tokens // tokens)
    prefill = x.repeat(reps, 1)[:prefill_tokens].contiguous()
    pre_ms = _median_ms(lambda: encode(prefill, cfg), prefill_repeats)
    return CodecReport(methods=rows, encode_ms_token=enc_ms, decode_ms_token=dec_ms,
                       prefill_encode_mb_s=prefill.numel() * 4 / 1e6 / (pre_ms / 1e3),
                       prefill_tokens=prefill_tokens, entropy_overhead=stats.entropy_overhead,
                       codec_path=stats.path, token_bytes=token_bytes, token_ratio_vs_fp16=fp16_bpt / token_bytes,
                       token_path=token_stats.path, tau=stats.tau,
                       mean_width=stats.mean_width, outliers_per_token=stats.n_outliers / tokens)


def sweep_codec(hidden, base: CodecConfig, *, tau_quantiles=(0.99, 0.995, 0.999, 0.9999),
                q_bars=(3, 4, 5, 6, 8), calibration=None) -> list[dict]:
    """Size/error over a tau x q_bar grid (paper Figs. 6-7). tau is calibrated once per quantile
    on `calibration` (default: `hidden` itself) and then used as an absolute threshold, as a
    deployment would. Returns one dict per grid point."""
    x = _prepare(hidden)
    calib = x if calibration is None else _prepare(calibration)
    out = []
    for tq in tau_quantiles:
        tau = calibrate_tau(calib, tq)
        for q_bar in q_bars:
            cfg = replace(base, tau=tau, tau_quantile=None, q_bar=q_bar, q_min=min(base.q_min, q_bar),
                          symbol_model=None)   # a static model is per q range; frames here are large
            frame, stats = encode_with_stats(x, cfg)
            out.append(dict(tau_quantile=tq, tau=tau, q_bar=q_bar, delta=cfg.delta,
                            bytes_per_token=len(frame) / x.shape[0],
                            ratio_vs_fp16=2 * x.numel() / len(frame), rel_l2=_rel_l2(decode(frame, cfg), x),
                            mean_width=stats.mean_width, outliers_per_token=stats.n_outliers / x.shape[0],
                            entropy_overhead=stats.entropy_overhead, path=stats.path))
    return out
