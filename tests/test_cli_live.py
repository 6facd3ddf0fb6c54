"""`generate --deadline --link --trace`: Algorithm 2 live from the command line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from splitcli.cli import app

runner = CliRunner()


def _gen(model_dir, *args):
    return runner.invoke(app, ["generate", "-m", str(model_dir), "-l", "2", "-p", "Hello there", *map(str, args)])


@pytest.mark.parametrize("args, msg", [
    (["--deadline", "100ms"], "go together"),
    (["--link", "2Mbit/s"], "go together"),
    (["--trace", "t.jsonl"], "give --deadline and --link"),
    (["--local-tokens", "2"], "give --deadline and --link"),
    (["--deadline", "-1ms", "--link", "2Mbit/s"], "--deadline"),
    (["--deadline", "100ms", "--link", "fast"], "link"),
    (["--deadline", "100ms", "--link", "2Mbit/s", "--eps", "2"], "--eps"),
    (["--deadline", "100ms", "--link", "2Mbit/s", "--i-kv", "3"], "--i-kv"),
])
def test_live_option_errors(tiny_model_dir, args, msg):
    r = _gen(tiny_model_dir, *args)
    assert r.exit_code == 2, r.output
    assert msg in r.output and "Traceback" not in r.output


def test_live_generation_writes_a_trace(tiny_model_dir, tmp_path):
    trace = tmp_path / "t.jsonl"
    r = _gen(tiny_model_dir, "-n", "6", "--codec", "tabq", "--tau", "3", "--no-entropy", "--deadline", "5s",
             "--link", "10Mbit/s@0;1Mbit/s@3,5ms", "--eps", "0.01", "--trace", trace)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    steps, summary = [x for x in rows if x["kind"] == "step"], rows[-1]
    assert summary["kind"] == "summary" and summary["eps"] == 0.01 and summary["deadline_s"] == 5.0
    assert steps[0]["decision"] == "prefill" and len(steps) >= 2
    assert all(s["decision"] in ("prefill", "keep", "compress", "drop_kv", "stop") for s in steps)
    assert "outages" in r.output and "eps requested 0.01" in r.output
    # the trace is a user's file: not overwritten without --force
    again = _gen(tiny_model_dir, "-n", "2", "--deadline", "5s", "--link", "10Mbit/s", "--trace", trace)
    assert again.exit_code == 2 and "--force" in again.output


@pytest.mark.parametrize("codec", ["none", "predictive"])
def test_live_with_local_tokens_hands_off(tiny_model_dir, tmp_path, monkeypatch, codec):
    trace = tmp_path / "h.jsonl"
    extra = []
    if codec == "predictive":  # fitted on a small text; the handoff's history crosses as one format-4 frame
        from test_deploy_calibrate import write_wikitext

        monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
        extra = ["--codec", "predictive", "--data-dir", write_wikitext(tmp_path / "data", n_chars=12000), "--i-kv", "0"]
    r = _gen(tiny_model_dir, "-n", "6", "--deadline", "10s", "--link", "100Mbit/s", "--local-tokens", "3",
             "--trace", trace, *extra)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    stages = [s["stage"] for s in rows if s["kind"] == "step"]
    # the prefill runs on the edge alone too; then local steps, the handoff, and split steps
    assert stages[0] == "local" and "handoff" in stages and stages[-1] == "split"
    assert stages.index("handoff") == stages.count("local")
    assert rows[-1]["handoff"]["total_bytes"] > 0
    if codec == "predictive":
        assert rows[-1]["handoff"]["hidden_bytes"] > 0 and "wire predictive" in r.output
