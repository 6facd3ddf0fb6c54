"""`splitllm bench serve` on a tiny model: the JSON has every required field for both modes with
finite positive numbers, the replayed sessions return exactly the in-process greedy tokens, bad
flags get one line and exit 2, and no server process is left running."""

from __future__ import annotations

import json
import math

import psutil
import pytest
import torch

from test_cli import assert_clean_error, run

REQUIRED = ("mode", "clients", "split_layer", "cloud_cpu_s_per_token", "tokens_per_s", "p50_ms", "p99_ms",
            "bytes_per_token")


def _children() -> list:
    """Live child processes, less multiprocessing's resource tracker (one per parent, by design)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(scope="module")
def bench(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-serve")
    before = {p.pid for p in _children()}
    r = run("bench", "serve", "-m", str(tiny_model_dir), "-l", "2", "--clients", "1,2", "--tokens", "4",
            "--repeats", "1", "--json", str(out / "serve.json"), "--plot", str(out / "serve.png"))
    assert r.exit_code == 0, r.output
    left = [p for p in _children() if p.pid not in before]
    return json.loads((out / "serve.json").read_text()), out, r.output, left


def test_json_has_both_modes_with_finite_positive_numbers(bench):
    result, out, output, _ = bench
    runs = result["runs"]
    assert {(r["mode"], r["clients"]) for r in runs} == {(m, c) for m in ("cloud-only", "split") for c in (1, 2)}
    for r in runs:
        assert all(k in r for k in REQUIRED), r
        for k in REQUIRED[3:]:
            assert math.isfinite(r[k]) and r[k] > 0, (k, r)
        assert r["split_layer"] == (0 if r["mode"] == "cloud-only" else 2)
        assert r["tokens"] == 4 * r["clients"]
    assert "replay" in result["protocol"] and "process_time" in result["cpu_measure"]
    assert result["machine"]["cpu_count"] >= 1 and "torch" in result["machine"]
    assert set(result["acceptance"]) >= {"cpu_per_token_split_over_cloud_only", "split_speedup_vs_1_client"}
    assert (out / "serve.png").stat().st_size > 1000
    assert "cloud CPU" in output


def test_replay_is_honest(bench, tiny_model_dir):
    """Every replayed token equals the recording, and the recording equals in-process generation."""
    from splitcli.deploy import SplitSpec, build_split
    from splitcli.model.loader import load_model
    from splitcli.runtime.generate import SamplingConfig, encode_prompts, generate
    from splitcli.runtime.session import UnsplitSession

    result = bench[0]
    assert all(r["replay_tokens_match"] for r in result["runs"])
    assert result["recorded_equals_generate"] and result["real_edge_check"]["tokens_equal_replay"]
    lm = load_model(str(tiny_model_dir))
    ids, _ = encode_prompts(lm.tokenizer, [result["reference"]["prompt"]])
    cfg = SamplingConfig(max_new_tokens=4)
    split = build_split(lm, SplitSpec(split_layer=2, wire="fp16"))
    assert generate(split.session(), ids, None, cfg).tokens[0].tolist() == result["reference"]["split_tokens"]
    with torch.inference_mode():
        unsplit = generate(UnsplitSession(lm.model), ids, None, cfg).tokens[0].tolist()
    assert unsplit == result["reference"]["cloud-only_tokens"]


def test_handoff_curve(bench):
    hand = bench[0]["handoff"]
    assert {h["i_kv"] for h in hand} == {0, 1}
    for h in hand:
        assert h["tokens"] == 4 and h["matches_split_greedy"]
        assert h["cloud_generated_tokens"] == 4 - min(h["w_bar"], 4)
    by_w = {h["w_bar"]: h["cloud_tokens"] for h in hand if h["i_kv"] == 1}
    assert by_w[0] == 4 and by_w[4] == 0 and list(by_w.values()) == sorted(by_w.values(), reverse=True)


def test_no_server_left_running(bench):
    assert bench[3] == []


@pytest.mark.parametrize("args, pattern", [
    (["--clients", "1,x"], "--clients must be comma-separated integers"),
    (["--clients", "0,2"], "--clients needs values in 1..64"),
    (["--tokens", "1"], "--tokens must be >= 2"),
    (["--wire", "int3"], "--wire must be none, fp16, tabq or predictive"),
    (["--plot", "out.pdf"], "--plot must name a .png file"),
    (["-l", "9"], "outside the valid range"),
])
def test_bad_flags_one_line_exit_2(tiny_model_dir, tmp_path, args, pattern):
    r = run("bench", "serve", "-m", str(tiny_model_dir), "--json", str(tmp_path / "x.json"), *args)
    assert_clean_error(r, pattern)
    assert not (tmp_path / "x.json").exists()


def test_existing_json_needs_force(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    assert_clean_error(run("bench", "serve", "--json", str(tmp_path / "x.json")), "--force")


def test_server_process_failure_is_one_error_and_leaves_nothing(tmp_path):
    from splitcli.bench.serve import ServerProcess
    from splitcli.errors import SplitLLMError

    before = {p.pid for p in _children()}
    with pytest.raises(SplitLLMError, match="cloud server process failed"):
        ServerProcess(str(tmp_path / "no-such-model"), 2, "fp16", None, max_sessions=2)
    assert [p for p in _children() if p.pid not in before] == []


@pytest.mark.parametrize("wire", ["tabq", "predictive"])
def test_codec_wires_replay_honestly(tiny_model_dir, tmp_path, monkeypatch, wire):
    """A codec wire: each replay session's Open carries what the server needs to decode its frames
    (tabq: the settings and the calibrated config; predictive: the codec's crc, checked against the
    codec the server process fitted), and the replay returns the in-process tokens. (Sizes are not
    asserted: a tiny random model's hidden states are not predictable from its tokens.)"""
    from test_deploy_calibrate import write_wikitext

    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    data = write_wikitext(tmp_path / "data", n_chars=12000)
    r = run("bench", "serve", "-m", str(tiny_model_dir), "-l", "2", "--clients", "1", "--tokens", "4",
            "--repeats", "1", "--wire", wire, "--data-dir", str(data), "--json", str(tmp_path / "p.json"))
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "p.json").read_text())
    runs = {x["mode"]: x for x in result["runs"]}
    assert result["recorded_equals_generate"] and result["real_edge_check"]["tokens_equal_replay"]
    assert all(x["replay_tokens_match"] for x in runs.values())
    assert runs["split"]["wire"] == wire and runs["cloud-only"]["wire"] == "fp16"
    assert runs["split"]["decode_bytes_per_token"] > 0 and runs["split"]["tokens"] == 4
    # the Fig. 5b curve: every w̄ handed over (the predictive wire codes the history against its ids)
    hand = result["handoff"]
    assert {(h["i_kv"], h["w_bar"]) for h in hand} == {(i, w) for i in (0, 1) for w in (0, 1, 2, 3, 4)}
    assert all(h["tokens"] == 4 for h in hand)
    assert all(h["frame_bytes"] > 0 for h in hand if h["w_bar"] < 4)   # the cloud took over
