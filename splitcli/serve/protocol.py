"""What both ends of the protocol agree on: settings <-> messages, frame chunking, frame decoding.

The cloud and the edge client import these so a field is spelled one way: `CodecSettings` crosses
as `pb.CodecSettings` with the same names, wire kinds as `pb.WireKind`, and a frame larger than a
message as chunks of one step.
"""

from __future__ import annotations

import torch

from splitcli.codec import FrameError
from splitcli.errors import SplitLLMError
from splitcli.plan.codec_settings import CodecSettings
from splitcli.runtime.codec_wire import CodecWire
from splitcli.serve.proto import split_pb2 as pb

WIRE_TO_PB = {"none": pb.WIRE_NONE, "fp16": pb.WIRE_FP16, "tabq": pb.WIRE_TABQ}
PB_TO_WIRE = {v: k for k, v in WIRE_TO_PB.items()}
#: I_kv of eq. (3) -> KvMode; 0 (hidden states at ℓ) is what a plain split session sends.
IKV_TO_PB = {0: pb.KV_HIDDEN, 1: pb.KV_CACHE}
PB_TO_IKV = {v: k for k, v in IKV_TO_PB.items()}
#: The version of proto/split.proto these modules speak (Open.protocol_version).
PROTOCOL_VERSION = 1
#: Protocol overhead a chunk leaves room for inside one message (field tags, ids, lengths).
CHUNK_HEADROOM = 1024


def codec_to_pb(settings: CodecSettings) -> pb.CodecSettings:
    msg = pb.CodecSettings(q_bar=settings.q_bar, q_bar_min=settings.q_bar_min, delta=settings.delta,
                           entropy=settings.entropy, n_classes=settings.n_classes)
    if settings.tau is not None:
        msg.tau = settings.tau
    else:
        msg.tau_quantile = settings.tau_quantile
    return msg


def codec_from_pb(msg: pb.CodecSettings) -> CodecSettings:
    """The settings a peer sent, validated with the codec's own bounds (SplitLLMError otherwise)."""
    return CodecSettings(tau=msg.tau if msg.HasField("tau") else None,
                         tau_quantile=msg.tau_quantile if msg.HasField("tau_quantile") else None,
                         q_bar=msg.q_bar, q_bar_min=msg.q_bar_min, delta=msg.delta, entropy=msg.entropy,
                         n_classes=msg.n_classes)


def chunk_frame(frame: bytes, step_id: int, position: int, n_tokens: int, max_chunk: int,
                kind: int = pb.PAYLOAD_HIDDEN, q_bar: int = 0) -> list[pb.ClientMessage]:
    """One step's frame as messages of at most `max_chunk` payload bytes each (at least one).
    `q_bar` > 0: the codec frame was coded at that q̄ (Step.q_bar), 0: at the session's."""
    if max_chunk < 1:
        raise SplitLLMError(f"chunk size must be >= 1 byte, got {max_chunk}")
    pieces = [frame[i: i + max_chunk] for i in range(0, len(frame), max_chunk)] or [b""]
    return [pb.ClientMessage(step=pb.Step(step_id=step_id, position=position, n_tokens=n_tokens, payload=p,
                                          chunk_index=i, chunk_count=len(pieces), kind=kind, q_bar=q_bar))
            for i, p in enumerate(pieces)]


def decode_frame(wire, frame: bytes, n_tokens: int, hidden_size: int, cfg=None) -> torch.Tensor:
    """A peer's frame -> hidden states [n_tokens, H] float32, or SplitLLMError; `cfg` replaces a
    codec wire's config (a frame coded at another q̄). Sizes are capped at
    what the step claims before the codec allocates anything; a raw frame's length must match its
    header exactly (RawWire checks), so neither can make the server allocate more than it received
    times a small factor."""
    if isinstance(wire, CodecWire):
        from splitcli.codec import decode

        hidden = decode(frame, cfg or wire.cfg, max_tokens=n_tokens, max_hidden=hidden_size,
                        max_elements=n_tokens * hidden_size).to(torch.float32)
    else:
        hidden = wire.decode(frame)
    if tuple(hidden.shape) != (n_tokens, hidden_size):
        raise FrameError(f"frame holds hidden states of shape {tuple(hidden.shape)}, the step claims "
                         f"[{n_tokens}, {hidden_size}]")
    if not torch.isfinite(hidden).all():
        raise FrameError("frame holds NaN or Inf")
    return hidden
