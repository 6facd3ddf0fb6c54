"""bench decode on a tiny random model: every path in one run, the JSON keys the issue names."""

import json

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
        assert isinstance(d[key], float) and d[key] > 0 or key == "overhead", key
    assert d["overhead"] == 1 - d["split_tok_s"] / d["unsplit_tok_s"]
    assert d["llama_cpp_tok_s"] is None and d["prompt_tokens"] == 8 and d["tokens"] == 4
    c = d["configs"]
    assert set(c) == {"old_unsplit", "old_split", "unsplit", "split", "split_int4", "split_int8", "split_int4_kv8",
                      "hf_generate"}
    for name in ("split", "split_int4", "split_int8"):
        row = c[name]
        assert len(row["tok_s_runs"]) == 2 and row["edge_ms"] > 0 and row["cloud_ms"] > 0 and row["python_ms"] >= 0
        assert row["bound_tok_s"] == d["bandwidth_gb_s"] * 1e9 / row["bytes_per_step"]
    # quantized edges read fewer bytes per step than the fp32 split
    assert c["split_int4"]["bytes_per_step"] < c["split_int8"]["bytes_per_step"] < c["split"]["bytes_per_step"]
    assert d["fraction_of_bound"] == c["split"]["tok_s"] / c["split"]["bound_tok_s"]


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
    assert copy_bandwidth_gb_s(nbytes=1 << 20, repeats=2) > 0
