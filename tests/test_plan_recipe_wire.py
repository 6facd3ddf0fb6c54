"""The planner's other wire-size readers cost the plan's own codec recipe at its split layer:
`advise.step_latency` (the deadline check and the latency tie-break), `advise.sweep_rows` (the W̄
sweep table) and `early_exit.wire_bytes_model` (Algorithm 2 at run time). Before, all three read
the paper's recipe at the profile's middle measured layer whatever the plan said."""

from __future__ import annotations

import dataclasses

import pytest

from splitcli.cost.latency import LinkModel
from splitcli.plan.advise import step_latency, sweep_rows
from splitcli.plan.early_exit import wire_bytes_model
from splitcli.plan.enumerate import Candidate, to_plan
from splitcli.plan.profile import CodecCost, CodecPoint, profile_from_architecture
from splitcli.plan.recipes import OURS_RECIPE, PAPER_RECIPE
from splitcli.plan.schema import Budgets

TAU = 0.999
#: (recipe, split layer) -> bytes of a one-token frame at q̄ 4: every pair a different size, so a
#: reader that takes the wrong recipe or the wrong layer gets a wrong number
SIZES = {(PAPER_RECIPE, 3): 300.0, (PAPER_RECIPE, 6): 310.0, (PAPER_RECIPE, 9): 390.0,
         (OURS_RECIPE, 3): 200.0, (OURS_RECIPE, 6): 210.0, (OURS_RECIPE, 9): 270.0}
LINK = LinkModel(bandwidth_hz=1e6, snr=10.0, eps=1e-3)


@pytest.fixture
def profile():
    base = profile_from_architecture(
        model_id="synthetic", n_layers=10, hidden_size=64, n_kv_heads=2, head_dim=16, params_per_layer=40_960,
        embedding_params=64 * 128, weight_bits=(8, 16), kv_bits=(8, 16), group_size=32,
        activation_peak_bytes=1000.0, decode_ms_per_layer=2.0)
    points = tuple(CodecPoint(4, TAU, b, True, rel_error=0.05, split_layer=layer, **recipe.to_dict())
                   for (recipe, layer), b in SIZES.items())
    return dataclasses.replace(base, codec=CodecCost(0.1, 0.1, points))


def _candidate(split_layer: int, recipe) -> Candidate:
    return Candidate(split_layer, split_layer, "front", 8, None, 16, 4, TAU, recipe.rotation, recipe.channel_alpha)


@pytest.mark.parametrize("recipe", [PAPER_RECIPE, OURS_RECIPE])
@pytest.mark.parametrize("split_layer", [9, 3])
def test_step_latency_reads_the_candidates_recipe_at_its_layer(profile, recipe, split_layer):
    c = _candidate(split_layer, recipe)
    step = step_latency(profile, c, LINK, 2e6, i_kv=0)
    assert step.wire_bytes == SIZES[recipe, split_layer]
    assert step.comm_s == pytest.approx(LINK.comm_seconds(SIZES[recipe, split_layer], 2e6))


def test_step_latency_with_kv_adds_the_cloud_kv_to_the_right_frame(profile):
    step = step_latency(profile, _candidate(9, OURS_RECIPE), None, None, i_kv=1)
    cloud_kv = profile.layers[9].kv_bytes_per_token[16]
    assert step.wire_bytes == SIZES[OURS_RECIPE, 9] + cloud_kv and step.comm_s == 0.0


def test_sweep_rows_use_the_plans_recipe_at_its_layer(profile):
    rows = sweep_rows(profile, _candidate(9, OURS_RECIPE), 10**9, 64, w_bars=[0, 64])
    # W̄ = 64: the edge makes all 64 tokens and sends each as one frame of the candidate's
    # recipe at ℓ = 9 (W̄ = 0: nothing is sent)
    by_w = {r.point.w_bar: r.point for r in rows}
    assert by_w[64].wire_bytes == pytest.approx(64 * SIZES[OURS_RECIPE, 9]) and by_w[0].wire_bytes == 0


@pytest.mark.parametrize("recipe", [PAPER_RECIPE, OURS_RECIPE])
def test_wire_bytes_model_reads_the_plans_recipe_at_its_layer(profile, recipe):
    plan = to_plan(_candidate(9, recipe), profile, Budgets(10**9, 0.01), 64, group_size=32,
                   tau_is_quantile=True)
    assert (plan.codec.rotation, plan.codec.channel_alpha) == (recipe.rotation, recipe.channel_alpha)
    wire = wire_bytes_model(profile, plan)
    assert wire(4, 0, 1) == SIZES[recipe, 9]
    assert wire(4, 1, 1) == SIZES[recipe, 9] + profile.layers[9].kv_bytes_per_token[16]
