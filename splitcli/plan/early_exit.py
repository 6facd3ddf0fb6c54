"""Algorithm 2 as a per-step policy: keep the plan, compress harder, drop KV, or stop.

The edge runtime calls `decide_step` before sending each step, with the link rate it measured
(bit/s), the token count so far, the measured local compute time of the step and a function that
gives the step's wire bytes for a (q_bar, I_kv, w) setting. The policy predicts
L_t = L_c + L_eps(B_io, R) (eq. 11) and escalates in the paper's order until L_t <= D:

1. keep   - the plan's q_bar and I_kv meet the deadline;
2. compress - lower q_bar one step at a time down to q_bar_min (TabQ(T_w; I_kv) in lines 14-15),
   taking the highest q_bar that fits (least accuracy lost);
3. drop_kv - set I_kv = 0 (line 19) and again take the highest q_bar in [q_bar_min, q_bar] that fits;
4. stop   - nothing fits (lines 22-27: the paper walks w back; for a runtime that is generating
   token w now, that means ending the generation here with the tokens already produced).

Readings: the measured rate is used as R in eq. (9), so the eps-outage retransmission factor
of the link model still applies to it; a rate that is 0, negative, NaN or inf-latency stops at
once. q_bar is re-chosen from the plan's value every step (each step's payload is coded
independently, so a recovered link gets full precision back), while I_kv = 0 is sticky: once the
cloud stopped receiving KV its session cache no longer matches, so the runtime passes the current
I_kv back in and the policy never turns KV transmission on again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable

from splitcli.cost.latency import LinkModel
from splitcli.cost.memory import io_bytes_per_step
from splitcli.errors import SplitLLMError
from splitcli.plan.profile import Profile
from splitcli.plan.recipes import Recipe
from splitcli.plan.schema import Plan

WireBytes = Callable[[int, int, int], float]
"""wire_bytes(q_bar, i_kv, w) -> bytes the step would send."""


class Step(str, Enum):
    KEEP = "keep"
    COMPRESS = "compress"
    DROP_KV = "drop_kv"
    STOP = "stop"


@dataclass(frozen=True)
class ExitDecision:
    """What to do with this step; latency_s is the predicted L_t of the chosen setting (inf: stop)."""

    step: Step
    q_bar: int
    i_kv: int
    latency_s: float
    reason: str


@dataclass(frozen=True)
class ExitPolicy:
    """The deadline D and the plan's codec settings the policy starts from."""

    deadline_s: float
    q_bar: int
    q_bar_min: int
    i_kv: int
    link: LinkModel

    def __post_init__(self) -> None:
        if not (math.isfinite(self.deadline_s) and self.deadline_s > 0):
            raise SplitLLMError(f"deadline D must be a finite time > 0 s, got {self.deadline_s!r}")
        if not 2 <= self.q_bar_min <= self.q_bar:
            raise SplitLLMError(f"need 2 <= q_bar_min <= q_bar, got {self.q_bar_min}, {self.q_bar}")
        if self.i_kv not in (0, 1):
            raise SplitLLMError(f"I_kv must be 0 or 1, got {self.i_kv!r}")

    @classmethod
    def from_plan(cls, plan: Plan, link: LinkModel, deadline_s: float | None = None) -> "ExitPolicy":
        deadline = deadline_s if deadline_s is not None else plan.budgets.deadline_s
        if deadline is None:
            raise SplitLLMError("no deadline: set one in the plan's budgets or pass deadline_s")
        return cls(deadline, plan.codec.q_bar, plan.codec.q_bar_min, plan.i_kv, link)


def decide_step(
    policy: ExitPolicy,
    *,
    rate_bps: float,
    w: int,
    compute_s: float,
    wire_bytes: WireBytes,
    current_i_kv: int | None = None,
) -> ExitDecision:
    """Algorithm 2 for one step (see module docstring). `current_i_kv` defaults to the plan's."""
    i_kv_now = policy.i_kv if current_i_kv is None else current_i_kv
    if i_kv_now not in (0, 1):
        raise SplitLLMError(f"current I_kv must be 0 or 1, got {current_i_kv!r}")
    if not (isinstance(rate_bps, (int, float)) and math.isfinite(rate_bps) and rate_bps > 0):
        return ExitDecision(Step.STOP, policy.q_bar_min, 0, math.inf,
                            f"link down (measured rate {rate_bps!r} bit/s)")

    def latency(q_bar: int, i_kv: int) -> float:
        return policy.link.step_seconds(compute_s, wire_bytes(q_bar, i_kv, w), rate_bps)

    def best_fit(i_kv: int, q_bars: range) -> tuple[int, float] | None:
        for q_bar in q_bars:
            value = latency(q_bar, i_kv)
            if value <= policy.deadline_s:
                return q_bar, value
        return None

    deadline = policy.deadline_s
    degraded = i_kv_now < policy.i_kv
    planned = latency(policy.q_bar, i_kv_now)
    if planned <= deadline:
        if degraded:
            return ExitDecision(Step.DROP_KV, policy.q_bar, 0, planned,
                                "KV transmission stays off; plan's q_bar fits")
        return ExitDecision(Step.KEEP, policy.q_bar, i_kv_now, planned,
                            f"L_t {planned:.4g} s <= D {deadline:.4g} s")

    harder = best_fit(i_kv_now, range(policy.q_bar - 1, policy.q_bar_min - 1, -1))
    if harder is not None:
        step = Step.DROP_KV if degraded else Step.COMPRESS
        return ExitDecision(step, harder[0], i_kv_now, harder[1],
                            f"plan's L_t {planned:.4g} s > D; q_bar {harder[0]} fits")

    if i_kv_now == 1:
        no_kv = best_fit(0, range(policy.q_bar, policy.q_bar_min - 1, -1))
        if no_kv is not None:
            return ExitDecision(Step.DROP_KV, no_kv[0], 0, no_kv[1],
                                f"compression alone misses D; I_kv = 0 with q_bar {no_kv[0]} fits")

    floor = latency(policy.q_bar_min, 0)
    reason = f"even q_bar {policy.q_bar_min} without KV takes {floor:.4g} s > D {deadline:.4g} s"
    return ExitDecision(Step.STOP, policy.q_bar_min, 0, math.inf, reason)


def max_tokens_under_deadline(
    w_bar: int, step_latency: Callable[[int], float], deadline_s: float
) -> int:
    """Line 5 / eq. (12) for a fixed l: the largest w <= W_bar with L_t(w) <= D (0 if none).

    Walks w down from W_bar like lines 23-26, so it needs no monotonicity of L_t in w.
    """
    if w_bar < 0:
        raise SplitLLMError(f"W_bar must be >= 0, got {w_bar}")
    for w in range(w_bar, 0, -1):
        if step_latency(w) <= deadline_s:
            return w
    return 0


def wire_bytes_model(profile: Profile, plan: Plan, cloud_kv_bits: int = 16) -> WireBytes:
    """The WireBytes function for `plan` on `profile`: one decode step (one new token).

    Hidden state: `Profile.wire_bytes_per_token` at (q_bar, the plan's tau, the plan's codec recipe,
    measured nearest the plan's split layer ℓ). I_kv = 1 adds the new
    token's KV for the cloud layers [l, L) at `cloud_kv_bits` (the cloud runs full precision),
    following the reading in `splitcli.cost.memory.io_bytes_per_step`. w does not change a decode
    step's payload under that reading; it is accepted for runtimes that model otherwise.
    """
    tau, is_quantile = plan.codec.tau_value, plan.codec.tau_quantile is not None
    recipe = Recipe(plan.codec.rotation, plan.codec.channel_alpha, plan.wire)
    cloud_layers = range(plan.split_layer, plan.n_layers)
    if profile.n_layers != plan.n_layers:
        raise SplitLLMError(
            f"profile has {profile.n_layers} layers but the plan was made for {plan.n_layers}"
        )
    kv_per_layer = profile.kv_bytes_per_token(cloud_kv_bits)
    cloud_kv = float(sum(kv_per_layer[k] for k in cloud_layers))

    def wire_bytes(q_bar: int, i_kv: int, w: int) -> float:
        hidden = profile.wire_bytes_per_token(q_bar, tau, is_quantile, recipe, plan.split_layer)
        return io_bytes_per_step(i_kv, 1, hidden, cloud_kv)

    return wire_bytes
