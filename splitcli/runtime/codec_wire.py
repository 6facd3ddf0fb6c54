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


class PredictiveWire:
    """`Wire` for frame format 4 (`splitcli.codec.predictive`): the residual of a prediction from the
    tokens crosses the wire, so `encode` needs the token ids of the rows (and the token before them);
    the frame carries the ids, so `decode` needs nothing but the codec and the input embeddings.

    The session passes the ids (`needs_ids`); a path that cannot gets a clear error, not a wrong frame."""

    needs_ids = True

    def __init__(self, pc, emb: torch.Tensor, name: str = "predictive", keep_stats: bool = True):
        from ..codec.predictive import embedding_crc
        from ..errors import SplitLLMError

        self.pc, self.name, self.keep_stats = pc, name, keep_stats
        # a tensor, or an edge's 8-bit table read by rows (`splitcli.codec.predictive`)
        self.emb = emb.detach().to(torch.float32).contiguous() if isinstance(emb, torch.Tensor) else emb
        if len(self.emb.shape) != 2 or self.emb.shape[1] != pc.hidden or embedding_crc(self.emb) != pc.emb_crc:
            raise SplitLLMError("the predictive codec was fitted with other input embeddings than this model's")
        self.frame_bytes: list[int] = []
        from ..quant import kernels

        kernels.available()   # decode steps run on splitllm's CPU kernels: built now (once), not in the first step

    def encode(self, hidden: torch.Tensor, ids=None, prev_id: int | None = None) -> bytes:  # [N, H] -> frame
        from ..codec import predictive
        from ..errors import SplitLLMError

        if ids is None:
            raise SplitLLMError("the predictive wire needs the token ids of what it encodes; "
                                "this path does not pass them (use the tabq wire here)")
        frame = predictive.encode(hidden, ids, self.pc, self.emb,
                                  predictive.NO_TOKEN if prev_id is None else int(prev_id))
        if self.keep_stats:
            self.frame_bytes.append(len(frame))
        return frame

    def decode(self, frame: bytes) -> torch.Tensor:  # frame -> [N, H] float32
        from ..codec import predictive

        return predictive.decode(frame, self.pc, self.emb)

    def expected_frame_bytes(self, rows: int) -> float:
        """A frame of `rows` hidden states on average (`codec.predictive.expected_frame_bytes`)."""
        from ..codec import predictive

        return predictive.expected_frame_bytes(self.pc, rows, self.emb.shape[0])
