"""The codec section of a profile: measured frame sizes and distortion per (q̄, τ, recipe, ℓ).

`splitllm profile` measures the codec (`splitcli.deploy.measure.default_codec_hook`) on the hidden
states at a few split layers ℓ (the output of layers [0, ℓ)), with every codec recipe
(`splitcli.plan.recipes`) at each q̄: the bytes of a one-token frame and `rel_error`, the mean
per-token relative L2 error of the non-massive channels. The planner reads the point at the
candidate's (q̄, τ, recipe) measured at the nearest ℓ. Format history: 1 = points keyed by
(q̄, τ) only (the paper's recipe, no error, no layer); 2 = recipe, rel_error and split_layer;
4 = a point may be the token-predictive codec's (`wire: predictive`, `splitllm profile
--predictive`, with its own encode time `encode_ms`): its q̄ is the width eq. (8a)'s Ψ counts it at (`splitcli.plan.recipes`), its τ the
default quantile, both nominal; the planner takes it at the nearest measured ℓ whatever q̄ it asks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from splitcli.errors import SplitLLMError
from splitcli.plan._validate import check_int, check_keys, check_number, require_mapping
from splitcli.plan.recipes import PAPER_RECIPE, PREDICTIVE_RECIPE, Recipe

#: 2: codec points carry their recipe (rotation, channel_alpha), measured rel_error and split layer.
#: 3: the profile may say which tokens the codec points were measured on (codec_source), so an
#: older splitllm says "newer format" instead of "unknown key".
#: 4: codec points may be the predictive codec's (`wire`).
PROFILE_FORMAT_VERSION = 4
#: Versions this splitllm reads; a version-1 file's codec points are the paper's recipe.
READABLE_PROFILE_VERSIONS = (1, 2, 3, 4)


@dataclass(frozen=True)
class CodecPoint:
    """Measured wire size of the codec at one (q_bar, tau, recipe, split_layer); tau is absolute
    unless `tau_is_quantile`. `rel_error`: the distortion measured with it (None: not measured,
    as in a format-1 profile). The recipe defaults to the paper's (no rotation, α 0);
    `split_layer` None means measured at an unrecorded layer (format 1), standing for every ℓ."""

    q_bar: int
    tau: float
    bytes_per_token: float
    tau_is_quantile: bool = False
    rotation: str = "none"
    channel_alpha: float = 0.0
    rel_error: float | None = None
    split_layer: int | None = None
    wire: str = "tabq"
    encode_ms: float | None = None   # this point's own encode ms of a one-token frame (None: the codec's median)

    def __post_init__(self) -> None:
        check_int(self.q_bar, "codec q_bar", 2, 16)
        check_number(self.tau, "codec tau")
        check_number(self.bytes_per_token, "codec bytes_per_token")
        if not isinstance(self.tau_is_quantile, bool):
            raise SplitLLMError("codec tau_is_quantile must be true or false")
        object.__setattr__(self, "channel_alpha", Recipe(self.rotation, self.channel_alpha, self.wire).channel_alpha)
        if self.rel_error is not None:
            check_number(self.rel_error, "codec rel_error")
        if self.split_layer is not None:
            check_int(self.split_layer, "codec split_layer", 1)
        if self.encode_ms is not None:
            check_number(self.encode_ms, "codec encode_ms")

    @property
    def recipe(self) -> Recipe:
        return Recipe(self.rotation, self.channel_alpha, self.wire)

    @property
    def key(self) -> tuple:
        return (self.q_bar, self.tau, self.tau_is_quantile, self.recipe, self.split_layer)

    def to_dict(self) -> dict[str, Any]:
        extra = ({"wire": self.wire} if self.wire != "tabq" else {}) | (   # TAB-Q points read as before
            {"encode_ms": self.encode_ms} if self.encode_ms is not None else {})
        return {"q_bar": self.q_bar, "tau": self.tau, "bytes_per_token": self.bytes_per_token,
                "tau_is_quantile": self.tau_is_quantile, "rotation": self.rotation,
                "channel_alpha": self.channel_alpha, "rel_error": self.rel_error, "split_layer": self.split_layer,
                **extra}


def _nearest(match: list[CodecPoint], split_layer: int | None) -> CodecPoint | None:
    """The point of `match` measured nearest `split_layer` (`CodecCost.point`)."""
    layered = sorted((p for p in match if p.split_layer is not None), key=lambda p: p.split_layer)
    if not layered:
        return match[0] if match else None
    if split_layer is None:
        layers = sorted({p.split_layer for p in layered})
        split_layer = layers[(len(layers) - 1) // 2]  # 5..29 measured: 15, not 20
    return min(layered, key=lambda p: (abs(p.split_layer - split_layer), p.split_layer))


@dataclass(frozen=True)
class CodecCost:
    """Codec timing per token and its wire size at each measured (q_bar, tau, recipe, split layer)."""

    encode_ms_per_token: float
    decode_ms_per_token: float
    points: tuple[CodecPoint, ...]

    def __post_init__(self) -> None:
        check_number(self.encode_ms_per_token, "codec encode_ms_per_token")
        check_number(self.decode_ms_per_token, "codec decode_ms_per_token")
        object.__setattr__(self, "points", tuple(self.points))
        seen = set()
        for point in self.points:
            if not isinstance(point, CodecPoint):
                raise SplitLLMError("codec points must be CodecPoint entries")
            if point.key in seen:
                at = "" if point.split_layer is None else f" at split layer {point.split_layer}"
                raise SplitLLMError(f"duplicate codec point q_bar={point.q_bar}, tau={point.tau}, "
                                    f"{point.recipe.describe()}{at}")
            seen.add(point.key)
        layers = [p.split_layer for p in self.points if p.recipe.predictive]
        if len(layers) != len(set(layers)):
            raise SplitLLMError("the profile holds two predictive codec points at one split layer")

    def point(self, q_bar: int, tau: float, tau_is_quantile: bool = False,
              recipe: Recipe = PAPER_RECIPE, split_layer: int | None = None) -> CodecPoint | None:
        """The point measured at (q_bar, tau, recipe) nearest to `split_layer` (the lower layer on
        a tie; a point of no recorded layer only when none has one), or None. split_layer None:
        the middle one of the measured layers, as when only the middle layer was measured.
        The predictive codec's point is the one nearest `split_layer` whatever q̄ and τ are asked
        (its own are nominal: module docstring)."""
        if recipe.predictive:
            return _nearest([p for p in self.points if p.recipe == recipe], split_layer)
        key = (q_bar, tau, tau_is_quantile, recipe)
        return _nearest([p for p in self.points if p.key[:4] == key], split_layer)

    def predictive_q_bar(self, split_layer: int | None) -> int | None:
        """The q̄ eq. (8a) counts the predictive codec at near `split_layer`; None: not measured."""
        near = _nearest([p for p in self.points if p.recipe == PREDICTIVE_RECIPE], split_layer)
        return None if near is None else near.q_bar

    @property
    def split_layers(self) -> tuple[int, ...]:
        """The split layers the points were measured at (empty: none recorded)."""
        return tuple(sorted({p.split_layer for p in self.points if p.split_layer is not None}))

    def bytes_per_token(self, q_bar: int, tau: float, tau_is_quantile: bool = False,
                        recipe: Recipe = PAPER_RECIPE, split_layer: int | None = None) -> float:
        point = self.point(q_bar, tau, tau_is_quantile, recipe, split_layer)
        if point is None:
            raise SplitLLMError(f"profile has no codec measurement for q_bar={q_bar}, tau={tau}, "
                                f"{recipe.describe()}")
        return point.bytes_per_token

    @property
    def recipes(self) -> tuple[Recipe, ...]:
        """The recipes measured, in the order first measured."""
        return tuple(dict.fromkeys(p.recipe for p in self.points))

    def to_dict(self) -> dict[str, Any]:
        return {"encode_ms_per_token": self.encode_ms_per_token,
                "decode_ms_per_token": self.decode_ms_per_token,
                "points": [p.to_dict() for p in self.points]}

    @classmethod
    def from_dict(cls, data: Any, version: int = PROFILE_FORMAT_VERSION) -> "CodecCost":
        """Version 1 points hold no recipe or error (the paper's recipe, error not measured)."""
        data = require_mapping(data, "profile codec")
        required = {"encode_ms_per_token", "decode_ms_per_token", "points"}
        check_keys(data, required, set(), "profile codec")
        if not isinstance(data["points"], list):
            raise SplitLLMError("profile codec points must be a list")
        points = []
        for i, item in enumerate(data["points"]):
            item = require_mapping(item, f"profile codec point {i}")
            optional = {"tau_is_quantile"} | (
                {"rotation", "channel_alpha", "rel_error", "split_layer"} if version >= 2 else set()) | (
                {"wire", "encode_ms"} if version >= 4 else set())
            check_keys(item, {"q_bar", "tau", "bytes_per_token"}, optional, f"profile codec point {i}")
            points.append(CodecPoint(**item))
        return cls(data["encode_ms_per_token"], data["decode_ms_per_token"], tuple(points))
