"""Codec parameters: one frozen, validated dataclass shared by encoder, benchmark and plan."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, fields

import numpy as np

from splitcli.errors import SplitLLMError
# The bounds' one home is the user-facing settings type (torch-free, carried by plans).
from splitcli.plan.codec_settings import (  # noqa: F401
    DEFAULT_DELTA, DEFAULT_Q_BAR, DEFAULT_TAU_QUANTILE, MAX_CLASSES, MAX_Q_BAR, MIN_Q, check_codec_bounds,
    check_transform_bounds,
)

#: Newest wire-format version (frame.py): 2 added the compact header for one-token frames, 3 the
#: Hadamard rotation (its seed in the header). Frames that use no version-3 feature are still
#: written as version 2, so older decoders keep reading them.
FORMAT_VERSION = 3
#: Config versions this build reads (a version-2 config is a version-3 one without rotation).
_CONFIG_VERSIONS = (2, 3)


@dataclass(frozen=True)
class CodecConfig:
    """Parameters of the intermediate-output codec (paper §2.3).

    tau / tau_quantile: threshold splitting (eq. 4). Give exactly one. `tau` is an absolute
        magnitude (`math.inf` disables threshold splitting, i.e. "TAB-Q only"); `tau_quantile`
        q in [0, 1] puts tau at the q-quantile of |x| of each encoded tensor, so roughly a
        fraction 1 - q of the entries travels losslessly. Per-frame quantiles are meant for
        experiments; a deployment calibrates once with `calibrate_tau` and stores `tau`.
    q_bar: the widest TAB-Q code in bits, sign bit included (the paper's Q̄).
    q_min: the narrowest code TAB-Q may lower a token to (the paper's underlined Q).
    delta: distortion tolerance Δ: the per-token relative L2 error of the TAB-Q part, see
        `splitcli.codec.tabq.tab_q`.
    entropy: allow rANS coding of the symbols; when off (or when it would not pay) the
        symbols are bit-packed at their width.
    channel_scale: optional per-channel divisor c [hidden] applied to T_below before TAB-Q's
        per-token step (and multiplied back after eq. 7). Not part of the paper's recipe
        (None = the paper's recipe): on SmolLM2 a few channels carry most of T_below's energy,
        so one token's range is set by them and every other channel lands on a few levels.
        Calibrate once with `calibrate_channel_scale` and persist it with the config; frames
        carry only its crc32, and `decode` must be given the same config.
    channel_class: optional class id (0..15) per channel; the entropy coder may then keep one
        symbol model per (width, class) instead of per width (see `calibrate.py`). Lossless;
        persisted like channel_scale, frames carry its crc32.
    rotation_seed: None (no rotation) or the seed of the randomized Hadamard rotation applied to
        T_below after channel_scale and before TAB-Q (splitcli.codec.transform; not in the paper).
        The frame carries the seed, so decoding needs nothing else for it.
    symbol_model: optional calibrated symbol counts, one list per (width, class), width-major:
        widths q_min..q_bar, classes 0..max(channel_class) (one class without channel_class);
        each list has 2^width entries in 0..65535. Held by both sides so that small
        (decode-step) frames need not carry a model. Lossless; see `calibrate_symbol_model`.
        Frames carry its crc32.
    """

    tau: float | None = None
    tau_quantile: float | None = DEFAULT_TAU_QUANTILE
    q_bar: int = DEFAULT_Q_BAR
    q_min: int = MIN_Q
    delta: float = DEFAULT_DELTA
    entropy: bool = True
    channel_scale: tuple[float, ...] | None = None
    channel_class: tuple[int, ...] | None = None
    symbol_model: tuple[tuple[int, ...], ...] | None = None
    rotation_seed: int | None = None
    version: int = FORMAT_VERSION
    _scale: np.ndarray | None = field(init=False, repr=False, compare=False, default=None)
    _scale_crc: int = field(init=False, repr=False, compare=False, default=0)
    _class_cols: list | None = field(init=False, repr=False, compare=False, default=None)
    _class_crc: int = field(init=False, repr=False, compare=False, default=0)
    _static: dict | None = field(init=False, repr=False, compare=False, default=None)
    _static_crc: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        if self.version not in _CONFIG_VERSIONS:
            raise SplitLLMError(f"codec config version {self.version!r} is not supported "
                                f"(this build reads versions {', '.join(map(str, _CONFIG_VERSIONS))})")
        check_codec_bounds(self.tau, self.tau_quantile, self.q_bar, self.q_min, self.delta, self.entropy)
        if self.rotation_seed is not None:
            if self.version < 3:
                raise SplitLLMError("codec rotation_seed needs config version 3")
            check_transform_bounds("hadamard", self.rotation_seed, 0.0)
        if self.channel_scale is not None:
            scale, crc = channel_scale_array(self.channel_scale)
            # cached on the frozen instance: encode runs per decode step and must stay cheap
            object.__setattr__(self, "channel_scale", tuple(float(v) for v in scale))
            object.__setattr__(self, "_scale", scale)
            object.__setattr__(self, "_scale_crc", crc)
        if self.channel_class is not None:
            cols, crc = channel_class_columns(self.channel_class)
            object.__setattr__(self, "channel_class", tuple(int(c) for c in self.channel_class))
            object.__setattr__(self, "_class_cols", cols)
            object.__setattr__(self, "_class_crc", crc)
        if self.symbol_model is not None:
            n_classes = max(self.channel_class) + 1 if self.channel_class is not None else 1
            models, crc = static_models(self.symbol_model, self.q_min, self.q_bar, n_classes)
            object.__setattr__(self, "symbol_model", tuple(tuple(int(c) for c in m) for m in self.symbol_model))
            object.__setattr__(self, "_static", models)
            object.__setattr__(self, "_static_crc", crc)
        if self.channel_scale is not None and self.channel_class is not None \
                and len(self.channel_scale) != len(self.channel_class):
            raise SplitLLMError("codec channel_scale and channel_class must have the same length")


    @classmethod
    def from_settings(cls, settings) -> "CodecConfig":
        """The uncalibrated wire config of a user's `CodecSettings` (τ still a quantile unless absolute)."""
        return cls(tau=settings.tau, tau_quantile=None if settings.tau is not None else settings.tau_quantile,
                   q_bar=settings.q_bar, delta=settings.delta, entropy=settings.entropy,
                   rotation_seed=settings.rotation_seed if settings.rotation == "hadamard" else None)

    def to_dict(self) -> dict:
        """Plain data for a plan file (JSON/YAML): the constructor's fields only, tuples as lists."""
        out = {}
        for f in fields(self):
            if not f.init:
                continue
            v = getattr(self, f.name)
            if f.name == "symbol_model" and v is not None:
                v = [list(m) for m in v]
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "CodecConfig":
        """Inverse of `to_dict`; unknown keys or bad values raise SplitLLMError."""
        if not isinstance(data, dict):
            raise SplitLLMError(f"codec config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SplitLLMError(f"codec config has unknown keys: {', '.join(map(str, unknown))}")
        kw = dict(data)
        for name in ("channel_scale", "channel_class"):
            if kw.get(name) is not None:
                kw[name] = tuple(kw[name])
        if kw.get("symbol_model") is not None:
            kw["symbol_model"] = tuple(tuple(m) for m in kw["symbol_model"])
        try:
            return cls(**kw)
        except TypeError as exc:
            raise SplitLLMError(f"codec config is invalid: {exc}") from exc

def channel_class_columns(channel_class) -> tuple[list[np.ndarray], int]:
    """Columns of each class (empty classes included, index = class id) and the crc32 a frame
    records to match the class vector."""
    try:
        cls = np.asarray(channel_class)
    except (TypeError, ValueError) as exc:
        raise SplitLLMError(f"codec channel_class must be a list of integers: {exc}") from exc
    if cls.ndim != 1 or cls.size == 0 or cls.size > 0xFFFF or cls.dtype.kind not in "iu":
        raise SplitLLMError("codec channel_class must be a non-empty 1-D list of integers")
    if cls.min() < 0 or cls.max() >= MAX_CLASSES:
        raise SplitLLMError(f"codec channel_class entries must lie in [0, {MAX_CLASSES})")
    cls = cls.astype(np.uint8)
    return [np.flatnonzero(cls == c) for c in range(int(cls.max()) + 1)], zlib.crc32(cls.tobytes())


def channel_scale_array(channel_scale) -> tuple[np.ndarray, int]:
    """Validated float32 channel scale and its crc32 (what a frame records to match it)."""
    try:
        scale = np.asarray(channel_scale, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise SplitLLMError(f"codec channel_scale must be a list of numbers: {exc}") from exc
    if scale.ndim != 1 or scale.size == 0 or scale.size > 0xFFFF:
        raise SplitLLMError(f"codec channel_scale must be a non-empty 1-D list, got shape {scale.shape}")
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise SplitLLMError("codec channel_scale entries must be finite and > 0")
    scale = np.ascontiguousarray(scale, dtype="<f4")
    return scale, zlib.crc32(scale.tobytes())


def static_models(symbol_model, q_min: int, q_bar: int, n_classes: int) -> tuple[dict, int]:
    """Validated static models {(width, class): GroupModel over [0, 2^width)} and their crc32."""
    from splitcli.codec.entropy import GroupModel   # entropy imports nothing from here at runtime

    keys = [(w, c) for w in range(q_min, q_bar + 1) for c in range(n_classes)]
    if len(symbol_model) != len(keys):
        raise SplitLLMError(f"codec symbol_model needs {len(keys)} count lists: widths {q_min}..{q_bar} "
                            f"x {n_classes} channel classes")
    models, crc = {}, 0
    for (width, cls), counts in zip(keys, symbol_model):
        try:
            arr = np.asarray(counts)
        except (TypeError, ValueError) as exc:
            raise SplitLLMError(f"codec symbol_model counts must be integers: {exc}") from exc
        if arr.shape != (1 << width,) or arr.dtype.kind not in "iu" or arr.min() < 0 \
                or arr.max() > 0xFFFF or arr.sum() == 0:
            raise SplitLLMError(f"codec symbol_model for width {width} needs {1 << width} "
                                "integer counts in 0..65535, not all zero")
        arr = arr.astype("<u2")
        crc = zlib.crc32(arr.tobytes(), crc)
        models[width, cls] = GroupModel(width, 0, arr)
    return models, crc
