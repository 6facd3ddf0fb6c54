"""`splitllm eval --json` files as the planner's accuracy source (splitcli.plan.eval_table)."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from splitcli.cli import app
from splitcli.errors import SplitLLMError
from splitcli.plan.enumerate import Candidate
from splitcli.plan.eval_table import load_accuracy_table, table_from_eval_results
from splitcli.plan.schema import Plan
from test_cli_plan import accuracy_table, assert_clean_error, synthetic_profile

TASKS = {"piqa": "acc_norm", "boolq": "acc"}


def eval_file(tmp_path, name, pipeline="split", ell=3, bits=4, accs=(0.6, 0.5), limit=200, codec="tabq",
              sha="abc", q_bar=6, tau_quantile=None, n_layers=4):
    """A file shaped like `splitllm eval --json` output (splitcli/cli/eval.py) for a 4-layer model."""
    weight_bits = [bits] * ell + [None] * (n_layers - ell) if pipeline == "split" else [None] * n_layers
    results = [{"task": t, "metric": m, "metrics": {m: a, "acc": a}, "n": limit, "limit": limit}
               for (t, m), a in zip(TASKS.items(), accs)]
    data = {"config_hash": name, "limit": limit, "model": "tiny", "model_sha256": sha,
            "info": {"n_layers": n_layers, "weight_bits": weight_bits},
            "pipeline": {"pipeline": pipeline, "split_layer": ell, "q_w1": bits, "codec": codec, "q_bar": q_bar,
                         "tau": None, "tau_quantile": tau_quantile},
            "results": results}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


def cand(ell=3, l_w=3, q_w1=4, q_w2=None, qa=16, q_bar=6, tau=0.999, method="front"):
    return Candidate(ell, l_w, method, q_w1, q_w2, qa, q_bar, tau)


def test_drops_from_mean_headline_accuracy(tmp_path):
    fp = eval_file(tmp_path, "fp", pipeline="fp", accs=(0.6, 0.5))
    w4 = eval_file(tmp_path, "w4", bits=4, accs=(0.55, 0.5))
    w8 = eval_file(tmp_path, "w8", bits=8, accs=(0.6, 0.49))
    table = table_from_eval_results([fp, w4, w8])
    assert table.higher_is_better and "boolq, piqa" in table.metric and "first 200" in table.metric
    assert table.drop(cand(q_w1=4)) == pytest.approx((0.55 - 0.525) / 0.55)
    assert table.drop(cand(q_w1=8)) == pytest.approx((0.55 - 0.545) / 0.55)
    # Any OPSC layout that puts the same bits on edge layers [0, 3) matches the same run.
    assert table.drop(cand(l_w=4, q_w2=16)) == table.drop(cand())
    assert table.drop(cand(l_w=1, method="back", q_w1=16, q_w2=4)) == table.drop(cand())
    # What the evaluator did not measure stays unmeasured: KV bits, another q̄ or τ, another ℓ or mix.
    for other in (cand(qa=8), cand(q_bar=4), cand(tau=0.99), cand(ell=2, l_w=2), cand(l_w=2, q_w2=8)):
        assert math.isnan(table.drop(other))


def test_perplexity_only_files_are_lower_is_better(tmp_path):
    def ppl_file(name, pipeline, value):
        path = eval_file(tmp_path, name, pipeline=pipeline)
        data = json.loads(path.read_text())
        data["results"] = [{"task": "wikitext2", "metric": "ppl", "metrics": {"ppl": value}, "n": 4, "limit": 4}]
        path.write_text(json.dumps(data))
        return path

    table = table_from_eval_results([ppl_file("fp", "fp", 20.0), ppl_file("s", "split", 25.0)])
    assert not table.higher_is_better and table.drop(cand()) == pytest.approx(0.25)


@pytest.mark.parametrize("files, message", [
    (lambda t: [eval_file(t, "s")], "one fp run as the baseline"),
    (lambda t: [eval_file(t, "fp", "fp")], "no split run"),
    (lambda t: [eval_file(t, "a", "fp"), eval_file(t, "b", "fp")], "more than one fp"),
    (lambda t: [eval_file(t, "fp", "fp"), eval_file(t, "s", limit=50)], "another model, task list or --limit"),
    (lambda t: [eval_file(t, "fp", "fp"), eval_file(t, "s", sha="zzz")], "another model"),
    (lambda t: [eval_file(t, "fp", "fp"), eval_file(t, "s", pipeline="local")], "'local' is not a plan candidate"),
    (lambda t: [eval_file(t, "fp", "fp"), eval_file(t, "s", codec="none")], "'none' wire"),
    (lambda t: [eval_file(t, "fp", "fp"), eval_file(t, "s", accs=(float("nan"), 0.5))], "no finite"),
    (lambda t: [eval_file(t, "fp", "fp"), t / "missing.json"], "not found"),
    (lambda t: [eval_file(t, "fp", "fp"), accuracy_table(t, [{"drop": 0.0}])], "not a `splitllm eval --json` file"),
])
def test_bad_result_sets(tmp_path, files, message):
    with pytest.raises(SplitLLMError, match=message):
        table_from_eval_results(files(tmp_path))


def test_single_hand_made_table_still_loads(tmp_path):
    table = load_accuracy_table([accuracy_table(tmp_path, [{"q_w1": 4, "value": 11.0}])])
    assert table.drop(cand()) == pytest.approx(0.1)
    with pytest.raises(SplitLLMError, match="edge_bits must hold"):
        from splitcli.plan.accuracy import AccuracyTable
        AccuracyTable({"format_version": 1, "baseline": 1.0, "n_layers": 4,
                       "results": [{"edge_bits": ["x"], "value": 1.0}]})
    with pytest.raises(SplitLLMError, match="n_layers"):
        from splitcli.plan.accuracy import AccuracyTable
        AccuracyTable({"format_version": 1, "baseline": 1.0, "results": [{"edge_bits": [4], "value": 1.0}]})


def test_plan_from_eval_results_prefers_less_memory_at_equal_accuracy(tmp_path):
    _, profile = synthetic_profile(tmp_path)
    fp = eval_file(tmp_path, "fp", pipeline="fp", accs=(0.6, 0.5))
    files = [fp, eval_file(tmp_path, "w4", bits=4, accs=(0.6, 0.5)), eval_file(tmp_path, "w8", bits=8, accs=(0.6, 0.5))]
    out = tmp_path / "plan.yaml"
    args = ["plan", "--profile", str(profile), "--mem", "10MB", "--max-tokens", "64", "--q-bar", "6", "-o", str(out)]
    r = CliRunner().invoke(app, args + [a for f in files for a in ("--accuracy-table", str(f))])
    assert r.exit_code == 0, r.output
    plan = Plan.load(out)
    assert (plan.split_layer, plan.edge_weight_bits, plan.qa, plan.codec.q_bar) == (3, (4, 4, 4), 16, 6)
    assert "measured: mean accuracy" in plan.notes["accuracy"]
    # When 4 bits costs accuracy beyond the allowed drop, the measured 8-bit run wins instead.
    files[1] = eval_file(tmp_path, "w4", bits=4, accs=(0.5, 0.5))
    r = CliRunner().invoke(app, args + ["--force"] + [a for f in files for a in ("--accuracy-table", str(f))])
    assert r.exit_code == 0, r.output
    assert Plan.load(out).edge_weight_bits == (8, 8, 8)
    assert_clean_error(CliRunner().invoke(app, args + ["--force", "--accuracy-table", str(files[1])]),
                       "one fp run as the baseline")


def _with_recipe(path, **pipeline):
    data = json.loads(path.read_text())
    data["pipeline"].update(pipeline)
    path.write_text(json.dumps(data))
    return path


def test_each_run_keeps_its_codec_recipe_whatever_the_file_order(tmp_path):
    fp = eval_file(tmp_path, "fp", pipeline="fp", accs=(0.6, 0.5))
    paper = eval_file(tmp_path, "paper", q_bar=4, accs=(0.30, 0.30))
    rot = _with_recipe(eval_file(tmp_path, "rot", q_bar=4, accs=(0.55, 0.5)),
                       rotation="hadamard", rotation_seed=0, channel_alpha=0.5)
    c_paper = cand(q_bar=4)
    c_rot = Candidate(3, 3, "front", 4, None, 16, 4, 0.999, "hadamard", 0.5)
    for files in ([fp, paper, rot], [fp, rot, paper]):
        table = table_from_eval_results(files)
        assert table.drop(c_paper) == pytest.approx((0.55 - 0.30) / 0.55)
        assert table.drop(c_rot) == pytest.approx((0.55 - 0.525) / 0.55)
        # a recipe no run measured stays unmeasured
        assert math.isnan(table.drop(Candidate(3, 3, "front", 4, None, 16, 4, 0.999, "none", 0.5)))


def test_a_run_that_calibrated_to_a_target_error_is_refused(tmp_path):
    fp = eval_file(tmp_path, "fp", pipeline="fp")
    run = _with_recipe(eval_file(tmp_path, "s"), target_rel_error=0.1)
    with pytest.raises(SplitLLMError, match="--target-error is not a plan candidate"):
        table_from_eval_results([fp, run])
