"""Codec recipes in the profile and the planner: measured per recipe, chosen by size under the
codec-error bound, pinned on request, written into the plan, and deployable."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import _tiny
from splitcli.cli import app
from splitcli.configio import load_config, write_yaml
from splitcli.errors import SplitLLMError
from splitcli.plan.enumerate import Candidate, SearchSpace, search_plans, to_plan
from splitcli.plan.profile import PROFILE_FORMAT_VERSION, CodecCost, CodecPoint, Profile, profile_from_architecture
from splitcli.plan.recipes import (
    OURS_RECIPE, PAPER_RECIPE, PROFILE_RECIPES, Recipe, parse_recipes, pinned_recipes,
)
from splitcli.plan.schema import Budgets, Plan

runner = CliRunner()
TAU = 0.999
ROT = dict(rotation="hadamard", channel_alpha=0.5)


def _profile(points) -> Profile:
    base = profile_from_architecture(
        model_id="synthetic", n_layers=4, hidden_size=64, n_kv_heads=2, head_dim=16, params_per_layer=40_960,
        embedding_params=64 * 128, weight_bits=(4, 8, 16), kv_bits=(8, 16), group_size=32,
        activation_peak_bytes=1000.0, decode_ms_per_layer=2.0)
    return dataclasses.replace(base, codec=CodecCost(0.1, 0.1, tuple(points)))


def _points(paper_bytes, paper_err, rot_bytes, rot_err, q_bar=4):
    return (CodecPoint(q_bar, TAU, paper_bytes, True, rel_error=paper_err),
            CodecPoint(q_bar, TAU, rot_bytes, True, rel_error=rot_err, **ROT))


def _search(profile, recipes=PROFILE_RECIPES, max_codec_error=0.15, accuracy=lambda c: 0.0, **kw):
    space = SearchSpace(split_layers=(2,), q_w=((8, None),), qa=(16,), q_bar=(4,), tau=(TAU,),
                        tau_is_quantile=True, recipes=recipes)
    return search_plans(profile, space, Budgets(10**8, 0.01), 64, accuracy, max_codec_error=max_codec_error, **kw)


# --- the profile's recipe key -----------------------------------------------------------------------

def test_old_profile_loads_as_the_paper_recipe():
    data = _profile(()).to_dict()
    data["format_version"] = 1
    data["codec"]["points"] = [{"q_bar": 6, "tau": TAU, "bytes_per_token": 200.0, "tau_is_quantile": True}]
    old = Profile.from_dict(data)
    (point,) = old.codec.points
    assert point.recipe == PAPER_RECIPE and point.rel_error is None
    assert old.wire_bytes_per_token(6, TAU, True) == 200.0
    assert old.wire_bytes_per_token(6, TAU, True, OURS_RECIPE) == 64 * 6 / 8   # not measured: the estimate
    # read as today's profile, written back as the oldest format that holds it (no predictive points: 3)
    assert old.format_version == PROFILE_FORMAT_VERSION == 4 and old.to_dict()["format_version"] == 3
    # a version-1 point never held a recipe: such a file is not a version-1 profile
    data["codec"]["points"][0]["rotation"] = "hadamard"
    with pytest.raises(SplitLLMError, match="unknown keys rotation"):
        Profile.from_dict(data)


@pytest.mark.parametrize("version", [5, 0, "2", None, True])
def test_unknown_profile_version_is_one_line(version):
    data = _profile(()).to_dict()
    data["format_version"] = version
    with pytest.raises(SplitLLMError) as e:
        Profile.from_dict(data)
    assert "format_version" in str(e.value) and "reads versions 1, 2, 3, 4" in str(e.value) and "\n" not in str(e.value)
    assert ("newer splitllm" in str(e.value)) == (version == 5)  # a future file: upgrade, not re-profile


def test_codec_point_without_a_layer_is_the_middle_measured_layer():
    pts = tuple(CodecPoint(q_bar=4, tau=TAU, bytes_per_token=float(layer), tau_is_quantile=True, split_layer=layer)
                for layer in (5, 10, 15, 20, 25, 29))
    codec = CodecCost(0.1, 0.1, pts)  # as measured on a 30-layer model
    assert codec.point(4, TAU, True).split_layer == 15


def test_recipe_key_round_trips(tmp_path):
    profile = _profile(_points(20.0, 0.5, 30.0, 0.1) + (CodecPoint(4, TAU, 25.0, True, channel_alpha=0.5),))
    write_yaml(tmp_path / "p.yaml", profile.to_dict())
    again = Profile.from_dict(load_config(tmp_path / "p.yaml"))
    assert again == profile
    assert again.codec.recipes == (PAPER_RECIPE, OURS_RECIPE, Recipe("none", 0.5))
    assert again.codec.bytes_per_token(4, TAU, True, OURS_RECIPE) == 30.0
    assert again.codec_rel_error(4, TAU, True, OURS_RECIPE) == 0.1
    assert again.codec_rel_error(4, TAU, True, PAPER_RECIPE) == 0.5
    # the same (q̄, τ) measured twice for one recipe is refused; an integer α is the same recipe
    with pytest.raises(SplitLLMError, match="duplicate codec point"):
        CodecCost(0, 0, (CodecPoint(4, TAU, 1.0, True, channel_alpha=1), CodecPoint(4, TAU, 2.0, True, channel_alpha=1.0)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(rotation="dct"), "codec rotation must be one of none, hadamard, got 'dct'"),
    (dict(channel_alpha=1.5), "codec channel_alpha must lie in [0, 1], got 1.5"),
    (dict(channel_alpha="x"), "codec channel_alpha must lie in [0, 1]"),
    (dict(rel_error=-0.1), "codec rel_error must be >= 0"),
    (dict(rel_error=float("nan")), "codec rel_error must be a finite number"),
])
def test_bad_recipe_values_are_one_line_errors(kwargs, message):
    with pytest.raises(SplitLLMError) as e:
        CodecPoint(4, TAU, 10.0, True, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_parse_and_pin_recipes():
    assert parse_recipes("none:0, hadamard:0.5,") == PROFILE_RECIPES
    assert parse_recipes("hadamard") == (Recipe("hadamard", 0.0),)
    for text, message in (("hadamard:x", "ROTATION:ALPHA"), ("dct:0", "codec rotation"), (",", "at least one"),
                          ("none:2", "channel_alpha")):
        with pytest.raises(SplitLLMError, match=message):
            parse_recipes(text)
    measured = (PAPER_RECIPE, OURS_RECIPE, Recipe("hadamard", 0.0))
    assert pinned_recipes(measured, None, None) == measured
    assert pinned_recipes((), None, None) == (PAPER_RECIPE,)
    assert pinned_recipes(measured, "hadamard", None) == (OURS_RECIPE, Recipe("hadamard", 0.0))
    assert pinned_recipes(measured, None, 0) == (PAPER_RECIPE, Recipe("hadamard", 0.0))
    assert pinned_recipes(measured, "none", 0.25) == (Recipe("none", 0.25),)   # unmeasured: the pin itself
    with pytest.raises(SplitLLMError, match="rotation"):
        pinned_recipes(measured, "fft", None)


def test_points_are_read_at_the_nearest_measured_split_layer():
    points = tuple(CodecPoint(4, TAU, b, True, rel_error=e, split_layer=l) for l, b, e in ((1, 10.0, 0.1), (3, 30.0, 0.3)))
    profile = _profile(points)
    assert [profile.wire_bytes_per_token(4, TAU, True, split_layer=l) for l in (1, 2, 3)] == [10.0, 10.0, 30.0]
    assert profile.codec_rel_error(4, TAU, True, split_layer=3) == 0.3
    assert profile.wire_bytes_per_token(4, TAU, True) == 10.0          # no layer: the middle measured one (lower on a tie)
    assert profile.codec.point(4, TAU, True, OURS_RECIPE, 2) is None   # another recipe is never substituted
    assert profile.codec.split_layers == (1, 3)
    with pytest.raises(SplitLLMError, match="split_layer 9 exceeds the 4 layers"):
        _profile(points + (CodecPoint(4, TAU, 1.0, True, split_layer=9),))
    with pytest.raises(SplitLLMError, match="codec split_layer must lie in"):
        CodecPoint(4, TAU, 1.0, True, split_layer=0)
    # the planner costs and bounds each candidate at its own ℓ: paper passes at ℓ = 1 only
    paper = tuple(CodecPoint(4, TAU, b, True, rel_error=e, split_layer=l) for l, b, e in ((1, 10.0, 0.1), (3, 20.0, 0.5)))
    ours = tuple(CodecPoint(4, TAU, 40.0, True, rel_error=0.05, split_layer=l, **ROT) for l in (1, 3))
    space = SearchSpace(split_layers=(1, 3), q_w=((8, None),), qa=(16,), q_bar=(4,), tau=(TAU,), tau_is_quantile=True,
                        recipes=PROFILE_RECIPES)
    search = search_plans(_profile(paper + ours), space, Budgets(10**8, 0.01), 64, lambda c: 0.0, max_codec_error=0.15)
    w = search.winner
    assert (w.candidate.split_layer, w.candidate.recipe, w.wire_bytes_per_token) == (3, OURS_RECIPE, 40.0)
    at1 = [r for r in search.ranked if r.candidate.split_layer == 1 and r.candidate.recipe == PAPER_RECIPE]
    assert at1[0].wire_bytes_per_token == 10.0 and at1[0].codec_error == 0.1


# --- the planner's choice ---------------------------------------------------------------------------

def _winner(search):
    assert search.winner is not None
    return search.winner.candidate.recipe


def test_smaller_recipe_wins_when_both_meet_accuracy():
    search = _search(_profile(_points(20.0, 0.10, 30.0, 0.05)))
    assert _winner(search) == PAPER_RECIPE and search.decided_by == "fewer wire bytes"
    search = _search(_profile(_points(40.0, 0.10, 30.0, 0.05)))
    assert _winner(search) == OURS_RECIPE and search.winner.wire_bytes_per_token == 30.0


def test_more_accurate_recipe_wins_when_the_smaller_violates_the_bound():
    search = _search(_profile(_points(20.0, 0.50, 30.0, 0.05)))
    assert _winner(search) == OURS_RECIPE and search.winner.codec_error == 0.05
    (paper,) = [r for r in search.ranked if r.candidate.recipe == PAPER_RECIPE]
    assert paper.rejected_by == "accuracy" and "codec error 0.5 > allowed 0.15" in paper.reason
    # no bound: the smaller one again; neither within the bound: nothing, and no budget helps
    assert _winner(_search(_profile(_points(20.0, 0.50, 30.0, 0.05)), max_codec_error=None)) == PAPER_RECIPE
    none = _search(_profile(_points(20.0, 0.50, 30.0, 0.40)))
    assert none.winner is None and none.min_memory_bytes is None
    assert none.codec_bound_only and none.least_lossy.codec_error == 0.40


def test_the_link_ranks_recipes_by_their_own_frame():
    from splitcli.cost.latency import LinkModel
    from splitcli.plan.advise import default_rate, latency_model, step_latency

    profile = _profile(_points(20.0, 0.10, 400.0, 0.05))
    link = LinkModel(1e6, 10.0, 1e-3)
    rate = default_rate(link)
    paper = Candidate(2, 2, "front", 8, None, 16, 4, TAU)
    ours = dataclasses.replace(paper, **ROT)
    a, b = step_latency(profile, paper, link, rate), step_latency(profile, ours, link, rate)
    assert b.wire_bytes - a.wire_bytes == 380.0 and b.comm_s > a.comm_s and a.compute_s == b.compute_s
    search = _search(profile, latency=latency_model(profile, link, rate))
    assert _winner(search) == PAPER_RECIPE and search.decided_by == "lower predicted latency"


def test_pinned_recipe_is_kept_and_written_into_the_plan():
    profile = _profile(_points(20.0, 0.10, 30.0, 0.05))
    search = _search(profile, recipes=(OURS_RECIPE,))
    assert _winner(search) == OURS_RECIPE
    plan = to_plan(search.winner.candidate, profile, Budgets(10**8, 0.01), 64, group_size=32, tau_is_quantile=True)
    assert (plan.codec.rotation, plan.codec.channel_alpha, plan.codec.q_bar) == ("hadamard", 0.5, 4)
    assert Plan.from_dict(yaml.safe_load(yaml.safe_dump(plan.to_dict()))).codec == plan.codec


def test_accuracy_table_can_key_a_recipe():
    from splitcli.plan.accuracy import AccuracyTable

    table = AccuracyTable({"format_version": 1, "results": [{"rotation": "none", "drop": 0.05}, {"drop": 0.0}]})
    search = _search(_profile(_points(20.0, 0.10, 30.0, 0.05)), accuracy=table.drop)
    assert _winner(search) == OURS_RECIPE


# --- the commands -----------------------------------------------------------------------------------

def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _files(tmp_path, points):
    profile = tmp_path / "profile.yaml"
    write_yaml(profile, _profile(points).to_dict())
    table = tmp_path / "acc.json"
    table.write_text(json.dumps({"format_version": 1, "results": [{"drop": 0.0}]}))
    return profile, table


def test_plan_command_chooses_says_why_and_honours_a_pin(tmp_path):
    profile, table = _files(tmp_path, _points(20.0, 0.50, 30.0, 0.05))
    out = tmp_path / "plan.yaml"
    r = run("plan", "--profile", profile, "--mem", "10MB", "--accuracy-table", table, "-o", out)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "codec recipe: rot+α0.5 (rotation hadamard, α 0.5) at q̄ 4: 30 B/token, error 0.05; error bound 0.15" in text
    assert "paper: 20 B/token, error 0.5 - accuracy: codec error 0.5 > allowed 0.15" in text
    plan = Plan.load(out)
    assert (plan.codec.rotation, plan.codec.channel_alpha) == ("hadamard", 0.5)
    assert plan.notes["codec_error_bound"] == 0.15 and "rot+α0.5" in plan.notes["codec_recipe"]
    assert plan.notes["codec_recipe"].endswith("(codec measured on random tokens)")  # the profile's source, said
    # a looser bound: the smaller paper recipe; a pin: kept even though it is larger
    r = run("plan", "--profile", profile, "--mem", "10MB", "--accuracy-table", table, "--codec-error", "0.6",
            "-o", out, "--force")
    assert r.exit_code == 0, r.output
    assert (Plan.load(out).codec.rotation, Plan.load(out).codec.channel_alpha) == ("none", 0.0)
    r = run("plan", "--profile", profile, "--mem", "10MB", "--accuracy-table", table, "--codec-error", "0.6",
            "--rotation", "hadamard", "-o", out, "--force")
    assert r.exit_code == 0, r.output
    assert Plan.load(out).codec.rotation == "hadamard" and "pinned" in r.output


@pytest.mark.parametrize("args, message", [
    (["--rotation", "dct"], "--rotation: codec rotation must be one of none, hadamard"),
    (["--channel-alpha", "2"], "--channel-alpha: codec channel_alpha must lie in [0, 1], got 2.0"),
    (["--codec-error", "0"], "--codec-error: codec error bound must lie in (0, 1], got 0.0"),
])
def test_plan_command_bad_recipe_flags(tmp_path, args, message):
    profile, table = _files(tmp_path, _points(20.0, 0.5, 30.0, 0.05))
    r = run("plan", "--profile", profile, "--mem", "10MB", "--accuracy-table", table, *args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert len([line for line in r.output.splitlines() if line.startswith("error:")]) == 1


# --- profile and deployment on a tiny model ---------------------------------------------------------

def test_profile_measures_each_recipe_and_the_chosen_plan_deploys(tmp_path, monkeypatch):
    """measure_profile records every recipe at every q̄ with its error; a plan that chose the
    rotated recipe builds (the codec calibrated with that rotation and α) and generates."""
    from test_deploy_calibrate import CharTokenizer, write_wikitext

    from splitcli.deploy import SplitSpec, build_split
    from splitcli.deploy.measure import PROFILE_Q_BARS, ProfileSettings, codec_split_layers, measure_profile
    from splitcli.runtime.generate import SamplingConfig, generate

    model = _tiny("llama")
    ticks = []
    settings = ProfileSettings(bits=(8, 16), kv_bits=(8, 16), tokens=(1, 16), repeats=1, group_size=32,
                               decode_context=12)
    measured = measure_profile(model, "tiny", settings, progress=lambda d, t, what: ticks.append(what))
    assert [w for w in ticks if w.startswith("codec recipe")] == [
        "codec recipe paper (rotation none, α 0)", "codec recipe rot+α0.5 (rotation hadamard, α 0.5)"]
    assert measured.codec.recipes == PROFILE_RECIPES
    layers = codec_split_layers(4)
    assert layers == (1, 2, 3) == measured.codec.split_layers
    assert {(p.q_bar, p.recipe, p.split_layer) for p in measured.codec.points} == {
        (q, r, l) for q in PROFILE_Q_BARS for r in PROFILE_RECIPES for l in layers}
    assert all(p.rel_error is not None and 0 <= p.rel_error < 1 and p.bytes_per_token > 0 for p in measured.codec.points)
    # error falls as q̄ grows, for each recipe
    for recipe in PROFILE_RECIPES:
        for layer in layers:
            errs = [measured.codec_rel_error(q, TAU, True, recipe, layer) for q in PROFILE_Q_BARS]
            assert errs[0] >= errs[-1]
    assert Profile.from_dict(yaml.safe_load(yaml.safe_dump(measured.to_dict()))) == measured

    # plan on points where only the rotated recipe meets the bound, then deploy what it wrote
    profile = dataclasses.replace(measured, codec=CodecCost(0.1, 0.1, _points(20.0, 0.5, 30.0, 0.05)))
    space = SearchSpace(split_layers=(2,), q_w=((8, None),), qa=(8,), q_bar=(4,), tau=(TAU,), tau_is_quantile=True,
                        recipes=PROFILE_RECIPES)
    budgets = Budgets(10**8, 0.01)
    search = search_plans(profile, space, budgets, 64, lambda c: 0.0, max_codec_error=0.15)
    plan = to_plan(search.winner.candidate, profile, budgets, 64, group_size=32, tau_is_quantile=True)
    assert (plan.codec.rotation, plan.codec.channel_alpha) == ("hadamard", 0.5)
    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    lm = SimpleNamespace(model=model, tokenizer=CharTokenizer(), sha256="cd" * 32, model_id="tiny")
    split = build_split(lm, SplitSpec.from_plan(plan), write_wikitext(tmp_path / "data"))
    assert split.wire.name == "tabq" and split.info["codec"]["channel_scale"]
    assert split.info["codec"]["rotation_seed"] == plan.codec.rotation_seed
    ids = torch.tensor([[5, 9, 17, 33, 65, 3, 7, 11]])
    with torch.inference_mode():
        out = generate(split.session(), ids, None, SamplingConfig(max_new_tokens=4))
    assert out.tokens.shape == (1, 4)


def test_profile_command_says_each_recipe(tiny_model_dir, tmp_path):
    out = tmp_path / "p.yaml"
    args = ["profile", "-m", tiny_model_dir, "--bits", "16", "--kv-bits", "16", "--tokens", "1,8", "--repeats", "1",
            "--decode-context", "12"]
    r = run(*args, "--recipes", "none:0,hadamard:0.5,hadamard:0", "-o", out)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    for name in ("paper (rotation none, α 0)", "rot+α0.5 (rotation hadamard, α 0.5)", "rot (rotation hadamard, α 0)"):
        assert f"measured codec recipe {name}" in text
    assert "codec: B/token of a one-token frame (error) by split layer ℓ" in text
    assert Profile.from_dict(yaml.safe_load(out.read_text())).codec.recipes == (
        PAPER_RECIPE, OURS_RECIPE, Recipe("hadamard", 0.0))
    r = run(*args, "--recipes", "hadamard:1.5", "-o", tmp_path / "q.yaml")
    assert r.exit_code == 2 and "--recipes: codec channel_alpha must lie in [0, 1], got 1.5" in r.output, r.output


# --- review findings on the planner (ties, messages, counts) ----------------------------------------

def _search_at(profile, q_bar, recipes=PROFILE_RECIPES, **kw):
    space = SearchSpace(split_layers=(2,), q_w=((8, None),), qa=(16,), q_bar=(q_bar,), tau=(TAU,),
                        tau_is_quantile=True, recipes=recipes)
    return search_plans(profile, space, Budgets(10**8, 0.01), 64, lambda c: 0.0, max_codec_error=0.15, **kw)


def test_an_unmeasured_q_bar_keeps_the_papers_recipe():
    profile = _profile(_points(20.0, 0.10, 30.0, 0.05))       # measured at q̄ 4 only
    # both recipes get the same estimate at q̄ 5: the tie goes to the paper's recipe, not to 'hadamard' < 'none'
    assert _winner(_search_at(profile, 5)) == PAPER_RECIPE
    search = _search_at(profile, 5, measured_recipes_only=True)
    assert _winner(search) == PAPER_RECIPE
    (rot,) = [r for r in search.ranked if r.candidate.recipe == OURS_RECIPE]
    assert rot.rejected_by == "invalid" and "not measured at q̄ 5" in rot.reason
    # pinned, it is planned on the estimate; measured, it still competes
    assert _winner(_search_at(profile, 5, recipes=(OURS_RECIPE,), measured_recipes_only=False)) == OURS_RECIPE
    assert _winner(_search_at(_profile(_points(40.0, 0.10, 30.0, 0.05)), 4, measured_recipes_only=True)) == OURS_RECIPE


def test_plan_command_at_an_unmeasured_q_bar_keeps_the_papers_recipe(tmp_path):
    profile, table = _files(tmp_path, _points(20.0, 0.10, 30.0, 0.05))
    out = tmp_path / "plan.yaml"
    r = run("plan", "--profile", profile, "--mem", "10MB", "--accuracy-table", table, "--q-bar", "5", "-o", out)
    assert r.exit_code == 0, r.output
    assert (Plan.load(out).codec.rotation, Plan.load(out).codec.channel_alpha) == ("none", 0.0)
    r = run("plan", "--profile", profile, "--mem", "10MB", "--accuracy-table", table, "--q-bar", "5",
            "--rotation", "hadamard", "-o", out, "--force")
    assert r.exit_code == 0, r.output
    assert Plan.load(out).codec.rotation == "hadamard"


def test_plan_command_names_the_codec_bound_when_it_blocks_every_plan(tmp_path):
    profile, table = _files(tmp_path, _points(20.0, 0.50, 30.0, 0.40))     # both recipes above 0.15
    for pin, hint in (([], "choose another --q-bar"), (["--rotation", "none"], "drop the --rotation/--channel-alpha pin")):
        for drop in ("1%", "50%"):
            r = run("plan", "--profile", profile, "--mem", "10MB", "--accuracy-table", table, "--accuracy-drop", drop, *pin)
            text = " ".join(r.output.split())
            assert r.exit_code == 3, r.output
            assert "has a codec error above --codec-error 0.15" in text and "raise --codec-error" in text, text
            assert hint in text and "raise --accuracy-drop" not in text, text
    smallest = run("plan", "--profile", profile, "--mem", "10MB", "--accuracy-table", table)
    assert "smallest measured: 0.4, rot+α0.5 at q̄ 4" in " ".join(smallest.output.split())


def test_plan_command_says_when_the_codec_error_was_not_measured(tmp_path):
    profile, table = _files(tmp_path, _points(20.0, 0.10, 30.0, 0.05))
    r = run("plan", "--profile", profile, "--mem", "10MB", "--accuracy-table", table)
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "codec: its measured error 0.1 <= 0.15 (--codec-error)" in text, text
    for args in (["--q-bar", "5"], ["--q-bar", "5", "--rotation", "hadamard"]):   # unmeasured q̄, pinned recipe
        r = run("plan", "--profile", profile, "--mem", "10MB", "--accuracy-table", table, *args)
        text = " ".join(r.output.split())
        assert r.exit_code == 0, r.output
        assert "codec: error not measured" in text and "--codec-error not applied" in text, text
        assert "its measured error" not in text
    old = _profile(()).to_dict()                                             # a format-1 profile
    old["format_version"] = 1
    old["codec"]["points"] = [{"q_bar": 4, "tau": TAU, "bytes_per_token": 20.0, "tau_is_quantile": True}]
    write_yaml(tmp_path / "v1.yaml", old)
    r = run("plan", "--profile", tmp_path / "v1.yaml", "--mem", "10MB", "--accuracy-table", table)
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "codec: error not measured" in text and "its measured error" not in text, text


def test_proxy_evaluations_are_not_counted_per_recipe(tiny_model_dir, tmp_path):
    import re

    profile = tmp_path / "profile.yaml"
    write_yaml(profile, dataclasses.replace(_profile(_points(20.0, 0.10, 30.0, 0.05)),
                                            model_id=str(tiny_model_dir)).to_dict())
    data = tmp_path / "data"
    (data / "wikitext2").mkdir(parents=True)
    (data / "wikitext2" / "wiki.test.raw").write_text(" = Valkyria = \n\n The game began development in 2010 . " * 20)
    counts = []
    for pin in ([], ["--rotation", "none"]):
        r = run("plan", "--profile", profile, "--mem", "10MB", "--data-dir", data, "--proxy-seqlen", "32",
                "--accuracy-drop", "50%", "--q-bar", "4", *pin)
        assert r.exit_code == 0, r.output
        counts.append(re.search(r"(\d+) proxy evaluations", " ".join(r.output.split())))
    assert all(counts) and counts[0].group(1) == counts[1].group(1)


def test_plan_help_shows_the_defaults_the_readme_shows():
    r = runner.invoke(app, ["plan", "--help"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    for text in ("[default: those the profile measured, else 4,6,8]",
                 "[default: choose among the recipes the profile measured]",
                 "[default: choose among the measured recipes]"):
        assert text in r.output, r.output
