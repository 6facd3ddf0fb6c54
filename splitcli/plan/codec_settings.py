"""The codec settings a user chooses: one type, one set of bounds, carried by the plan.

`CodecSettings` is what the CLI's codec options, a plan's `codec:` block, the evaluator's
pipeline and the early-exit policy all hold. Calibration on a model (splitcli.deploy) turns it
into the wire's full `splitcli.codec.CodecConfig` (an absolute τ, channel classes, a static
symbol model). Torch-free, so the planner can carry it.

Bounds (the codec's, so every holder agrees):
- τ: exactly one of `tau` (absolute, >= 0; inf = TAB-Q alone, no threshold splitting; 0 = every
  entry travels losslessly) and `tau_quantile` (in [0, 1], calibrated once on a model); neither
  given means the default quantile 0.999 (chosen on SmolLM2-135M at ℓ = 15, README "Codec").
- q̄ (`q_bar`, the widest TAB-Q code, sign included) in [MIN_Q, MAX_Q_BAR] = [2, 8];
  `q_bar_min`, the lowest q̄ the live early-exit policy may fall back to, in [MIN_Q, q_bar].
- Δ (`delta`, TAB-Q's per-token relative error tolerance) in [0, 1).
- `entropy`: rANS-code the symbols (lossless; off = bit-pack them). `n_classes`: channel classes
  the entropy coder calibrates, in [1, MAX_CLASSES].
- `rotation` (not in the paper): "none" or "hadamard" (a seeded randomized Hadamard rotation of
  T_below, `rotation_seed` in [0, 2^32)); known to both ends, only the seed crosses the wire.
- `channel_alpha` in [0, 1] (not in the paper): divide channel c of T_below by rms_c^alpha
  (calibrated offline, stored with the calibrated config; 0 = off, 1 = equalize channels).
- `target_rel_error` (not in the paper): None, or a distortion target in (0, 1): calibration
  then picks q̄ (lowest first) per model and layer so that the mean per-token relative L2 error
  on the calibration text is <= the target, and reports what it chose.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from splitcli.errors import SplitLLMError

#: Narrowest TAB-Q code: one sign bit and one magnitude bit (levels {0, 1}).
MIN_Q = 2
#: Widest TAB-Q code (sign included); symbols then fit one byte.
MAX_Q_BAR = 8
#: Most channel classes (one entropy model per width and class).
MAX_CLASSES = 16
#: Defaults chosen on SmolLM2-135M at ℓ = 15 (README, "Codec"); the wire's CodecConfig uses them too.
DEFAULT_TAU_QUANTILE = 0.999
DEFAULT_Q_BAR = 6
DEFAULT_DELTA = 0.05
#: The stated distortion target of the defaults (mean per-token relative error of the non-massive
#: channels, splitcli.codec.calibrate): calibration falls back to it when the fixed settings
#: exceed GUARD_REL_ERROR on a model (massive activations); the paper's recipe measures
#: 0.08-0.16 on SmolLM2-135M at ℓ = 1..29, so it never trips there.
DEFAULT_TARGET_REL_ERROR = 0.15
GUARD_REL_ERROR = 0.5
#: The predictive codec's default `BulkError` target (splitcli.codec.predictive_fit): the fit
#: `profile --predictive` measures and a plan of wire "predictive" deploys. Shaped by the cloud's
#: Fisher, the codec spends more error where the loss is least sensitive, so its error in h is
#: larger at equal perplexity than the unshaped codec's (whose default was 0.15). Chosen on
#: SmolLM2-135M at ℓ = 15 on validation windows 8-15 of WikiText-2: the smallest target (0.005
#: grid) whose size clears 8× vs fp16 by 2% there (8.17×, +0.69% perplexity); docs/results.md,
#: "Shaping the codec by the cloud's true Fisher".
DEFAULT_PREDICTIVE_TARGET_REL_ERROR = 0.175
#: Orthogonal rotations the codec knows (splitcli.codec.transform).
ROTATIONS = ("none", "hadamard")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def check_codec_bounds(tau, tau_quantile, q_bar, q_low, delta, entropy, low_name: str = "q_min") -> None:
    """The one set of bounds, shared by these settings and the wire's `CodecConfig`."""
    if (tau is None) == (tau_quantile is None):
        raise SplitLLMError("codec settings need exactly one of tau (absolute) and tau_quantile")
    if tau is not None and not (_is_number(tau) and tau >= 0):
        raise SplitLLMError(f"codec tau must be a number >= 0 (inf: TAB-Q alone, 0: every entry "
                            f"lossless), got {tau!r}")
    if tau_quantile is not None and not (_is_number(tau_quantile) and 0 <= tau_quantile <= 1):
        raise SplitLLMError(f"codec tau_quantile must lie in [0, 1], got {tau_quantile!r}")
    if not (_is_int(q_bar) and MIN_Q <= q_bar <= MAX_Q_BAR):
        raise SplitLLMError(f"codec q_bar must be an integer in [{MIN_Q}, {MAX_Q_BAR}], got {q_bar!r}")
    if not (_is_int(q_low) and MIN_Q <= q_low <= q_bar):
        raise SplitLLMError(f"codec {low_name} must be an integer in [{MIN_Q}, q_bar = {q_bar}], got {q_low!r}")
    if not (_is_number(delta) and 0 <= delta < 1):
        raise SplitLLMError(f"codec delta must lie in [0, 1), got {delta!r}")
    if not isinstance(entropy, bool):
        raise SplitLLMError(f"codec entropy must be true or false, got {entropy!r}")


def check_transform_bounds(rotation, rotation_seed, channel_alpha) -> None:
    """Bounds of the transforms known to both ends (format v3), shared with the wire's config."""
    if rotation not in ROTATIONS:
        raise SplitLLMError(f"codec rotation must be one of {', '.join(ROTATIONS)}, got {rotation!r}")
    if not (_is_int(rotation_seed) and 0 <= rotation_seed <= 0xFFFFFFFF):
        raise SplitLLMError(f"codec rotation_seed must be an integer in [0, 2^32), got {rotation_seed!r}")
    if not (_is_number(channel_alpha) and 0 <= channel_alpha <= 1):
        raise SplitLLMError(f"codec channel_alpha must lie in [0, 1], got {channel_alpha!r}")


@dataclass(frozen=True)
class CodecSettings:
    """TS + TAB-Q + rANS settings (see the module docstring for every bound)."""

    tau: float | None = None
    tau_quantile: float | None = None
    q_bar: int = DEFAULT_Q_BAR
    q_bar_min: int = MIN_Q
    delta: float = DEFAULT_DELTA
    entropy: bool = True
    n_classes: int = 8
    rotation: str = "none"
    rotation_seed: int = 0
    channel_alpha: float = 0.0
    target_rel_error: float | None = None

    #: Pairs `overlay` treats as one choice: giving one clears the other.
    EXCLUSIVE = (("tau", "tau_quantile"),)

    def __post_init__(self) -> None:
        if self.tau is None and self.tau_quantile is None:
            object.__setattr__(self, "tau_quantile", DEFAULT_TAU_QUANTILE)
        check_codec_bounds(self.tau, self.tau_quantile, self.q_bar, self.q_bar_min, self.delta, self.entropy,
                           low_name="q_bar_min")
        if not (_is_int(self.n_classes) and 1 <= self.n_classes <= MAX_CLASSES):
            raise SplitLLMError(f"codec n_classes must be an integer in [1, {MAX_CLASSES}], got {self.n_classes!r}")
        check_transform_bounds(self.rotation, self.rotation_seed, self.channel_alpha)
        t = self.target_rel_error
        if t is not None and not (_is_number(t) and 0 < t < 1):
            raise SplitLLMError(f"codec target_rel_error must be None or lie in (0, 1), got {t!r}")

    @property
    def tau_value(self) -> float:
        """The τ number (absolute or quantile) as profile codec points key it."""
        return self.tau if self.tau is not None else self.tau_quantile  # type: ignore[return-value]

    @property
    def needs_samples(self) -> bool:
        """An absolute τ without entropy coding needs no calibration (and no data) at all."""
        return self.tau is None or self.entropy or self.channel_alpha > 0 or self.target_rel_error is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "codec") -> "CodecSettings":
        if not isinstance(data, dict):
            raise SplitLLMError(f"{where} must be a mapping of codec settings, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SplitLLMError(f"{where} has unknown keys: {', '.join(map(str, unknown))} "
                                f"(known: {', '.join(sorted(known))})")
        return cls(**data)
