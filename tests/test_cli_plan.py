"""CliRunner tests for `splitllm profile`, `splitllm plan` and `generate --config`."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from splitcli.cli import app
from splitcli.configio import write_yaml
from splitcli.plan.profile import Profile, profile_from_architecture
from splitcli.plan.schema import Budgets, CodecSettings, Plan

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(result, pattern: str, code: int = 2):
    assert result.exit_code == code, result.output
    assert pattern in result.output, result.output
    assert "Traceback" not in result.output


def flat(output: str) -> str:
    """The output with rich's line wrapping undone (CliRunner's console is 80 columns wide)."""
    return " ".join(output.split())


def test_help():
    for args in (["profile"], ["plan"]):
        r = run(*args, "--help")
        assert r.exit_code == 0 and "Usage" in r.output


# --- profile -------------------------------------------------------------------------------------

def test_profile_tiny(tiny_model_dir, tmp_path):
    import torch
    import transformers as tf

    out = tmp_path / "p.yaml"
    args = ["profile", "-m", tiny_model_dir, "--bits", "4,16", "--kv-bits", "8,16", "--tokens", "1,8",
            "--repeats", "1", "--group-size", "32", "--decode-context", "12", "-o", out]
    r = run(*args)
    assert r.exit_code == 0, r.output
    profile = Profile.from_dict(yaml.safe_load(out.read_text()))
    model = tf.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    layer0 = model.model.layers[0]
    assert profile.n_layers == 4 and profile.group_size == 32 and profile.decode_context == 12
    assert profile.layers[0].weight_bytes[16] == 4 * sum(p.numel() for p in layer0.parameters())
    assert profile.layers[0].weight_bytes[4] < profile.layers[0].weight_bytes[16] / 4
    # fp32 cache: K and V, 2 KV heads x head_dim 16 x 4 bytes
    assert profile.layers[0].kv_bytes_per_token[16] == 2 * 2 * 16 * 4
    assert profile.layers[0].kv_bytes_per_token[8] < 2 * 2 * 16 * 4 / 2 + 2 * 2 * 2 * 2 + 1
    assert set(profile.layers[3].decode_ms_by_bits) == {4, 16}
    assert set(profile.layers[3].prefill_ms_by_bits[4]) == {1, 8}
    assert profile.embedding.weight_bytes == 49152 * 64 * 4
    assert profile.device.threads >= 1 and "torch" in profile.device.name
    assert profile.timed_path == "fast" and "timed on the fast decode path" in flat(r.output)
    assert_clean_error(run(*args), "--force")


@pytest.mark.parametrize("args, message", [
    (["--bits", "4,x"], "comma-separated integers"),
    (["--bits", "5"], "weight bits 5 not supported"),
    (["--kv-bits", "6"], "KV bits 6"),
    (["--tokens", "0"], "token counts must be >= 1"),
    (["--tokens", "600"], "exceeds the model's context of 512"),
    (["--decode-context", "512"], "decode context (512) + 1 exceeds the model's context of 512"),
    (["--decode-context", "0"], "decode context must be >= 1"),
    (["--repeats", "0"], "repeats must be >= 1"),
    (["--group-size", "48"], "group size 48 does not divide"),
])
def test_profile_bad_input(tiny_model_dir, tmp_path, args, message):
    assert_clean_error(run("profile", "-m", tiny_model_dir, "-o", tmp_path / "x.yaml", *args), message)


# --- plan ----------------------------------------------------------------------------------------

def synthetic_profile(tmp_path, model_id="synthetic") -> tuple:
    profile = profile_from_architecture(
        model_id=model_id, n_layers=4, hidden_size=64, n_kv_heads=2, head_dim=16,
        params_per_layer=40_960, embedding_params=64 * 1000, weight_bits=(4, 8, 16), kv_bits=(4, 8, 16),
        group_size=32, activation_peak_bytes=1000.0, decode_ms_per_layer=2.0,
    )
    path = tmp_path / "profile.yaml"
    write_yaml(path, profile.to_dict())
    return profile, path


def accuracy_table(tmp_path, rows) -> object:
    path = tmp_path / "acc.json"
    path.write_text(json.dumps({"format_version": 1, "metric": "ppl", "higher_is_better": False,
                                "baseline": 10.0, "results": rows}))
    return path


def test_plan_feasible_picks_highest_psi_then_least_memory(tmp_path):
    profile, path = synthetic_profile(tmp_path)
    table = accuracy_table(tmp_path, [{"drop": 0.0}])
    out = tmp_path / "plan.yaml"
    r = run("plan", "--profile", path, "--mem", "10MB", "--max-tokens", "64", "--accuracy-table", table, "-o", out)
    assert r.exit_code == 0, r.output
    plan = Plan.load(out)
    # Psi = l * Qa + (L - l) * q_bar is largest at l = L - 1 with Qa 16 and q_bar 8; among equal
    # Psi, equal drops and equal latency (this profile times every bit width alike) the least
    # memory wins: every edge layer at 4 bits.
    assert (plan.split_layer, plan.qa, plan.codec.q_bar) == (3, 16, 8)
    assert plan.edge_weight_bits == (4, 4, 4)
    assert plan.budgets.memory_bytes == 10_000_000 and plan.max_tokens == 64
    assert "chosen" in r.output and "lost" in r.output
    assert_clean_error(run("plan", "--profile", path, "--mem", "10MB", "--accuracy-table", table, "-o", out), "--force")


def test_plan_accuracy_rejects_and_says_why(tmp_path):
    profile, path = synthetic_profile(tmp_path)
    # 4-bit weights on all three edge layers are too lossy; a value 20% above the baseline.
    table = accuracy_table(tmp_path, [{"l_w": 3, "q_w1": 4, "value": 12.0}, {"l_w": 4, "q_w1": 4, "value": 12.0},
                                      {"q_w1": 4, "q_w2": None, "value": 12.0}, {"value": 10.05}])
    out = tmp_path / "plan.yaml"
    r = run("plan", "--profile", path, "--mem", "10MB", "--accuracy-table", table, "-o", out)
    assert r.exit_code == 0, r.output
    plan = Plan.load(out)
    assert plan.edge_act_bits == 16  # the default input width of the edge's 4-bit products
    # a user's pick is recorded (it does not change the search: the profile times 16-bit inputs)
    r8 = run("plan", "--profile", path, "--mem", "10MB", "--accuracy-table", table, "--edge-act-bits", "8",
             "-o", tmp_path / "plan8.yaml")
    assert r8.exit_code == 0, r8.output
    assert Plan.load(tmp_path / "plan8.yaml") == dataclasses.replace(plan, edge_act_bits=8)
    # Equal drops and timings: the least memory wins. All 8-bit beats a (4, 4, 8) mix because the
    # mix (q_w2 = 8) also keeps layer 3 at 8 bits in the edge shard, and that is counted.
    assert plan.edge_weight_bits == (8, 8, 8) and (plan.l_w, plan.q_w2) == (3, None)
    assert "accuracy: drop 0.2 > allowed 0.01" in r.output


def test_plan_infeasible_exit_3_with_smallest_budget(tmp_path):
    profile, path = synthetic_profile(tmp_path)
    table = accuracy_table(tmp_path, [{"drop": 0.0}])
    r = run("plan", "--profile", path, "--mem", "100KB", "--accuracy-table", table)
    assert_clean_error(r, "smallest budget that works is", code=3)
    smallest = int(re.search(r"\((\d+) bytes\)", r.output).group(1))
    # Cheapest candidate: l = 1, 4-bit weights, Qa 4, KV for 256 tokens, plus the embedding as the
    # edge stores it by default: 8-bit codes for 1000 x 64 values + an fp16 scale and zero per row.
    weights = 40_960 * 4 / 8 + 40_960 / 32 * 4
    kv = 256 * (2 * 2 * 16 * 4 / 8 + 2 * 2 * 4)
    assert smallest == int(weights + kv + 1000 + 64 * 1000 + 1000 * 4)
    assert run("plan", "--profile", path, "--mem", smallest, "--accuracy-table", table).exit_code == 0
    assert run("plan", "--profile", path, "--mem", smallest - 1, "--accuracy-table", table).exit_code == 3
    # A float embedding (--embed-bits 16) costs 2 bytes per value in this fp16 profile.
    r = run("plan", "--profile", path, "--mem", "100KB", "--accuracy-table", table, "--embed-bits", "16")
    assert_clean_error(r, "smallest budget that works is", code=3)
    assert int(re.search(r"\((\d+) bytes\)", r.output).group(1)) == int(weights + kv + 1000 + 64 * 1000 * 2)
    assert_clean_error(run("plan", "--profile", path, "--mem", "1MB", "--accuracy-table", table,
                           "--embed-bits", "4"), "--embed-bits must be 8 or 16")
    assert_clean_error(run("plan", "--profile", path, "--mem", "1MB", "--accuracy-table", table,
                           "--edge-act-bits", "4"), "--edge-act-bits must be 8 or 16")



def test_plan_nothing_accurate_enough_exit_3(tmp_path):
    _, path = synthetic_profile(tmp_path)
    table = accuracy_table(tmp_path, [{"drop": 0.5}])
    assert_clean_error(run("plan", "--profile", path, "--mem", "1GB", "--accuracy-table", table),
                       "raise --accuracy-drop", code=3)


@pytest.mark.parametrize("args, message", [
    (["--mem", "12parsecs"], "invalid size"),
    (["--mem", "-5MB"], "must not be negative"),
    (["--bandwidth", "10MHzz"], "invalid frequency"),
    (["--snr", "10dBm"], "invalid SNR"),
    (["--deadline", "5 furlongs"], "invalid time"),
    (["--accuracy-drop", "1 pct"], "invalid percentage"),
    (["--sweep", "depth"], "only 'max-tokens'"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--q-bar", "4,,8"], "comma-separated integers"),
])
def test_plan_bad_input(tmp_path, args, message):
    _, path = synthetic_profile(tmp_path)
    table = accuracy_table(tmp_path, [{"drop": 0.0}])
    base = {"--mem": "10MB"}
    base.update(dict(zip(args[::2], args[1::2])))
    flat = [x for kv in base.items() for x in kv]
    assert_clean_error(run("plan", "--profile", path, "--accuracy-table", table, *flat), message)


def test_plan_bad_files(tmp_path):
    _, path = synthetic_profile(tmp_path)
    table = accuracy_table(tmp_path, [{"drop": 0.0}])
    assert_clean_error(run("plan", "--profile", tmp_path / "none.yaml", "--mem", "1GB", "--accuracy-table", table),
                       "not found")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format_version": 1, "results": [{"split": 3, "drop": 0}]}))
    assert_clean_error(run("plan", "--profile", path, "--mem", "1GB", "--accuracy-table", bad), "unknown keys split")
    assert_clean_error(run("plan", "--profile", path, "--mem", "1GB", "--data-dir", tmp_path), "wiki.test.raw")


def test_plan_sweep_and_link(tmp_path):
    _, path = synthetic_profile(tmp_path)
    table = accuracy_table(tmp_path, [{"drop": 0.0}])
    r = run("plan", "--profile", path, "--mem", "10MB", "--max-tokens", "64", "--accuracy-table", table,
            "--bandwidth", "10MHz", "--snr", "10dB", "--deadline", "1s", "--sweep", "max-tokens")
    assert r.exit_code == 0, r.output
    assert "W̄ sweep" in r.output and "link rate R*" in r.output and "misses deadline" not in r.output


def test_plan_deadline_rejects_slow_plans_and_says_so(tmp_path):
    # 2 ms per edge layer and no link: l = 3 predicts 6 ms, l = 2 4 ms.
    _, path = synthetic_profile(tmp_path)
    table = accuracy_table(tmp_path, [{"drop": 0.0}])
    out = tmp_path / "plan.yaml"
    r = run("plan", "--profile", path, "--mem", "10MB", "--accuracy-table", table, "--deadline", "5ms", "-o", out)
    assert r.exit_code == 0, r.output
    plan = Plan.load(out)
    assert plan.split_layer == 2 and plan.budgets.deadline_s == pytest.approx(0.005)
    assert plan.notes["predicted_edge_ms_per_token"] == pytest.approx(4.0)
    # The l = 3 plans that would have won are shown among the runner-ups, with the reason.
    assert "rejected: misses deadline (6.0 ms > 5.0 ms)" in flat(r.output)


def test_plan_every_candidate_misses_deadline_exit_3(tmp_path):
    _, path = synthetic_profile(tmp_path)
    table = accuracy_table(tmp_path, [{"drop": 0.0}])
    r = run("plan", "--profile", path, "--mem", "10MB", "--accuracy-table", table, "--deadline", "1ms")
    assert_clean_error(r, "error: no configuration meets the deadline of 1.0 ms: the fastest candidate "
                          "(ℓ = 1, weights 4b x 1, Qa 4, q̄ 4) predicts 2.0 ms per token", code=3)
    assert len([line for line in r.output.splitlines() if line.startswith("error:")]) == 1
    # 6.5 ms holds l = 3's 6 ms of compute, but not once a 1 MHz link adds eq. (11)'s time on the
    # wire (the fastest candidate then sends the least: l = 3, q̄ 4).
    assert run("plan", "--profile", path, "--mem", "10MB", "--accuracy-table", table, "--deadline", "6.5ms").exit_code == 0
    r = run("plan", "--profile", path, "--mem", "10MB", "--accuracy-table", table, "--deadline", "6.5ms",
            "--bandwidth", "1MHz", "--snr", "10dB")
    assert_clean_error(r, "the fastest candidate (ℓ = 3, weights 4b x 3, Qa 4, q̄ 4) predicts 9.3 ms per token", code=3)
    assert_clean_error(run("plan", "--profile", path, "--mem", "10MB", "--accuracy-table", table,
                           "--deadline", "0ms"), "--deadline must be > 0")


def test_plan_prefers_smaller_drop_then_says_why(tmp_path):
    # Every weight choice fits 10 MB and passes 1%; full precision loses nothing, the rest a bit.
    _, path = synthetic_profile(tmp_path)
    table = accuracy_table(tmp_path, [{"q_w1": 16, "q_w2": None, "drop": 0.0}, {"drop": 0.002}])
    out = tmp_path / "plan.yaml"
    r = run("plan", "--profile", path, "--mem", "10MB", "--accuracy-table", table, "-o", out)
    assert r.exit_code == 0, r.output
    plan = Plan.load(out)
    assert plan.edge_weight_bits == (16, 16, 16) and (plan.q_w1, plan.q_w2) == (16, None)
    # Saved in the spelling whose memory was costed: the edge shard keeps layers 0-2 only.
    assert plan.l_w == plan.split_layer == 3
    assert "#1 chosen: chosen over #2 by: same Psi and l, smaller accuracy drop (0% < 0.2%)" in flat(r.output)
    assert ("chosen over (ℓ = 3, weights 4b x 3, Qa 16, q̄ 8) by: same Psi and l, smaller accuracy drop"
            in flat(r.output))
    assert "smaller accuracy drop" in plan.notes["decided_by"]
    # A budget the float edge does not fit still finds a quantized plan.
    r = run("plan", "--profile", path, "--mem", "300KB", "--accuracy-table", table, "-o", out, "--force")
    assert r.exit_code == 0, r.output
    assert 16 not in Plan.load(out).edge_weight_bits


def test_plan_codec_defaults_come_from_the_profile(tmp_path):
    import dataclasses

    from splitcli.plan.profile import CodecCost, CodecPoint

    profile, _ = synthetic_profile(tmp_path)
    points = (CodecPoint(4, 0.99, 20.0, True), CodecPoint(6, 0.99, 30.0, True))
    path = tmp_path / "codec-profile.yaml"
    write_yaml(path, dataclasses.replace(profile, codec=CodecCost(0.1, 0.1, points)).to_dict())
    table = accuracy_table(tmp_path, [{"drop": 0.0}])
    out = tmp_path / "plan.yaml"
    r = run("plan", "--profile", path, "--mem", "10MB", "--accuracy-table", table, "-o", out)
    assert r.exit_code == 0, r.output
    plan = Plan.load(out)
    # Only the measured points are candidates: q̄ 8 was never measured, so it is not planned.
    assert (plan.codec.q_bar, plan.codec.tau_quantile) == (6, 0.99)


def test_cli_defaults_have_one_home(tmp_path):
    """The plan command's defaults come from where each constant lives, not from copies."""
    import dataclasses

    from splitcli.model.shards import QuantSpec
    from splitcli.plan.codec_settings import DEFAULT_TAU_QUANTILE, CodecSettings
    from splitcli.plan.enumerate import DEFAULT_EMBED_BITS

    assert DEFAULT_EMBED_BITS == QuantSpec(1).embed_bits == {f.name: f.default for f in dataclasses.fields(Plan)}["embed_bits"]
    # A profile that measured no codec points: the codec settings' own defaults fill the plan.
    _, path = synthetic_profile(tmp_path)
    out = tmp_path / "plan.yaml"
    r = run("plan", "--profile", path, "--mem", "10MB", "--accuracy-table", accuracy_table(tmp_path, [{"drop": 0.0}]),
            "-o", out)
    assert r.exit_code == 0, r.output
    codec = Plan.load(out).codec
    assert codec.tau_quantile == DEFAULT_TAU_QUANTILE
    assert (codec.delta, codec.q_bar_min) == (CodecSettings().delta, CodecSettings().q_bar_min)
    assert_clean_error(run("plan", "--profile", path, "--mem", "10MB", "--q-bar", "4,12"),
                       "codec q_bar values must lie in [2, 8], got 12")


def test_plan_proxy_on_tiny_model(tiny_model_dir, tmp_path):
    _, path = synthetic_profile(tmp_path, model_id=str(tiny_model_dir))
    data = tmp_path / "data"
    (data / "wikitext2").mkdir(parents=True)
    (data / "wikitext2" / "wiki.test.raw").write_text(" = Valkyria = \n\n The game began development in 2010 . " * 20)
    out = tmp_path / "plan.yaml"
    r = run("plan", "--profile", path, "--mem", "10MB", "--data-dir", data, "--proxy-seqlen", "32",
            "--accuracy-drop", "50%", "-o", out)
    assert r.exit_code == 0, r.output
    assert "PROXY" in r.output
    assert "PROXY" in Plan.load(out).notes["accuracy"]


# --- generate --config ---------------------------------------------------------------------------

def tiny_plan(model_dir, q_w1: int, qa: int, split_layer: int = 2) -> Plan:
    return Plan(model_id=str(model_dir), n_layers=4, split_layer=split_layer, l_w=split_layer, method="front",
                q_w1=q_w1, q_w2=None, qa=qa, codec=CodecSettings(q_bar=8, delta=0.05, tau_quantile=0.999),
                group_size=32, max_tokens=64, budgets=Budgets(memory_bytes=10**7, max_accuracy_drop=0.01))


def test_generate_config(tiny_model_dir, tmp_path):
    full = tmp_path / "full.yaml"
    tiny_plan(tiny_model_dir, 16, 16).save(full)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    # A plan that quantizes nothing, on the raw wire, runs exactly like the plain split at the same ℓ.
    r = run("generate", "--config", full, "--codec", "none", "-p", "Hello there", "-n", "4", "--json", a)
    assert r.exit_code == 0, r.output
    r = run("generate", "-m", tiny_model_dir, "-l", "2", "-p", "Hello there", "-n", "4", "--json", b)
    assert r.exit_code == 0, r.output
    ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ja["tokens"] == jb["tokens"] and ja["split_layer"] == 2 and ja["plan"]["q_w1"] == 16
    quant = tmp_path / "q.yaml"
    tiny_plan(tiny_model_dir, 4, 8).save(quant)
    c = tmp_path / "c.json"
    r = run("generate", "--config", quant, "-l", "1", "-p", "Hello there", "-n", "3", "--json", c)
    assert r.exit_code == 0, r.output
    jc = json.loads(c.read_text())
    assert jc["split_layer"] == 1 and jc["plan"]["split_layer"] == 1  # the explicit flag wins
    assert (ja["wire"], jc["wire"]) == ("raw-fp32", "tabq")  # --config runs the plan's codec by default
    assert_clean_error(run("generate", "--config", tmp_path / "none.yaml", "-p", "x"), "not found")
    assert_clean_error(run("generate", "--config", quant, "-l", "7", "-p", "x"), "valid range 1..3")
