"""`splitllm eval` end to end on a tiny model with a user task file and a synthetic data directory."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from splitcli.cli import app

runner = CliRunner()

_SPEC = """\
name: colors
format: mc_jsonl
file: colors/test.jsonl
context: "Question: {q}\\nAnswer:"
choices: options
gold: answer
metric: acc_norm
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    (root / "colors").mkdir()
    colors = ["red", "green", "blue", "yellow", "black", "white"]
    rows = [{"q": f"What color is thing number {i}?", "options": [colors[i % 6], colors[(i + 1) % 6], colors[(i + 2) % 6]],
             "answer": i % 3} for i in range(30)]
    (root / "colors" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("spec") / "colors.yaml"
    p.write_text(_SPEC)
    return p


def _eval(tiny_model_dir, spec_file, data_dir, out, cache, *extra):
    return runner.invoke(app, ["eval", "-m", str(tiny_model_dir), "--tasks", "", "--task-file", str(spec_file),
                               "--data-dir", str(data_dir), "--limit", "20", "--json", str(out),
                               "--cache-dir", str(cache), *extra])


def _one_line_error(r, pattern):
    assert r.exit_code == 2, r.output
    assert pattern in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_generic_task_file_end_to_end(tiny_model_dir, spec_file, data_dir, tmp_path):
    cache = tmp_path / "cache"
    fp_out, split_out = tmp_path / "fp.json", tmp_path / "split.json"
    r = _eval(tiny_model_dir, spec_file, data_dir, fp_out, cache)
    assert r.exit_code == 0, r.output
    fp = json.loads(fp_out.read_text())
    (res,) = fp["results"]
    assert res["task"] == "colors" and res["n"] == 20 and res["limit"] == 20
    assert set(res["metrics"]) == {"acc", "acc_norm"} and 0.0 <= res["metrics"]["acc_norm"] <= 1.0
    assert fp["pipeline"]["pipeline"] == "fp" and "colors" in r.output  # the results table
    # split with compression off scores exactly like fp (another cache key, so really recomputed)
    r = _eval(tiny_model_dir, spec_file, data_dir, split_out, cache, "--pipeline", "split", "-l", "2",
              "--q-w1", "16", "--codec", "none")
    assert r.exit_code == 0, r.output
    split = json.loads(split_out.read_text())
    assert split["config_hash"] != fp["config_hash"]
    assert split["results"][0]["metrics"] == res["metrics"]
    assert split["info"]["wire"] == "raw-fp32"
    # an existing --json needs --force; with it, the run is served from the cache
    r = _eval(tiny_model_dir, spec_file, data_dir, fp_out, cache)
    _one_line_error(r, "--force")
    r = _eval(tiny_model_dir, spec_file, data_dir, fp_out, cache, "--force")
    assert r.exit_code == 0 and json.loads(fp_out.read_text())["results"] == fp["results"]
    assert not json.loads(fp_out.read_text())["info"]  # the pipeline was never built


def test_plan_config(tiny_model_dir, spec_file, data_dir, tmp_path):
    from splitcli.plan.schema import Budgets, CodecSettings, Plan

    def plan(n_layers):
        p = tmp_path / f"plan{n_layers}.yaml"
        Plan(model_id="tiny", n_layers=n_layers, split_layer=2, l_w=2, method="front", q_w1=16, q_w2=None, qa=16,
             codec=CodecSettings(q_bar=4, delta=0.05, tau_quantile=0.999), group_size=64, max_tokens=64,
             budgets=Budgets(memory_bytes=2**30, max_accuracy_drop=0.05)).save(p)
        return p

    fp_out, plan_out = tmp_path / "fp.json", tmp_path / "plan.json"
    assert _eval(tiny_model_dir, spec_file, data_dir, fp_out, tmp_path / "c").exit_code == 0
    r = _eval(tiny_model_dir, spec_file, data_dir, plan_out, tmp_path / "c", "--config", str(plan(4)), "--codec", "none")
    assert r.exit_code == 0, r.output
    got = json.loads(plan_out.read_text())
    assert got["pipeline"]["pipeline"] == "split" and got["pipeline"]["split_layer"] == 2
    assert got["pipeline"]["q_w1"] == 16 and got["pipeline"]["codec"] == "none"  # the option overrides the plan
    assert got["results"][0]["metrics"] == json.loads(fp_out.read_text())["results"][0]["metrics"]
    r = _eval(tiny_model_dir, spec_file, data_dir, tmp_path / "x.json", tmp_path / "c", "--config", str(plan(30)), "--codec", "none")
    _one_line_error(r, "plan for 30 layers but the model has 4")


def test_missing_data_file_is_one_line_error(tiny_model_dir, spec_file, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _eval(tiny_model_dir, spec_file, empty, tmp_path / "o.json", tmp_path / "c")
    _one_line_error(r, str(empty / "colors" / "test.jsonl"))
    r = runner.invoke(app, ["eval", "--tasks", "arc_easy", "--data-dir", str(empty), "--json", str(tmp_path / "o.json")])
    _one_line_error(r, "arc/arc_easy_test.jsonl")
    # the codec's calibration text is checked before the model loads, too
    r = _eval(tiny_model_dir, spec_file, tmp_path / "nope", tmp_path / "o.json", tmp_path / "c")
    _one_line_error(r, "does not exist")


@pytest.mark.parametrize("args, message", [
    (["--pipeline", "quantum"], "unknown pipeline"),
    (["--pipeline", "fp", "--split-layer", "2"], "--split-layer"),
    (["--pipeline", "atom-w4a4", "--max-bits", "3"], "--max-bits"),
    (["--limit", "0"], "--limit"),
    (["--tasks", "nosuchtask"], "unknown task"),
    (["--tasks", "arc_easy,arc_easy"], "twice"),
    (["--tasks", ""], "no tasks"),
])
def test_bad_options_are_one_line_errors(args, message, tmp_path):
    r = runner.invoke(app, ["eval", *args, "--json", str(tmp_path / "o.json")])
    _one_line_error(r, message)


def test_json_exists_without_force(tmp_path):
    out = tmp_path / "o.json"
    out.write_text("{}")
    r = runner.invoke(app, ["eval", "--tasks", "arc_easy", "--json", str(out)])
    _one_line_error(r, "--force")
    assert out.read_text() == "{}"


def test_split_with_the_predictive_codec(tiny_model_dir, spec_file, data_dir, tmp_path, monkeypatch):
    import shutil

    from test_deploy_calibrate import write_wikitext

    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "user-cache"))
    out = tmp_path / "p.json"
    # the fit needs WikiText-2's test file: its absence is one line before the model loads
    r = _eval(tiny_model_dir, spec_file, data_dir, out, tmp_path / "c", "--pipeline", "split", "-l", "2",
              "--codec", "predictive")
    _one_line_error(r, "wiki.test.raw")
    both = write_wikitext(shutil.copytree(data_dir, tmp_path / "data"), n_chars=12000)
    r = _eval(tiny_model_dir, spec_file, both, out, tmp_path / "c", "--pipeline", "split", "-l", "2",
              "--codec", "predictive")
    assert r.exit_code == 0, r.output
    got = json.loads(out.read_text())
    assert got["info"]["wire"] == "predictive" and got["info"]["codec"]["frame_version"] == 4
    assert 0.0 <= got["results"][0]["metrics"]["acc_norm"] <= 1.0
    # --fit-text: the user's text instead of WikiText-2 (none needed), its own fit and its own cache key
    mine = tmp_path / "mine.txt"
    mine.write_text((both / "wikitext2" / "wiki.test.raw").read_text()[::-1])
    r = _eval(tiny_model_dir, spec_file, data_dir, tmp_path / "mine.json", tmp_path / "c", "--pipeline", "split",
              "-l", "2", "--fit-text", str(mine))
    assert r.exit_code == 0, r.output
    own = json.loads((tmp_path / "mine.json").read_text())
    assert own["info"]["wire"] == "predictive" and own["info"]["codec"]["path"] != got["info"]["codec"]["path"]
    assert own["config_hash"] != got["config_hash"] and "fit text with sha256" in own["pipeline"]["predictive"]


@pytest.mark.parametrize("extra, msg", [
    (["--fit-text", __file__], "applies to --pipeline split, not fp"),
    (["--pipeline", "split", "--codec", "tabq", "--fit-text", __file__], "needs --codec predictive"),
    (["--pipeline", "split", "--fit-text", "/nonexistent/text.txt"], "--fit-text: no such file"),
])
def test_fit_text_bad_options(tiny_model_dir, spec_file, data_dir, tmp_path, extra, msg):
    _one_line_error(_eval(tiny_model_dir, spec_file, data_dir, tmp_path / "o.json", tmp_path / "c", *extra), msg)
