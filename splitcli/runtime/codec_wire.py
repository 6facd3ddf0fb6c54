"""The compressing wire: hidden states cross the split as codec frames (threshold + TAB-Q + rANS).

The config must be the calibrated one both sides hold (calibrated once per model and ℓ by `splitcli.deploy.calibrate`): frames
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
