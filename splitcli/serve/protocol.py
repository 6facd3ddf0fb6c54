"""What both ends of the protocol agree on: settings <-> messages, frame chunking, frame decoding.

The cloud and the edge client import these so a field is spelled one way: `CodecSettings` crosses
as `pb.CodecSettings` with the same names, wire kinds as `pb.WireKind`, and a frame larger than a
message as chunks of one step.
"""

from __future__ import annotations

import numpy as np
import torch

from splitcli.codec import CodecConfig, FrameError
from splitcli.codec.config import MAX_CLASSES, MAX_Q_BAR, MIN_Q
from splitcli.errors import SplitLLMError
from splitcli.plan.codec_settings import CodecSettings
from splitcli.runtime.codec_wire import CodecWire
from splitcli.serve.proto import split_pb2 as pb

WIRE_TO_PB = {"none": pb.WIRE_NONE, "fp16": pb.WIRE_FP16, "bf16": pb.WIRE_BF16, "tabq": pb.WIRE_TABQ,
              "predictive": pb.WIRE_PREDICTIVE}
PB_TO_WIRE = {v: k for k, v in WIRE_TO_PB.items()}
#: I_kv of eq. (3) -> KvMode; 0 (hidden states at ℓ) is what a plain split session sends.
IKV_TO_PB = {0: pb.KV_HIDDEN, 1: pb.KV_CACHE}
PB_TO_IKV = {v: k for k, v in IKV_TO_PB.items()}
#: The version of proto/split.proto these modules speak (Open.protocol_version).
PROTOCOL_VERSION = 1
#: Protocol overhead a chunk leaves room for inside one message (field tags, ids, lengths).
CHUNK_HEADROOM = 1024


ROTATION_TO_PB = {"none": pb.ROTATION_NONE, "hadamard": pb.ROTATION_HADAMARD}
PB_TO_ROTATION = {v: k for k, v in ROTATION_TO_PB.items()}
#: A channel scale entry from a peer must lie in [1 / MAX_CHANNEL_SCALE, MAX_CHANNEL_SCALE].
#: Calibration normalizes rms^alpha to geometric mean 1, so real scales sit within a few decades of
#: 1; anything near float32's ends would only push reconstructions to overflow and saturate.
MAX_CHANNEL_SCALE = 1e12


def _set_tau(msg, tau: float | None, tau_quantile: float | None) -> None:
    """Exactly one of the two optional fields is present on the wire, as in both dataclasses."""
    if tau is not None:
        msg.tau = tau
    else:
        msg.tau_quantile = tau_quantile


def codec_to_pb(settings: CodecSettings) -> pb.CodecSettings:
    msg = pb.CodecSettings(q_bar=settings.q_bar, q_bar_min=settings.q_bar_min, delta=settings.delta,
                           entropy=settings.entropy, n_classes=settings.n_classes,
                           rotation=ROTATION_TO_PB[settings.rotation], rotation_seed=settings.rotation_seed,
                           channel_alpha=settings.channel_alpha)
    _set_tau(msg, settings.tau, settings.tau_quantile)
    if settings.target_rel_error is not None:
        msg.target_rel_error = settings.target_rel_error
    return msg


def codec_from_pb(msg: pb.CodecSettings) -> CodecSettings:
    """The settings a peer sent, validated with the codec's own bounds (SplitLLMError otherwise).
    An older edge sends no v3 fields: they read as no rotation, alpha 0, no target."""
    if msg.rotation not in PB_TO_ROTATION:
        raise SplitLLMError(f"codec rotation {msg.rotation} is unknown (known: {', '.join(ROTATION_TO_PB)})")
    return CodecSettings(tau=msg.tau if msg.HasField("tau") else None,
                         tau_quantile=msg.tau_quantile if msg.HasField("tau_quantile") else None,
                         q_bar=msg.q_bar, q_bar_min=msg.q_bar_min, delta=msg.delta, entropy=msg.entropy,
                         n_classes=msg.n_classes, rotation=PB_TO_ROTATION[msg.rotation],
                         rotation_seed=msg.rotation_seed, channel_alpha=msg.channel_alpha,
                         target_rel_error=msg.target_rel_error if msg.HasField("target_rel_error") else None)


def codec_config_to_pb(cfg: CodecConfig) -> pb.CodecConfig:
    """The edge's calibrated codec as it crosses in the Open (every field; nothing recomputed)."""
    msg = pb.CodecConfig(version=cfg.version, q_bar=cfg.q_bar, q_min=cfg.q_min, delta=cfg.delta,
                         entropy=cfg.entropy, channel_scale=cfg.channel_scale or (),
                         channel_class=bytes(cfg.channel_class or ()),
                         symbol_model=[pb.SymbolCounts(counts=m) for m in cfg.symbol_model or ()])
    _set_tau(msg, cfg.tau, cfg.tau_quantile)
    if cfg.rotation_seed is not None:
        msg.rotation_seed = cfg.rotation_seed
    return msg


def codec_config_from_pb(msg: pb.CodecConfig, hidden_size: int) -> CodecConfig:
    """A peer's calibrated codec for a model of `hidden_size` channels, or SplitLLMError naming the
    bad field. Lengths and counts are checked against the model before any array is built (the
    message itself is bounded by the server's max_message_bytes)."""
    n_scale, n_class = len(msg.channel_scale), len(msg.channel_class)
    for name, n in (("channel_scale", n_scale), ("channel_class", n_class)):
        if n not in (0, hidden_size):
            raise SplitLLMError(f"codec_config.{name} has {n} entries; the model's hidden size is {hidden_size}")
    if not MIN_Q <= msg.q_min <= msg.q_bar <= MAX_Q_BAR:
        raise SplitLLMError(f"codec_config q_min = {msg.q_min}, q_bar = {msg.q_bar} must satisfy "
                            f"{MIN_Q} <= q_min <= q_bar <= {MAX_Q_BAR}")
    scale = None
    if n_scale:
        scale = np.asarray(msg.channel_scale, dtype=np.float32)                       # [hidden]
        if not (np.isfinite(scale).all() and (scale >= 1 / MAX_CHANNEL_SCALE).all()
                and (scale <= MAX_CHANNEL_SCALE).all()):
            raise SplitLLMError(f"codec_config.channel_scale entries must be finite and lie in "
                                f"[{1 / MAX_CHANNEL_SCALE:g}, {MAX_CHANNEL_SCALE:g}]")
    classes = None
    if n_class:
        classes = np.frombuffer(msg.channel_class, dtype=np.uint8)                     # [hidden]
        if int(classes.max()) >= MAX_CLASSES:
            raise SplitLLMError(f"codec_config.channel_class entries must lie in [0, {MAX_CLASSES})")
    model = None
    if len(msg.symbol_model):
        n_classes = int(classes.max()) + 1 if classes is not None else 1
        widths = [w for w in range(msg.q_min, msg.q_bar + 1) for _ in range(n_classes)]   # width-major
        if len(msg.symbol_model) != len(widths) or any(len(m.counts) != 1 << w
                                                       for m, w in zip(msg.symbol_model, widths)):
            raise SplitLLMError(f"codec_config.symbol_model needs {len(widths)} count lists of 2^width entries "
                                f"(widths {msg.q_min}..{msg.q_bar} x {n_classes} channel classes)")
        model = tuple(tuple(m.counts) for m in msg.symbol_model)
    return CodecConfig(version=msg.version,
                       tau=msg.tau if msg.HasField("tau") else None,
                       tau_quantile=msg.tau_quantile if msg.HasField("tau_quantile") else None,
                       q_bar=msg.q_bar, q_min=msg.q_min, delta=msg.delta, entropy=msg.entropy,
                       channel_scale=None if scale is None else tuple(scale.tolist()),
                       channel_class=None if classes is None else tuple(classes.tolist()),
                       symbol_model=model,
                       rotation_seed=msg.rotation_seed if msg.HasField("rotation_seed") else None)


def check_codec_config(cfg: CodecConfig, settings: CodecSettings, hidden_size: int) -> None:
    """SplitLLMError naming the setting when a peer's calibrated `cfg` is not one its `settings`
    can produce on a model of `hidden_size` (q̄ and τ are calibration's choice and not compared)."""
    from splitcli.codec.transform import rotation_supported

    want_seed = settings.rotation_seed if settings.rotation == "hadamard" else None
    if cfg.rotation_seed != want_seed:
        raise SplitLLMError(f"codec_config.rotation_seed {cfg.rotation_seed} does not match rotation "
                            f"{settings.rotation} with seed {settings.rotation_seed}")
    if want_seed is not None and not rotation_supported(hidden_size):
        raise SplitLLMError(f"codec rotation hadamard does not support the model's hidden size {hidden_size}")
    if (cfg.channel_scale is not None) != (settings.channel_alpha > 0):
        raise SplitLLMError(f"codec_config.channel_scale must be {'given' if settings.channel_alpha > 0 else 'absent'} "
                            f"with channel_alpha {settings.channel_alpha}")
    if cfg.entropy != settings.entropy or cfg.delta != settings.delta:
        raise SplitLLMError("codec_config entropy / delta differ from the session's codec settings")
    if cfg.channel_class is not None and max(cfg.channel_class) >= settings.n_classes:
        raise SplitLLMError(f"codec_config.channel_class uses more than the settings' n_classes = {settings.n_classes}")


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
    what the step claims (n_tokens x hidden, n_tokens within the session's admitted tokens)
    before the codec allocates anything, and a raw frame's length must match its header exactly
    (RawWire checks). What a codec frame decodes to is bounded by that claim, not by the frame's
    bytes: an entropy-coded body may legitimately be tiny (a constant tensor costs no body bits;
    rANS decodes symbols at the start of its range from an empty stream), so a 14 KB frame can
    decode to 16 MB, and the work it costs is that of the admitted step."""
    if isinstance(wire, CodecWire):
        from splitcli.codec import decode

        hidden = decode(frame, cfg or wire.cfg, max_tokens=n_tokens, max_hidden=hidden_size,
                        max_elements=n_tokens * hidden_size).to(torch.float32)
    elif getattr(wire, "needs_ids", False):   # token-predictive (format 4): its hidden size is the codec's
        from splitcli.codec import predictive

        hidden = predictive.decode(frame, wire.pc, wire.emb, max_tokens=n_tokens)
    else:
        hidden = wire.decode(frame)
    if tuple(hidden.shape) != (n_tokens, hidden_size):
        raise FrameError(f"frame holds hidden states of shape {tuple(hidden.shape)}, the step claims "
                         f"[{n_tokens}, {hidden_size}]")
    if not torch.isfinite(hidden).all():
        raise FrameError("frame holds NaN or Inf")
    return hidden
