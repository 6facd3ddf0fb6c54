"""The compressing wire: hidden states cross the split as codec frames (threshold + TAB-Q + rANS).

The config must be the calibrated one both sides hold (see `splitcli.codec.calibration`): frames
made with channel classes or a static symbol model decode only with the same config.
"""

from __future__ import annotations

import torch

from ..codec import CodecConfig, CodecStats, decode, encode_with_stats


class CodecWire:
    """`Wire` that encodes with `splitcli.codec` and keeps the CodecStats of every frame it sent."""

    def __init__(self, cfg: CodecConfig, name: str = "tabq", keep_stats: bool = True):
        self.cfg = cfg
        self.name = name
        self.keep_stats = keep_stats
        self.stats: list[CodecStats] = []  # one per encoded frame, in order (the step table's rows)

    @property
    def last_stats(self) -> CodecStats | None:
        return self.stats[-1] if self.stats else None

    def encode(self, hidden: torch.Tensor) -> bytes:  # [N, H] -> frame
        frame, stats = encode_with_stats(hidden.detach(), self.cfg)
        if self.keep_stats:
            self.stats.append(stats)
        return frame

    def decode(self, frame: bytes) -> torch.Tensor:  # frame -> [N, H] float32
        return decode(frame, self.cfg).to(torch.float32)


CODECS = ("none", "tabq")


def build_wire(codec: str, params, lm, split_layer: int, data_dir=None, progress=None):
    """The wire for `--codec`: RawWire for "none", a calibrated CodecWire for "tabq".
    `params` is a `splitcli.codec.deploy.CodecOptions` (ignored for "none")."""
    from ..codec.deploy import calibrated_config
    from ..errors import SplitLLMError
    from .wire import RawWire

    if codec == "none":
        return RawWire("fp32")
    if codec != "tabq":
        raise SplitLLMError(f"--codec must be one of {', '.join(CODECS)}, got {codec!r}")
    cfg, _ = calibrated_config(lm, split_layer, params, data_dir, progress)
    return CodecWire(cfg)


def codec_params(codec: str, tau: float | None = None, tau_quantile: float | None = None,
                 q_bar: int | None = None, delta: float | None = None, entropy: bool = True, data_dir=None):
    """Validated CodecOptions from the CLI's codec options (None = the default), before any
    model loads; codec options with `--codec none` are an error rather than silently ignored,
    and a missing calibration text is reported now rather than after loading the model."""
    from ..codec.deploy import CodecOptions, wikitext_path
    from ..errors import SplitLLMError

    if codec not in CODECS:
        raise SplitLLMError(f"--codec must be one of {', '.join(CODECS)}, got {codec!r}")
    given = [n for n, v in (("--tau", tau), ("--tau-quantile", tau_quantile), ("--max-bits", q_bar),
                            ("--delta", delta)) if v is not None] + ([] if entropy else ["--no-entropy"])
    if codec == "none":
        if given:
            raise SplitLLMError(f"{', '.join(given)} need --codec tabq")
        return None
    defaults = CodecOptions()
    params = CodecOptions(tau=tau, tau_quantile=tau_quantile, q_bar=defaults.q_bar if q_bar is None else q_bar,
                         delta=defaults.delta if delta is None else delta, entropy=entropy)
    if params.needs_samples:
        wikitext_path(data_dir)
    return params
