"""Codec recipes: the transform choices of codec v3 that the profile measures and the planner picks.

A recipe is the part of the codec settings that is neither q̄ nor τ (which the planner already
enumerates): the orthogonal rotation of T_below and the per-channel scaling exponent α
(`CodecSettings.rotation`, `.channel_alpha`). The paper's recipe is (none, 0); this project's
(docs/results.md, "Codec v3") is (hadamard, 0.5). `splitllm profile` measures every recipe of
PROFILE_RECIPES at each q̄ and split layer it measures (`splitcli.plan.codec_profile`): the
mean wire bytes of a one-token frame and the codec's distortion (`rel_error`, the mean per-token relative L2 error of the non-massive channels,
`splitcli.codec.calibrate.bulk_rel_error`: the figure `target_rel_error` bounds). The planner
enumerates the measured recipes like any other choice, rejects a recipe whose measured error
exceeds its codec-error bound, and among those left its objective (eq. 8, then accuracy drop,
latency, wire bytes) prefers the smaller frame: the accuracy proxy does not see the codec, so two
recipes that both pass tie on it and the wire bytes decide.

The token-predictive codec (frame format 4, `splitcli.codec.predictive`) is one more recipe,
`PREDICTIVE_RECIPE` (wire "predictive"), measured by `splitllm profile --predictive`. It has no
q̄ or τ: its profile point records, as its q̄, the width that eq. (8a)'s Ψ counts it at
(`splitcli.deploy.predictive_profile`: the widest q̄ at which the paper's recipe measured an
error no smaller than the predictive codec's, as Ψ counts every recipe at the paper codec's
width), and the planner enumerates it at that q̄ only.

Torch-free (the planner and the profile schema use it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from splitcli.errors import SplitLLMError
from splitcli.plan.codec_settings import DEFAULT_TARGET_REL_ERROR, check_transform_bounds

#: Wires a recipe can name: the TS + TAB-Q codec (every transform recipe) or the token-predictive one.
RECIPE_WIRES = ("tabq", "predictive")


@dataclass(frozen=True)
class Recipe:
    """The codec's transform choices (module docstring); bounds are CodecSettings'. wire
    "predictive" is the token-predictive codec, which has its own transform (no rotation, α 0)."""

    rotation: str = "none"
    channel_alpha: float = 0.0
    wire: str = "tabq"

    def __post_init__(self) -> None:
        check_transform_bounds(self.rotation, 0, self.channel_alpha)
        # 0 and 0.0 are one recipe (YAML writes 0.0, a user may type 0): one key, one hash.
        object.__setattr__(self, "channel_alpha", float(self.channel_alpha))
        if self.wire not in RECIPE_WIRES:
            raise SplitLLMError(f"codec recipe wire must be one of {', '.join(RECIPE_WIRES)}, got {self.wire!r}")
        if self.wire == "predictive" and (self.rotation != "none" or self.channel_alpha != 0.0):
            raise SplitLLMError("the predictive codec takes no rotation or channel alpha (it codes in its own basis)")

    @property
    def predictive(self) -> bool:
        return self.wire == "predictive"

    @property
    def name(self) -> str:
        """'paper', 'rot', 'α0.5', 'rot+α0.5' (the names `bench codec --sweep` uses), 'predictive'."""
        if self.predictive:
            return "predictive"
        parts = (["rot"] if self.rotation == "hadamard" else []) + (
            [f"α{self.channel_alpha:g}"] if self.channel_alpha > 0 else [])
        return "+".join(parts) or "paper"

    def describe(self) -> str:
        """'rotation hadamard, α 0.5' for messages."""
        if self.predictive:
            return "token-predictive codec, frame format 4"
        return f"rotation {self.rotation}, α {self.channel_alpha:g}"

    def to_dict(self) -> dict[str, Any]:
        """The TAB-Q settings' transform fields (CodecSettings takes them; the wire is not a setting)."""
        return {"rotation": self.rotation, "channel_alpha": self.channel_alpha}


PAPER_RECIPE = Recipe()
OURS_RECIPE = Recipe("hadamard", 0.5)
PREDICTIVE_RECIPE = Recipe(wire="predictive")
#: What `splitllm profile` measures by default: the paper's recipe and ours.
PROFILE_RECIPES: tuple[Recipe, ...] = (PAPER_RECIPE, OURS_RECIPE)
#: The planner's default bound on a recipe's measured codec error: the stated distortion target
#: of the codec defaults (`DEFAULT_TARGET_REL_ERROR`), so a recipe is accepted where calibration
#: with a target would accept it.
DEFAULT_MAX_CODEC_ERROR = DEFAULT_TARGET_REL_ERROR


def parse_recipes(text: str, option: str = "--recipes") -> tuple[Recipe, ...]:
    """'none:0,hadamard:0.5' -> (PAPER_RECIPE, OURS_RECIPE): ROTATION:ALPHA items, or a one-line error."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        rotation, sep, alpha = item.partition(":")
        try:
            value = float(alpha) if sep else 0.0
        except ValueError:
            raise SplitLLMError(f"{option} items must be ROTATION:ALPHA like hadamard:0.5, got {item!r}") from None
        try:
            out.append(Recipe(rotation.strip(), value))
        except SplitLLMError as e:
            raise SplitLLMError(f"{option}: {e}") from None
    if not out:
        raise SplitLLMError(f"{option} needs at least one ROTATION:ALPHA item, e.g. none:0,hadamard:0.5")
    return tuple(dict.fromkeys(out))


def format_recipes(recipes: tuple[Recipe, ...]) -> str:
    """The inverse of `parse_recipes`."""
    return ",".join(f"{r.rotation}:{r.channel_alpha:g}" for r in recipes)


def check_max_codec_error(value: Any) -> float:
    """A codec error bound in (0, 1], or a one-line error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise SplitLLMError(f"codec error bound must lie in (0, 1], got {value!r}")
    return float(value)


def pinned_recipes(measured: tuple[Recipe, ...], rotation: str | None, channel_alpha: float | None
                   ) -> tuple[Recipe, ...]:
    """The recipes the planner may choose from: every measured one (PAPER_RECIPE if none), or,
    when the user pinned a field (rotation and/or α), the measured TAB-Q ones that agree with it; a
    pin nothing measured agrees with is the one recipe (its size then is the rough estimate)."""
    if rotation is None and channel_alpha is None:
        return measured or (PAPER_RECIPE,)
    if rotation is not None:
        Recipe(rotation, 0.0)                       # a bad value fails here, in one line
    if channel_alpha is not None:
        Recipe("none", channel_alpha)
    keep = tuple(r for r in measured if not r.predictive and (rotation is None or r.rotation == rotation)
                 and (channel_alpha is None or r.channel_alpha == channel_alpha))
    return keep or (Recipe(rotation or "none", 0.0 if channel_alpha is None else channel_alpha),)


def explain_recipe(search, profile, max_codec_error: float | None, pinned: bool = False) -> str:
    """One line: the winner's recipe with its measured size and error at its (q̄, τ), and why
    each other recipe enumerated there did not win (its rejection, or a bigger frame)."""
    from dataclasses import replace

    w = search.winner.candidate

    def size_error(c) -> str:
        p = profile.codec.point(c.q_bar, c.tau, True, c.recipe, c.split_layer) if profile.codec else None
        if p is None:
            return (f"{profile.wire_bytes_per_token(c.q_bar, c.tau, True, c.recipe, c.split_layer):.4g} B/token "
                    "(estimate), error not measured")
        at = "" if p.split_layer is None else f" (measured at ℓ = {p.split_layer})"
        return (f"{p.bytes_per_token:.4g} B/token, "
                + ("error not measured" if p.rel_error is None else f"error {p.rel_error:.3g}") + at)

    bound = "" if max_codec_error is None else f"; error bound {max_codec_error:g}"
    head = f"codec recipe: {w.recipe.name} ({w.recipe.describe()}) at q̄ {w.q_bar}: {size_error(w)}{bound}"
    if pinned:
        head += "; pinned by --rotation/--channel-alpha"
    others = []
    by_candidate = {r.candidate: r for r in search.ranked}
    for r in dict.fromkeys(c.recipe for c in by_candidate):
        if r == w.recipe:
            continue
        other = by_candidate.get(replace(w, rotation=r.rotation, channel_alpha=r.channel_alpha, wire=r.wire))
        if other is None and (r.predictive or w.recipe.predictive):
            # the predictive codec is enumerated at its own q̄ only: take it at the winner's edge
            other = next((x for x in search.ranked if x.candidate.recipe == r and replace(
                x.candidate, q_bar=w.q_bar, tau=w.tau, rotation=w.rotation, channel_alpha=w.channel_alpha,
                wire=w.wire) == w), None)
        if other is None:
            continue
        others.append(f"{r.name}: {size_error(other.candidate)} - {other.reason}")
    return head + ("; not chosen: " + "; ".join(others) if others else "")
