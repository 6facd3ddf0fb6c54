"""Pieces of `splitllm bench quant`: fake-quant switching, the Table 4 loop, the edge memory model."""

from __future__ import annotations

import torch
from transformers import LlamaConfig

from splitcli.bench.edge_memory import kv_cache_bytes, layer_activation_bytes, predict_edge_memory
from splitcli.bench.quant import edge_decode_speed, quantized_weights, set_fake_quant, table4_ppl
from splitcli.model.split import EdgeHalf, decoder_parts
from splitcli.quant import KVQuantConfig, QuantLinear, kv_bytes_per_token


def _tiny(n_layers=4):
    import transformers as tf

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def test_fake_quant_switches_exactly_and_restores():
    model = _tiny()
    layers = decoder_parts(model).layers
    orig = [{n: m.weight.data for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)} for layer in layers]
    saved = [{n: w.clone() for n, w in d.items()} for d in orig]
    q = quantized_weights(layers, 4, 32)
    set_fake_quant(layers, orig, q, [True, False, False, True])
    ref = QuantLinear.from_linear(torch.nn.Linear(64, 64).requires_grad_(False), 4, 32)  # type sanity
    assert ref.bits == 4
    assert torch.equal(layers[0].mlp.up_proj.weight, q[0]["mlp.up_proj"])
    assert torch.equal(layers[1].mlp.up_proj.weight, saved[1]["mlp.up_proj"])
    assert not torch.equal(layers[3].self_attn.q_proj.weight, saved[3]["self_attn.q_proj"])
    set_fake_quant(layers, orig, q, [False] * 4)
    assert all(torch.equal(layers[i].get_submodule(n).weight, w) for i, d in enumerate(saved) for n, w in d.items())


def test_table4_loop_shape_and_endpoints():
    model = _tiny()
    ids = torch.randint(0, 96, (200,), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids[None, :20]).logits
    out = table4_ppl(model, ids, [0, 2, 4], seqlen=32, windows=2, group_size=32, bits=2)
    assert list(out["ppl_front"]) == [0, 2, 4] and list(out["ppl_back"]) == [0, 2, 4]
    assert out["ppl_front"][0] == out["ppl_back"][0] == out["ppl_fp"]
    assert out["ppl_front"][4] == out["ppl_back"][4]  # all layers quantized: one model
    assert out["ppl_front"][2] != out["ppl_back"][2] != out["ppl_fp"]
    assert torch.equal(model(input_ids=ids[None, :20]).logits, before)  # weights restored


def test_memory_model_terms():
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                      num_hidden_layers=30)
    # fp32 cache: 15 layers x K,V x 3 heads x 64 x 4 bytes per token
    assert kv_cache_bytes(cfg, 15, 16, 10) == 10 * 15 * 2 * 3 * 64 * 4
    assert kv_cache_bytes(cfg, 15, 8, 10) == 10 * kv_bytes_per_token(15, 3, 64, KVQuantConfig(bits=8))
    assert layer_activation_bytes(cfg, 0, 16, 0) == 0
    # hand count: 3 [T, I] f32 + [T, H] x (4 + 4 + 2) bytes
    assert layer_activation_bytes(cfg, 2, 16, 2) == 3 * 2 * 1536 * 4 + 2 * 576 * 10
    assert layer_activation_bytes(cfg, 2, 8, 5) - layer_activation_bytes(cfg, 2, 16, 5) == 2 * 3 * 5 * 64 * 4
    m = predict_edge_memory(cfg, 1000, 15, 8, 4, 8)
    assert m.weights_bytes == 1000 and m.total_bytes == 1000 + m.kv_bytes + m.activation_bytes


def test_edge_decode_speed_runs():
    model = _tiny(2)
    half = EdgeHalf(decoder_parts(model), 1)
    r = edge_decode_speed(half, half, 96, prompt_len=4, n_tokens=4, repeats=1)
    assert r["fp32"] > 0 and r["int4"] > 0 and len(r["fp32_runs"]) == 1


def test_bench_quant_cli_rejects_bad_flags(tmp_path):
    from typer.testing import CliRunner

    from splitcli.cli import app

    for extra, msg in ((["--lw", "a,b"], "--lw"), (["--windows", "0"], "--windows"),
                       (["--decode-threads", "-1"], "--decode-threads")):
        r = CliRunner().invoke(app, ["bench", "quant", "--json", str(tmp_path / "q.json"), *extra])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
