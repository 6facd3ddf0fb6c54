"""The token-predictive codec in the profile and the planner: measured per split layer, counted in Ψ
at a TAB-Q width it was measured against, chosen by size and accuracy, written into a plan that
deploys it."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from splitcli.cli import app
from splitcli.configio import write_yaml
from splitcli.errors import SplitLLMError
from splitcli.plan.enumerate import Candidate, SearchSpace, search_plans, to_plan
from splitcli.plan.ranking import total_memory
from splitcli.plan.profile import CodecPoint, Profile
from splitcli.plan.recipes import OURS_RECIPE, PAPER_RECIPE, PREDICTIVE_RECIPE, Recipe, pinned_recipes
from splitcli.plan.schema import Budgets, Plan
from tests.test_plan_codec_recipe import _profile   # 4 layers, hidden 64, the given codec points

runner = CliRunner()
TAU = 0.999
RECIPES = (PAPER_RECIPE, PREDICTIVE_RECIPE)


def _tabq(layer=2, bytes_by_q=None, err_by_q=None):
    bytes_by_q = bytes_by_q or {4: 30.0, 6: 45.0}
    err_by_q = err_by_q or {4: 0.30, 6: 0.10}
    return [CodecPoint(q, TAU, bytes_by_q[q], True, rel_error=err_by_q[q], split_layer=layer) for q in bytes_by_q]


def _pred(layer=2, q_bar=4, nbytes=20.0, error=0.12, encode_ms=0.5):
    return CodecPoint(q_bar, TAU, nbytes, True, rel_error=error, split_layer=layer, wire="predictive",
                      encode_ms=encode_ms)


def _search(profile, q_bars=(4, 6), recipes=RECIPES, max_codec_error=0.15, **kw):
    space = SearchSpace(split_layers=(2,), q_w=((8, None),), qa=(16,), q_bar=q_bars, tau=(TAU,),
                        tau_is_quantile=True, recipes=recipes)
    return search_plans(profile, space, Budgets(10**8, 0.01), 64, kw.pop("accuracy", lambda c: 0.0),
                        max_codec_error=max_codec_error, measured_recipes_only=True, **kw)


# --- the recipe and the profile point ---------------------------------------------------------------

def test_the_predictive_recipe():
    assert PREDICTIVE_RECIPE.predictive and PREDICTIVE_RECIPE.name == "predictive"
    assert "token-predictive" in PREDICTIVE_RECIPE.describe() and not PAPER_RECIPE.predictive
    with pytest.raises(SplitLLMError, match="takes no rotation or channel alpha"):
        Recipe("hadamard", 0.0, "predictive")
    with pytest.raises(SplitLLMError, match="wire must be one of tabq, predictive"):
        Recipe(wire="fp16")
    # a --rotation / --channel-alpha pin means TAB-Q: the predictive codec is not kept
    assert pinned_recipes(RECIPES, "none", None) == (PAPER_RECIPE,)
    assert pinned_recipes(RECIPES, None, None) == RECIPES


def test_predictive_points_round_trip_and_are_read_at_the_nearest_layer():
    points = _tabq(1) + _tabq(3) + [_pred(1, q_bar=4, nbytes=20.0), _pred(3, q_bar=6, nbytes=26.0, encode_ms=None)]
    profile = _profile(points)
    back = Profile.from_dict(yaml.safe_load(yaml.safe_dump(profile.to_dict())))
    assert back == profile and back.codec.recipes == (PAPER_RECIPE, PREDICTIVE_RECIPE)
    assert "wire" not in profile.to_dict()["codec"]["points"][0]          # TAB-Q points are written as before
    # whatever q̄ and τ are asked, the predictive point nearest the layer
    assert profile.wire_bytes_per_token(8, 0.5, False, PREDICTIVE_RECIPE, 1) == 20.0
    assert profile.wire_bytes_per_token(4, TAU, True, PREDICTIVE_RECIPE, 3) == 26.0
    assert profile.codec.predictive_q_bar(1) == 4 and profile.codec.predictive_q_bar(3) == 6
    assert _profile(_tabq()).codec.predictive_q_bar(2) is None
    # one predictive point per layer; an older profile version has no wire key
    with pytest.raises(SplitLLMError, match="two predictive codec points at one split layer"):
        _profile([_pred(1, q_bar=4), _pred(1, q_bar=6)])
    old = profile.to_dict()
    assert old["format_version"] == 4
    old["format_version"] = 3
    with pytest.raises(SplitLLMError, match="unknown keys encode_ms, wire"):
        Profile.from_dict(old)
    # without predictive points a profile is written as format 3, which a format-3 reader takes
    tabq_only = _profile(_tabq(1) + _tabq(3))
    assert tabq_only.to_dict()["format_version"] == 3
    assert Profile.from_dict(yaml.safe_load(yaml.safe_dump(tabq_only.to_dict()))) == tabq_only


def test_psi_width_is_the_widest_q_bar_the_papers_codec_is_as_lossy_at():
    from splitcli.deploy.predictive_profile import psi_width

    ours = [CodecPoint(q, TAU, 10.0, True, rel_error=e, split_layer=2, **OURS_RECIPE.to_dict())
            for q, e in ((4, 0.12), (6, 0.05))]
    tabq = _tabq(err_by_q={4: 0.30, 6: 0.10}) + ours
    assert psi_width(0.13, tabq) == 4           # the paper's q̄ 4 (0.30) is lossier; its q̄ 6 (0.10) is not
    assert psi_width(0.10, tabq) == 6
    assert psi_width(0.31, tabq) == 2           # lossier than every width of the paper's
    assert psi_width(0.01, tabq) == 6           # more accurate than every width: the widest
    # without the paper's recipe: every measured recipe must be at least as lossy
    assert psi_width(0.12, ours) == 4 and psi_width(0.13, ours) == 2
    assert psi_width(0.5, []) == 2


# --- the planner -------------------------------------------------------------------------------------

def test_enumerated_once_at_its_own_width():
    search = _search(_profile(_tabq() + [_pred(q_bar=4)]), q_bars=(6, 8))
    preds = [r for r in search.ranked if r.candidate.recipe.predictive]
    assert [(r.candidate.q_bar, r.candidate.tau) for r in preds] == [(4, TAU)]     # not at 6 or 8
    assert preds[0].wire_bytes_per_token == 20.0 and preds[0].codec_error == 0.12


def test_psi_ranks_a_wider_tabq_first_and_ties_go_to_the_smaller_frame():
    # TAB-Q q̄ 6 passes the bound and counts more bits in Ψ than the predictive codec's width 4
    search = _search(_profile(_tabq() + [_pred(q_bar=4)]))
    assert search.winner.candidate.recipe == PAPER_RECIPE and search.winner.candidate.q_bar == 6
    # counted at q̄ 6 (as accurate as TAB-Q there): it ties on Ψ and wins on its smaller frame
    search = _search(_profile(_tabq() + [_pred(q_bar=6)]))
    assert search.winner.candidate.recipe == PREDICTIVE_RECIPE and search.decided_by == "fewer wire bytes"
    # over the bound: rejected on accuracy like any recipe
    search = _search(_profile(_tabq() + [_pred(q_bar=6, error=0.2)]))
    assert search.winner.candidate.recipe == PAPER_RECIPE
    (pred,) = [r for r in search.ranked if r.candidate.recipe.predictive]
    assert pred.rejected_by == "accuracy" and "codec error 0.2 > allowed 0.15" in pred.reason


def test_the_predictive_codec_is_bounded_by_its_own_target_when_given_one():
    """`plan` without --codec-error bounds each codec by its own default target: the shaped predictive
    codec's error in h is larger at equal perplexity, so TAB-Q's 0.15 would reject its default fit."""
    profile = _profile(_tabq(err_by_q={4: 0.30, 6: 0.17}) + [_pred(q_bar=6, error=0.17)])
    search = _search(profile, predictive_codec_error=0.175)
    assert search.winner.candidate.recipe == PREDICTIVE_RECIPE
    (tabq,) = [r for r in search.ranked if not r.candidate.recipe.predictive and r.candidate.q_bar == 6]
    assert tabq.rejected_by == "accuracy" and "codec error 0.17 > allowed 0.15" in tabq.reason
    search = _search(profile, predictive_codec_error=0.16)
    assert search.winner is None and search.codec_bound_only
    (pred,) = [r for r in search.ranked if r.candidate.recipe.predictive]
    assert "codec error 0.17 > allowed 0.16" in pred.reason


def test_its_edge_holds_the_8_bit_rows_it_predicts_from():
    profile = _profile(_tabq() + [_pred(q_bar=6)])
    rows8, exact = profile.embedding.weight_bytes_at(8), profile.embedding.weight_bytes_at(16)

    def memory(embed_bits):
        search = _search(profile, embed_bits=embed_bits)
        by_recipe = {r.candidate.recipe: r for r in search.ranked if r.candidate.q_bar == 6}
        return total_memory(by_recipe[PREDICTIVE_RECIPE]), total_memory(by_recipe[PAPER_RECIPE])

    pred, tabq = memory(8)
    assert pred == tabq                                   # the stored 8-bit rows are the codec's table
    pred, tabq = memory(16)
    assert pred - tabq == pytest.approx(rows8) and rows8 < exact    # a float table: the rows come on top
    # a budget between the two: TAB-Q fits, the predictive edge does not
    budget = (pred + tabq) / 2
    search = search_plans(profile, SearchSpace(split_layers=(2,), q_w=((8, None),), qa=(16,), q_bar=(4, 6),
                                               tau=(TAU,), tau_is_quantile=True, recipes=RECIPES),
                          Budgets(int(budget), 0.01), 64, lambda c: 0.0, max_codec_error=0.15,
                          embed_bits=16, measured_recipes_only=True)
    assert search.winner.candidate.recipe == PAPER_RECIPE
    assert any(r.rejected_by == "memory" and r.candidate.recipe.predictive for r in search.ranked)
    # a profile with no predictive point enumerates no predictive candidate, whatever the space says
    assert not [r for r in _search(_profile(_tabq())).ranked if r.candidate.recipe.predictive]


def test_a_deadline_over_a_slow_link_chooses_the_smaller_predictive_frame():
    from splitcli.cost.latency import LinkModel
    from splitcli.plan.advise import default_rate, latency_model, step_latency

    profile = _profile(_tabq(bytes_by_q={4: 300.0, 6: 450.0}) + [_pred(q_bar=4, nbytes=200.0, encode_ms=0.5)])
    link = LinkModel(1e5, 10.0, 1e-3)
    rate = default_rate(link)
    pred = Candidate(2, 2, "front", 8, None, 16, 4, TAU, wire="predictive")
    tabq6 = Candidate(2, 2, "front", 8, None, 16, 6, TAU)
    a, b = step_latency(profile, pred, link, rate), step_latency(profile, tabq6, link, rate)
    assert a.wire_bytes < b.wire_bytes and a.compute_s - b.compute_s == pytest.approx((0.5 - 0.1) / 1e3)
    deadline = (a.total_s + b.total_s) / 2                                 # q̄ 6 misses it, predictive meets it
    search = search_plans(profile, SearchSpace(split_layers=(2,), q_w=((8, None),), qa=(16,), q_bar=(4, 6),
                                               tau=(TAU,), tau_is_quantile=True, recipes=RECIPES),
                          Budgets(10**8, 0.01, deadline), 64, lambda c: 0.0, max_codec_error=0.15,
                          latency=latency_model(profile, link, rate), measured_recipes_only=True)
    assert search.winner.candidate.recipe == PREDICTIVE_RECIPE
    assert any(r.rejected_by == "deadline" and r.candidate.q_bar == 6 for r in search.ranked)


def test_accuracy_tables_key_the_wire():
    from splitcli.plan.accuracy import AccuracyTable

    table = AccuracyTable({"format_version": 1, "results": [{"wire": "predictive", "drop": 0.005},
                                                            {"wire": "tabq", "drop": 0.0}]})
    search = _search(_profile(_tabq() + [_pred(q_bar=6)]), accuracy=table.drop)
    assert search.winner.candidate.recipe == PAPER_RECIPE and search.winner.accuracy_drop == 0.0
    (pred,) = [r for r in search.ranked if r.candidate.recipe.predictive]
    assert pred.status == "lost" and pred.accuracy_drop == 0.005


def test_eval_results_of_a_predictive_split_are_its_rows(tmp_path):
    from splitcli.eval.pipelines import _predictive_key
    from splitcli.plan.eval_table import _row

    def result(codec, **pipe):
        return {"pipeline": {"pipeline": "split", "codec": codec, "split_layer": 2, "qa": 16, **pipe},
                "info": {"weight_bits": [4, 4, 16, 16]}}

    row = _row(result("predictive", predictive=_predictive_key(None)), "f.json")
    assert row == {"split_layer": 2, "edge_bits": [4, 4], "qa": 16, "wire": "predictive"}
    assert _row(result("tabq", q_bar=6), "f.json")["wire"] == "tabq"
    with pytest.raises(SplitLLMError, match="fitted for another error or on another text"):
        _row(result("predictive", predictive=_predictive_key(0.1)), "f.json")
    text = tmp_path / "mine.txt"                  # `eval --fit-text`: not the fit a plan deploys
    text.write_text("some text of the user's own")
    with pytest.raises(SplitLLMError, match="on another text"):
        _row(result("predictive", predictive=_predictive_key(None, str(text))), "f.json")
    before = _predictive_key(None).split(", table ")[0]   # an eval run from before the 8-bit rows
    with pytest.raises(SplitLLMError, match="predicted from the exact input embeddings.*re-run"):
        _row(result("predictive", predictive=before), "f.json")
    with pytest.raises(SplitLLMError, match="'fp16' wire is not a plan candidate"):
        _row(result("fp16"), "f.json")


# --- the plan file and its deployment ----------------------------------------------------------------

def test_a_predictive_plan_is_format_2_and_deploys_the_predictive_wire():
    from splitcli.cli.common import split_spec
    from splitcli.deploy import SplitSpec

    profile = _profile(_tabq() + [_pred(q_bar=6)])
    search = _search(profile)
    plan = to_plan(search.winner.candidate, profile, Budgets(10**8, 0.01), 64, group_size=32, tau_is_quantile=True)
    assert plan.wire == "predictive" and plan.format_version == 2 and plan.codec.target_rel_error is None
    assert plan.embed_bits == 8         # the 8-bit rows it predicts from
    back = Plan.from_dict(yaml.safe_load(yaml.safe_dump(plan.to_dict())))
    assert back == plan and back.to_dict()["wire"] == "predictive"
    assert SplitSpec.from_plan(plan).wire == "predictive" and SplitSpec.from_plan(plan, "tabq").wire == "tabq"
    assert split_spec(plan, None, {}).wire == "predictive" and split_spec(plan, "tabq", {}).wire == "tabq"
    # a TAB-Q plan is still written as format 1 (an older splitllm reads it), without a wire key
    tabq = to_plan(Candidate(2, 2, "front", 8, None, 16, 6, TAU), profile, Budgets(10**8, 0.01), 64, group_size=32,
                   tau_is_quantile=True)
    assert tabq.format_version == 1 and "wire" not in tabq.to_dict() and SplitSpec.from_plan(tabq).wire == "tabq"
    bad = plan.to_dict()
    bad["format_version"] = 1
    with pytest.raises(SplitLLMError, match="unknown keys wire"):
        Plan.from_dict(bad)
    with pytest.raises(SplitLLMError, match="needs format_version 2"):
        dataclasses.replace(plan, format_version=1)
    bad["format_version"] = 3
    with pytest.raises(SplitLLMError, match="format_version 3; this splitllm reads versions 1, 2"):
        Plan.from_dict(bad)


def test_plan_command_chooses_the_predictive_codec_and_says_why(tmp_path):
    profile = tmp_path / "profile.yaml"
    # encoding as fast as TAB-Q (else, with no link, its slower encode loses on predicted latency)
    write_yaml(profile, _profile(_tabq() + [_pred(q_bar=6, encode_ms=None)]).to_dict())
    table = tmp_path / "acc.json"
    table.write_text(json.dumps({"format_version": 1, "results": [{"drop": 0.0}]}))
    out = tmp_path / "plan.yaml"
    r = runner.invoke(app, ["plan", "--profile", str(profile), "--mem", "10MB", "--accuracy-table", str(table),
                            "-o", str(out)])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "codec recipe: predictive (token-predictive codec, frame format 4) at q̄ 6: 20 B/token, error 0.12" in text
    assert "not chosen: paper: 45 B/token, error 0.1 (measured at ℓ = 2) - same Psi, l, accuracy and latency, more wire bytes" in text
    assert Plan.load(out).wire == "predictive"
    # pinning a TAB-Q recipe field keeps it TAB-Q
    r = runner.invoke(app, ["plan", "--profile", str(profile), "--mem", "10MB", "--accuracy-table", str(table),
                            "--rotation", "none", "-o", str(out), "--force"])
    assert r.exit_code == 0, r.output
    assert Plan.load(out).wire == "tabq"
    # an error between TAB-Q's default target and the predictive codec's: its own bound by default
    profile = tmp_path / "profile-0.17.yaml"
    write_yaml(profile, _profile(_tabq() + [_pred(q_bar=6, encode_ms=None, error=0.17)]).to_dict())
    r = runner.invoke(app, ["plan", "--profile", str(profile), "--mem", "10MB", "--accuracy-table", str(table),
                            "-o", str(out), "--force"])
    assert r.exit_code == 0, r.output
    assert "its measured error 0.17 <= 0.175 (--codec-error)" in " ".join(r.output.split())
    assert Plan.load(out).wire == "predictive" and Plan.load(out).notes["codec_error_bound"] == 0.175
    r = runner.invoke(app, ["plan", "--profile", str(profile), "--mem", "10MB", "--accuracy-table", str(table),
                            "--codec-error", "0.15", "-o", str(out), "--force"])
    assert r.exit_code == 0, r.output
    assert Plan.load(out).wire == "tabq" and Plan.load(out).notes["codec_error_bound"] == 0.15


# --- measured on a model -----------------------------------------------------------------------------

def test_predictive_points_measure_the_deployed_codec(tmp_path, monkeypatch):
    from conftest import _tiny
    from splitcli.deploy.predictive import fitted_predictive
    from splitcli.deploy.predictive_profile import MEASURE_WINDOW, measure_ids, predictive_points
    from test_deploy_calibrate import CharTokenizer, write_wikitext

    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    data = write_wikitext(tmp_path / "data")
    lm = SimpleNamespace(model=_tiny("llama"), tokenizer=CharTokenizer(), sha256="cd" * 32)
    tabq = _tabq(layer=2, err_by_q={4: 0.9, 6: 0.9}) + _tabq(layer=3, err_by_q={4: 1e-6, 6: 1e-6})   # paper's
    logs: list[str] = []
    points = predictive_points(lm, (2, 3), 40, tabq, repeats=1, size_tokens=8, data_dir=data, progress=logs.append)
    assert [p.split_layer for p in points] == [2, 3] and all(p.recipe.predictive for p in points)
    assert [p.q_bar for p in points] == [6, 2]              # as lossy as TAB-Q at q̄ 6 / lossier than all
    assert all(p.bytes_per_token > 0 and 0 < p.rel_error < 1 and p.encode_ms > 0 for p in points)
    assert any("predictive codec at ℓ = 2" in m and "counted as q̄ 6 in Ψ" in m for m in logs)
    # the codec measured is the deployment's (cached), on tokens outside its fit text
    assert fitted_predictive(lm, 2, data)[2]["cache"] == "hit"
    ids = CharTokenizer()((data / "wikitext2" / "wiki.test.raw").read_text().replace("\r\n", "\n"))["input_ids"]
    assert measure_ids(lm, 40, data) == ids[MEASURE_WINDOW * 256:MEASURE_WINDOW * 256 + 40]
    with pytest.raises(SplitLLMError, match="too few to measure the predictive codec"):
        measure_ids(lm, 4000, data)


def test_profile_command_measures_the_predictive_codec(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "p.yaml"
    r = runner.invoke(app, ["profile", "-m", str(tiny_model_dir), "--bits", "16", "--kv-bits", "16", "--tokens", "1,8",
                            "--repeats", "1", "--decode-context", "12", "--predictive", "-o", str(out)])
    assert r.exit_code == 0, r.output
    profile = Profile.from_dict(yaml.safe_load(out.read_text()))
    preds = [p for p in profile.codec.points if p.recipe.predictive]
    assert [p.split_layer for p in preds] == list(profile.codec.split_layers)
    text = " ".join(r.output.split())
    assert "fitting the predictive codec at layer" in text and "predictive codec at ℓ = 1:" in text
