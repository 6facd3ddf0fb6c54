"""bench decode on a tiny random model: every path in one run, the JSON keys the issue names."""

import json

from splitcli.quant import kernels
from splitcli.bench.decode import bytes_per_step, copy_bandwidth_gb_s
from splitcli.model.split import decoder_parts
from tests.test_cli import run


def test_bench_decode_json_keys_and_consistency(tiny_model_dir, tmp_path):
    out = tmp_path / "d.json"
    r = run("bench", "decode", "-m", str(tiny_model_dir), "-l", "2", "--tokens", "4", "--repeats", "2",
            "--context", "8", "--threads", "1", "--json", str(out))
    assert r.exit_code == 0, r.output
    assert "measuring: decode of 4 tokens after a 8-token prompt" in r.output  # says what it measures
    d = json.loads(out.read_text())
    for key in ("unsplit_tok_s", "split_tok_s", "overhead", "hf_generate_tok_s", "split_int4_tok_s",
                "split_int8_tok_s", "bandwidth_gb_s", "bound_tok_s", "old_split_tok_s", "old_unsplit_tok_s"):
        assert isinstance(d[key], float) and (d[key] > 0 or key == "overhead"), key  # overhead may be < 0
    assert d["overhead"] == 1 - d["split_tok_s"] / d["unsplit_tok_s"]
    assert d["llama_cpp_tok_s"] is None and d["prompt_tokens"] == 8 and d["tokens"] == 4
    c = d["configs"]
    # the int4 edge also on torch's kernel, side by side, where splitllm's own kernel runs it
    ours = {4: kernels.available(), 8: kernels.available()}  # --threads 1: both, where they build
    assert set(c) == {"old_unsplit", "old_split", "unsplit", "split", "split_int4", "split_int8", "split_int4_kv8",
                      "hf_generate", "split_full_head", "split_torch_step", "split_int4_torch_step",
                      "local_int4", "old_local_int4"} | {
        f"split_int{b}_torch" for b in (4, 8) if ours[b]} | ({"split_int4_a8"} if ours[4] else set())
    # the edge alone before a handoff: fast against eager, the same OPSC edge model
    assert d["local_int4_tok_s"] == c["local_int4"]["tok_s"] > 0 and d["old_local_int4_tok_s"] == c["old_local_int4"]["tok_s"]
    assert d["local_int4_speedup_vs_old"] == d["local_int4_tok_s"] / d["old_local_int4_tok_s"]
    ratios = [b / a for a, b in zip(c["old_local_int4"]["tok_s_runs"], c["local_int4"]["tok_s_runs"])]
    assert d["local_int4_speedup_vs_old_paired_median"] == (ratios[0] + ratios[1]) / 2
    assert c["local_int4"]["edge_ms"] > 0 and c["local_int4"]["cloud_ms"] == 0  # the edge computes it all
    # the C decode step against the torch path's per-layer ops, the same splits side by side
    assert d["c_step_speedup"] == d["split_tok_s"] / d["split_torch_step_tok_s"]
    assert d["int4_c_step_speedup"] == d["split_int4_tok_s"] / d["split_int4_torch_step_tok_s"]
    assert d["int4_over_fp32_split_torch_step"] == d["split_int4_torch_step_tok_s"] / d["split_torch_step_tok_s"]
    assert c["split_torch_step"]["bytes_per_step"] == c["split"]["bytes_per_step"]
    # steps of two sessions taken alternately: one ratio per step pair, 4 steps x 2 rounds
    assert d["interleaved_steps"] == 8
    assert d["overhead_interleaved_median"] < 1 and d["int4_over_fp32_split_interleaved_median"] > 0
    # greedy steps on the screened LM head beside the float head computing every logit
    assert d["split_full_head_tok_s"] == c["split_full_head"]["tok_s"] > 0
    assert d["screened_head_speedup"] == d["split_tok_s"] / d["split_full_head_tok_s"]
    for key, base, other in (("screened_head_speedup_paired_median", "split_full_head", "split"),
                             ("int4_over_fp32_split_paired_median", "split", "split_int4"),
                             ("int8_over_fp32_split_paired_median", "split", "split_int8"),
                             ("c_step_speedup_paired_median", "split_torch_step", "split")):
        ratios = sorted(b / a for a, b in zip(c[base]["tok_s_runs"], c[other]["tok_s_runs"]))
        assert d[key] == (ratios[0] + ratios[1]) / 2  # the median of the 2 rounds' same-round ratios
    assert c["split_full_head"]["bytes_per_step"] == c["old_split"]["bytes_per_step"]
    # the int4 edge on 8-bit inputs (opt-in), where splitllm's kernel runs, beside the 16-bit one
    if ours[4]:
        assert d["split_int4_a8_tok_s"] == c["split_int4_a8"]["tok_s"] > 0
        assert d["int4_a8_over_fp32_split"] == d["split_int4_a8_tok_s"] / d["split_tok_s"]
        ratios = sorted(b / a for a, b in zip(c["split"]["tok_s_runs"], c["split_int4_a8"]["tok_s_runs"]))
        assert d["int4_a8_over_fp32_split_paired_median"] == (ratios[0] + ratios[1]) / 2
        assert d["int4_a8_over_fp32_split_interleaved_median"] > 0
        assert abs(c["split_int4_a8"]["bytes_per_step"] - c["split_int4"]["bytes_per_step"]) <= 8 * 64 * 4
        assert "with 8-bit inputs" in " ".join(r.output.split())  # the console wraps the summary anywhere
    else:
        assert d["split_int4_a8_tok_s"] is None and d["int4_a8_over_fp32_split_interleaved_median"] is None
    if kernels.available():
        v, h = 49152, 64  # the tiny model's vocabulary (the real tokenizer's) and width
        rows = d["screened_head_rows"]["split"]
        assert 1 <= rows <= v
        # the screen's codes, scales and bound coefficients plus the float rows, instead of the head
        assert c["split_full_head"]["bytes_per_step"] - c["split"]["bytes_per_step"] == \
            v * h * 4 - round(v * h + 10 * v + rows * h * 4)
    else:
        assert set(d["screened_head_rows"].values()) == {None}
    for bits in (4, 8):
        assert d[f"int{bits}_kernel"] == ("splitllm-avx2" if ours[bits] else f"torch ({kernels.why_unavailable()})")
        if ours[bits]:
            assert d[f"split_int{bits}_torch_kernel_tok_s"] == c[f"split_int{bits}_torch"]["tok_s"] > 0
            # the same bytes, the other kernel (up to the mean count of float LM-head rows its
            # screen computed, measured per path: <= 8 rows of 64 floats apart here)
            assert abs(c[f"split_int{bits}_torch"]["bytes_per_step"] - c[f"split_int{bits}"]["bytes_per_step"]) <= 8 * 64 * 4
            assert d[f"int{bits}_torch_kernel_over_fp32_split"] == c[f"split_int{bits}_torch"]["tok_s"] / c["split"]["tok_s"]
        else:
            assert d[f"split_int{bits}_torch_kernel_tok_s"] is None
    for name in ("split", "split_int4", "split_int8"):
        row = c[name]
        assert len(row["tok_s_runs"]) == 2 and row["edge_ms"] > 0 and row["cloud_ms"] > 0 and row["python_ms"] >= 0
        assert row["bound_tok_s"] == d["bandwidth_gb_s"] * 1e9 / row["bytes_per_step"]
    # quantized edges read fewer bytes per step than the fp32 split
    assert c["split_int4"]["bytes_per_step"] < c["split_int8"]["bytes_per_step"] < c["split"]["bytes_per_step"]
    assert d["fraction_of_bound"] == c["split"]["tok_s"] / c["split"]["bound_tok_s"]
    for bits in (4, 8):  # the ceiling the bytes set on each quantized edge's speed-up
        assert d[f"int{bits}_bound_ratio"] == c["split"]["bytes_per_step"] / c[f"split_int{bits}"]["bytes_per_step"] > 1


def test_bytes_per_step_counts_weights_head_row_and_kv():
    from tests.conftest import _tiny

    model = _tiny("llama")
    parts = decoder_parts(model)
    weights = sum(p.numel() * 4 for n, p in model.named_parameters() if "embed_tokens" not in n)
    # tied embedding: the LM head is the embedding table, counted once as the head
    head_tied = model.lm_head.weight is model.model.embed_tokens.weight
    row = 64 * 4
    kv = 4 * 2 * 2 * 16 * 4 * 10  # layers x (K, V) x kv heads x head_dim x 4 bytes x context
    expect = weights + (0 if not head_tied else model.lm_head.weight.numel() * 4) + row + kv
    assert bytes_per_step(parts, parts, 4, 10) == expect
    # a quantized edge KV (one group per head, fp16 scale + zero): per layer, K and V x 2 kv heads x
    # (16 x bits / 8 code bytes + 4) x 10 positions, against 2 x 2 x 16 x 4 x 10 = 2560 in float32
    fp = bytes_per_step(parts, parts, 2, 10)
    assert fp - bytes_per_step(parts, parts, 2, 10, kv_bits=8) == 2 * (2560 - 2 * 2 * (16 + 4) * 10)
    assert fp - bytes_per_step(parts, parts, 2, 10, kv_bits=4) == 2 * (2560 - 2 * 2 * (8 + 4) * 10)
    assert copy_bandwidth_gb_s(nbytes=1 << 20, repeats=2) > 0


def test_llama_cpp_runs_a_prompt_past_its_old_fixed_context():
    # n_ctx was a fixed 1024: a --context 1000 --tokens 64 run went past it inside llm.eval and
    # ended in a traceback; the context now follows llama.cpp's own prompt tokens + the steps
    import importlib.util

    import pytest

    from splitcli.bench.decode import llama_cpp_runner
    from splitcli.model.loader import resolve_model

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    gguf = resolve_model("smollm2-135m").path
    prompt = "The history of the city begins with a small settlement on the river, where " * 70
    run = llama_cpp_runner(gguf, 1, prompt, 4)
    out = run()
    assert out["tok_s"] > 0 and out["step_ms"] > 0


def test_interleaved_steps_alternate_which_session_goes_first_and_pair_their_times(monkeypatch):
    import torch

    from splitcli.bench import decode

    clock, order = [0.0], []

    class Fake:  # a session whose step costs a fixed time on a fake clock
        def __init__(self, name, cost):
            self.name, self.cost = name, cost

        def reserve(self, n):
            pass

        def prefill(self, ids, top=0):
            pass

        def forward(self, ids, top=0):
            order.append(self.name)
            clock[0] += self.cost * (1.5 if len(order) % 4 in (1, 2) else 1.0)  # drift hits both of a pair

    monkeypatch.setattr(decode.time, "perf_counter", lambda: clock[0])
    ratios = decode._interleaved(lambda: Fake("a", 3.0), lambda: Fake("b", 2.0), torch.zeros(1, 4, dtype=torch.long),
                                 torch.zeros(1, 4, dtype=torch.long))
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert ratios == [1.5, 1.5, 1.5, 1.5]
