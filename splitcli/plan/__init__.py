"""The planner: profile and plan schemas, eq. (8) enumeration, Algorithm 2, W_bar sweeps."""

from splitcli.plan.early_exit import (
    ExitDecision, ExitPolicy, Step, decide_step, max_tokens_under_deadline, wire_bytes_model,
)
from splitcli.plan.enumerate import (
    Candidate, PlanSearch, Ranked, SearchSpace, psi, search_plans, to_plan,
)
from splitcli.plan.profile import (
    CodecCost, CodecPoint, DeviceInfo, LayerCost, Profile, StageCost, profile_from_architecture,
)
from splitcli.plan.schema import Budgets, CodecSettings, Plan
from splitcli.plan.sweep import SweepPoint, sweep_max_tokens

__all__ = [
    "Budgets", "Candidate", "CodecCost", "CodecSettings", "CodecPoint", "DeviceInfo", "ExitDecision",
    "ExitPolicy", "LayerCost", "Plan", "PlanSearch", "Profile", "Ranked", "SearchSpace",
    "StageCost", "Step", "SweepPoint", "decide_step", "max_tokens_under_deadline",
    "profile_from_architecture", "psi",
    "search_plans", "sweep_max_tokens", "to_plan", "wire_bytes_model",
]
