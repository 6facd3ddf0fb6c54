"""CLI: `generate --codec tabq` and `bench codec` on the tiny model with a synthetic data dir."""

from __future__ import annotations

import json

import pytest

from splitcli.deploy.calibrate import cache_dir
from test_cli import assert_clean_error, run
from test_deploy_calibrate import write_wikitext


@pytest.fixture()
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    return write_wikitext(tmp_path / "data", n_chars=12000)


def test_generate_codec_tabq_sends_smaller_frames(tiny_model_dir, tmp_path, env):
    outs = {}
    for codec in ("none", "tabq"):
        out = tmp_path / f"{codec}.json"
        r = run("generate", "-m", str(tiny_model_dir), "-l", "2", "-p", "Hello there", "-n", "4",
                "--codec", codec, "--data-dir", str(env), "--json", str(out))
        assert r.exit_code == 0, r.output
        outs[codec] = json.loads(out.read_text())
    assert outs["tabq"]["wire"] == "tabq" and outs["none"]["wire"] == "raw-fp32"
    assert "calibrating the codec" in r.output
    raw, coded = outs["none"]["steps"], outs["tabq"]["steps"]
    assert len(raw) == len(coded) == 4
    for a, b in zip(raw, coded):
        assert 0 < b["wire_bytes"] < a["wire_bytes"]
    # the second run hits the calibration cache
    r = run("generate", "-m", str(tiny_model_dir), "-l", "2", "-p", "Hi", "-n", "2", "--codec", "tabq",
            "--data-dir", str(env), "--max-bits", "6", "--tau-quantile", "0.999")
    assert r.exit_code == 0 and "calibrating" not in r.output, r.output
    r = run("generate", "-m", str(tiny_model_dir), "-l", "2", "-p", "Hi", "-n", "2", "--codec", "tabq",
            "--tau", "1.5", "--no-entropy", "--data-dir", str(tmp_path / "absent"))
    assert r.exit_code == 0, r.output     # absolute tau + bit packing needs no calibration data


@pytest.mark.parametrize("args, msg", [
    (["--codec", "zip"], "--codec must be one of"),
    (["--codec", "tabq", "--tau", "1", "--tau-quantile", "0.9"], "exactly one"),
    (["--codec", "tabq", "--max-bits", "9"], "--max-bits"),
    (["--codec", "tabq", "--delta", "-1"], "--delta"),
    (["--codec", "tabq", "--tau-quantile", "2"], "--tau-quantile"),
    (["--tau", "3"], "need --codec tabq"),
    (["--codec", "tabq", "--data-dir", "/nonexistent/dir"], "does not exist"),
])
def test_generate_codec_bad_options(args, msg):
    assert_clean_error(run("generate", "-m", "/nonexistent/model", "-p", "Hi", *args), msg)


def test_bench_codec_tiny(tiny_model_dir, tmp_path, env):
    out, png = tmp_path / "codec.json", tmp_path / "sweep.png"
    r = run("bench", "codec", "-m", str(tiny_model_dir), "-l", "2", "--windows", "2", "--seqlen", "64",
            "--sweep-layers", "1,2", "--data-dir", str(env), "--json", str(out), "--plot", str(png))
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    for key in ("ratio_vs_fp16", "rel_l2_error", "ppl_fp", "ppl_codec", "encode_ms_decode_step",
                "decode_ms_decode_step", "prefill_encode_mb_s", "entropy_overhead", "decode_step_frame_bytes"):
        assert isinstance(data[key], float), key
    assert data["ratio_vs_fp16"] > 1 and 0 < data["rel_l2_error"] < 0.2
    assert data["ppl_fp"] > 1 and data["ppl_codec"] > 1
    assert {m["method"] for m in data["methods"]} == {"fp32", "fp16", "int8", "zstd(fp16)", "codec"}
    assert data["calibration"]["cache"] == "miss" and data["prefill_tokens"] == 64
    sweep = data["sweep"]
    from splitcli.bench.codec import OURS, PAPER, SWEEP_RECIPES
    assert sweep["ppl_windows"] == 2 and sweep["ppl_seqlen"] == 64 and sweep["layers"] == [1, 2]
    assert len(sweep["rows"]) == 2 * len(SWEEP_RECIPES)
    rows = {(x["layer"], x["recipe"]): x for x in sweep["rows"]}
    for layer in (1, 2):
        paper, ours = rows[layer, PAPER], rows[layer, OURS]
        assert paper["q_bar"] == 6 and paper["settings"]["rotation"] == "none"
        assert ours["q_bar"] == 4 and ours["settings"]["rotation"] == "hadamard"
        # a higher tau quantile keeps fewer outliers; a narrower code makes smaller frames
        assert rows[layer, "paper τ.9999"]["outliers_per_token"] <= paper["outliers_per_token"]
        assert rows[layer, "paper Q̄4"]["bytes_per_token"] < rows[layer, "paper Q̄8"]["bytes_per_token"]
        assert rows[layer, "target 0.10"]["chosen"]["target_rel_error"] == 0.1
        for x in (paper, ours):
            assert x["ppl"] > 1 and x["encode_decode_ms_token"] > 0 and x["prefill_encode_mb_s"] > 0
    assert "calibration" in sweep and "evaluation" in sweep
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fewer than the headline" in r.output
    # no overwrite without --force
    again = run("bench", "codec", "-m", str(tiny_model_dir), "--data-dir", str(env), "--json", str(out))
    assert_clean_error(again, "--force")


@pytest.mark.parametrize("args, msg", [
    (["--windows", "0"], "--windows"),
    (["--seqlen", "1"], "--seqlen"),
    (["--no-sweep", "--plot", "x.png"], "drop --no-sweep"),
    (["--no-sweep", "--sweep-layers", "2"], "drop --no-sweep"),
    (["--sweep-layers", "a,b"], "--sweep-layers"),
    (["--rotation", "fft"], "--rotation"),
    (["--channel-alpha", "2"], "--channel-alpha"),
    (["--target-error", "0"], "--target-error"),
    (["--plot", "x.jpg"], ".png"),
    (["--max-bits", "1"], "--max-bits"),
    (["--tau", "-2"], "--tau"),
    (["--data-dir", "/nonexistent/dir"], "does not exist"),
])
def test_bench_codec_bad_options(args, msg, tmp_path, env):
    args = [a.replace("x.", str(tmp_path / "x.")) for a in args]
    if "--data-dir" not in args:
        args += ["--data-dir", str(env)]
    assert_clean_error(run("bench", "codec", "-m", "/nonexistent/model", "--json", str(tmp_path / "o.json"), *args), msg)


def test_bench_codec_text_too_short(tiny_model_dir, tmp_path, env):
    r = run("bench", "codec", "-m", str(tiny_model_dir), "-l", "2", "--windows", "50", "--seqlen", "256",
            "--no-sweep", "--data-dir", str(env), "--json", str(tmp_path / "o.json"))
    assert_clean_error(r, "do not fit")


def test_generate_and_bench_with_the_predictive_codec(tiny_model_dir, tmp_path, env):
    out = tmp_path / "gen.json"
    r = run("generate", "-m", str(tiny_model_dir), "-l", "2", "-p", "Hello there", "-n", "3",
            "--codec", "predictive", "--data-dir", str(env), "--json", str(out))
    assert r.exit_code == 0, r.output
    assert "fitting the predictive codec" in r.output
    data = json.loads(out.read_text())
    assert data["wire"] == "predictive" and len(data["steps"]) == 3 and all(s["wire_bytes"] > 0 for s in data["steps"])
    r = run("generate", "-m", str(tiny_model_dir), "-l", "2", "-p", "Hi", "-n", "2", "--codec", "predictive",
            "--data-dir", str(env))
    assert r.exit_code == 0 and "fitting" not in r.output, r.output           # cached
    r = run("generate", "-m", str(tiny_model_dir), "-l", "2", "-p", "Hi", "-n", "2", "--codec", "predictive",
            "--target-error", "0.3", "--data-dir", str(env))
    assert r.exit_code == 0 and "relative error 0.3000" in r.output, r.output   # another target: another fit
    mine = env / "mine.txt"   # the user's own text: --fit-text alone implies the predictive wire, no WikiText needed
    mine.write_text((env / "wikitext2" / "wiki.test.raw").read_text()[::-1])
    r = run("generate", "-m", str(tiny_model_dir), "-l", "2", "-p", "Hi", "-n", "2", "--fit-text", str(mine),
            "--data-dir", str(tmp_path / "nowhere"))
    assert r.exit_code == 0 and f"tokens of {mine}" in r.output.replace("\n", ""), r.output
    path = next(cache_dir().glob("*.npz"))
    r = run("generate", "-m", str(tiny_model_dir), "-l", "3", "-p", "Hi", "-n", "2", "--predictive-codec", str(path))
    assert_clean_error(r, "fitted at split layer 2, not 3")                   # a file fixes its ℓ
    out = tmp_path / "codec.json"
    r = run("bench", "codec", "-m", str(tiny_model_dir), "-l", "2", "--windows", "2", "--seqlen", "64", "--no-sweep",
            "--predictive", "--fit-windows", "4", "--predictive-error", "0.2", "--data-dir", str(env),
            "--json", str(out))
    assert r.exit_code == 0, r.output
    p = json.loads(out.read_text())["predictive"]
    assert p["ratio_vs_fp16"] > 1 and p["ppl"] > 1 and p["frame_version"] == 4
    assert p["fit"]["target_rel_error"] == 0.2 and p["prefill_tokens"] == 64
    assert p["encode_ms_decode_step"] > 0 and p["prefill_encode_mb_s"] > 0 and 0 < p["bulk_rel_error_window0"] < 1
    assert "token-predictive codec" in r.output
    # --text: the whole protocol on the user's text (no WikiText-2 needed): calibration, fit and ppl
    out = tmp_path / "mine.json"
    r = run("bench", "codec", "-m", str(tiny_model_dir), "-l", "2", "--windows", "2", "--seqlen", "64", "--no-sweep",
            "--predictive", "--fit-windows", "4", "--text", str(mine), "--data-dir", str(tmp_path / "nowhere"),
            "--json", str(out))
    assert r.exit_code == 0, r.output
    got = json.loads(out.read_text())
    assert got["text"] == str(mine) and str(mine) in got["protocol"] and str(mine) in got["calibration"]["calib_slice"]
    wiki = json.loads((tmp_path / "codec.json").read_text())            # the same protocol on WikiText-2
    assert got["predictive"]["fit"]["text"] == str(mine) and got["ppl_fp"] != wiki["ppl_fp"]
    assert got["calibration"]["text_sha256"] != wiki["calibration"]["text_sha256"]


@pytest.mark.parametrize("args, msg", [
    (["bench", "codec", "--predictive", "--predictive-error", "2"], "--predictive-error"),
    (["bench", "codec", "--fit-windows", "3"], "add it"),
    (["generate", "-p", "Hi", "--codec", "predictive", "--tau", "3"], "need --codec tabq"),
    (["generate", "-p", "Hi", "--predictive-codec", "/nonexistent/codec.npz"], "no such file"),
    (["generate", "-p", "Hi", "--codec", "tabq", "--predictive-codec", __file__], "needs --codec predictive"),
    (["generate", "-p", "Hi", "--target-error", "0.2", "--predictive-codec", __file__], "fixes its step"),
    (["generate", "-p", "Hi", "--codec", "predictive", "--max-bits", "4"], "takes --target-error only"),
    (["generate", "-p", "Hi", "--fit-text", "/nonexistent/text.txt"], "--fit-text: no such file"),
    (["bench", "codec", "--text", "/nonexistent/text.txt"], "cannot read the text"),
    (["generate", "-p", "Hi", "--codec", "tabq", "--fit-text", __file__], "needs --codec predictive"),
    (["serve-cloud", "--fit-text", __file__, "--predictive-codec", __file__, "--api-key", "k"], "give one"),
])
def test_predictive_codec_bad_options(args, msg, tmp_path, env):
    extra = ["--json", str(tmp_path / "o.json")] if args[0] == "bench" else []
    assert_clean_error(run(*args, "-m", "/nonexistent/model", "--data-dir", str(env), *extra), msg)
