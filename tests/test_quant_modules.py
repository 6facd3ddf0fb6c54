import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from splitcli.errors import SplitLLMError
from splitcli.quant.modules import (
    Int4Linear,
    QuantEmbedding,
    QuantLinear,
    int4_kernel_pack,
    int4_kernel_unpack,
)
from splitcli.quant.rtn import dequantize_groupwise, pack_codes, quantize_groupwise
from splitcli.quant.transform import (
    layer_shapes_of,
    layer_weight_bytes,
    llama_layer_shapes,
    load_quantized_,
    opsc_bits,
    opsc_weight_bytes,
    quantize_layers_,
    quantized_state_dict,
)


def tiny_config(**kw):
    base = dict(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    base.update(kw)
    return LlamaConfig(**base)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**kw)).eval()


@pytest.mark.parametrize("n,k,g", [(16, 32, 32), (32, 64, 32), (96, 64, 64), (576, 96, 32), (192, 256, 256)])
def test_int4_kernel_unpack_inverts_pack_on_this_cpu(n, k, g):
    # row counts that are and are not whole AVX2 (32) / AVX-512 (64) tiles
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(n + k))
    assert torch.equal(int4_kernel_unpack(int4_kernel_pack(q), n, k, g), q)
    q[:] = 15  # the extreme codes survive too
    q[0, :] = 0
    assert torch.equal(int4_kernel_unpack(int4_kernel_pack(q), n, k, g), q)


@pytest.mark.parametrize("bias", [False, True])
def test_int4_linear_matches_dequantized_reference(bias):
    torch.manual_seed(1)
    lin = nn.Linear(128, 192, bias=bias)
    m = Int4Linear.from_linear(lin, 64)
    q, s, z = quantize_groupwise(lin.weight, 4, 64, torch.bfloat16)
    w_ref = dequantize_groupwise(q, s, z, 4)
    assert torch.equal(m.dequantized_weight(), w_ref)
    x = torch.randn(2, 5, 128)
    ref = nn.functional.linear(x, w_ref, lin.bias)
    with torch.no_grad():
        y = m(x)
        ref = ref.detach()
    assert y.dtype == torch.float32 and y.shape == (2, 5, 192)
    rel = float((y - ref).norm() / ref.norm())
    assert rel < 1e-2  # bf16 activations: ~3e-3 expected


def test_int4_linear_rejects_unsupported_shape():
    with pytest.raises(SplitLLMError):
        Int4Linear.from_linear(nn.Linear(64, 40), 32)  # 40 rows: the kernel takes multiples of 16
    with pytest.raises(SplitLLMError):
        Int4Linear.from_linear(nn.Linear(64, 64), 16)  # kernel takes groups of 32..256


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quant_linear_forward_equals_dequantized(bits):
    torch.manual_seed(2)
    lin = nn.Linear(48, 20)
    m = QuantLinear.from_linear(lin, bits, 16)
    x = torch.randn(3, 48)
    with torch.no_grad():
        assert torch.equal(m(x), nn.functional.linear(x, m.dequantized_weight(), lin.bias))
        err = (m(x) - lin(x)).abs().max()
    assert float(err) < (1.0 if bits <= 3 else 0.3)


def test_quant_embedding():
    torch.manual_seed(3)
    emb = nn.Embedding(50, 32)
    qe = QuantEmbedding.from_embedding(emb, bits=8, group_size=16)
    ids = torch.tensor([[0, 7, 49], [3, 3, 3]])
    out = qe(ids)
    assert out.shape == (2, 3, 32)
    q, s, z = quantize_groupwise(emb.weight, 8, 16, torch.bfloat16)
    assert torch.equal(out, dequantize_groupwise(q, s, z, 8)[ids])
    assert float((out - emb(ids)).detach().abs().max()) < 0.02


@pytest.mark.parametrize("group", [None, 8])
def test_quant_embedding_is_made_a_block_of_rows_at_a_time_with_the_whole_tables_codes(group, monkeypatch):
    """Blocks of rows bound the float64 temporaries (SmolLM2's table at once: +873 MB); groups never
    span rows, so the codes, scales and zeros are the whole table's, a short last block included."""
    from splitcli.quant import modules

    torch.manual_seed(4)
    emb = nn.Embedding(23, 16)
    with torch.no_grad():
        emb.weight.mul_(torch.logspace(-3, 3, 23).unsqueeze(1))     # rows from tiny to large
        emb.weight[5] = 2.5                                         # a constant row
    q, s, z = quantize_groupwise(emb.weight, 8, group or 16, torch.bfloat16)
    monkeypatch.setattr(modules, "_EMBED_BLOCK_ROWS", 5)
    qe = QuantEmbedding.from_embedding(emb, bits=8, group_size=group)
    assert torch.equal(qe.codes, pack_codes(q, 8)) and torch.equal(qe.scales, s) and torch.equal(qe.zeros, z)
    assert QuantEmbedding.from_embedding(nn.Embedding(0, 16), bits=8).codes.shape[0] == 0


def test_opsc_bits():
    assert opsc_bits(5, 2, 4, 16) == [4, 4, 16, 16, 16]
    assert opsc_bits(5, 2, 4, 16, "back") == [16, 16, 16, 4, 4]
    assert opsc_bits(3, 3, 2, None) == [2, 2, 2]
    assert opsc_bits(3, 0, 2, None) == [None, None, None]
    assert opsc_bits(0, 0, 4, 8) == []
    for bad in [dict(l_w=4), dict(l_w=-1), dict(q_w1=5), dict(q_w2=1), dict(method="middle")]:
        args = dict(L=3, l_w=1, q_w1=4, q_w2=16, method="front") | bad
        with pytest.raises(SplitLLMError):
            opsc_bits(**args)


def test_quantize_layers_bad_group_leaves_model_untouched():
    m = tiny_model()
    with pytest.raises(SplitLLMError, match="64"):
        quantize_layers_(m.model.layers, [0, 1], 4, 48)
    assert sum(isinstance(x, (QuantLinear, Int4Linear)) for x in m.modules()) == 0


def test_quantize_layers_swaps_the_right_layers():
    m = tiny_model()
    quantize_layers_(m.model.layers, [0, 1, 2], opsc_bits(3, 2, 4, 16), 32)
    for i, expect in [(0, True), (1, True), (2, False)]:
        layer = m.model.layers[i]
        assert isinstance(layer.self_attn.q_proj, Int4Linear) == expect  # 64 rows: kernel path
        assert isinstance(layer.self_attn.k_proj, Int4Linear) == expect  # 32 rows: kernel path too
        assert isinstance(layer.mlp.down_proj, Int4Linear) == expect
    # rows the kernel cannot take fall back to the portable module
    m = tiny_model()
    m.model.layers[0].mlp.gate_proj = nn.Linear(64, 40)
    quantize_layers_(m.model.layers, [0], 4, 32)
    assert isinstance(m.model.layers[0].mlp.gate_proj, QuantLinear)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_state_dict_round_trip_identical_logits_and_exact_bytes(bits):
    cfg = tiny_config(attention_bias=True)
    m = tiny_model(attention_bias=True)
    bits_per_layer = opsc_bits(3, 2, bits, 16)
    quantize_layers_(m.model.layers, range(3), bits_per_layer, 32)
    m.model.embed_tokens = QuantEmbedding.from_embedding(m.model.embed_tokens, 8, 32)
    ids = torch.tensor([[1, 5, 9, 2, 77, 3]])
    with torch.no_grad():
        ref = m(ids).logits

    sd = quantized_state_dict(m.model.layers)
    # exact byte accounting, from the config alone and from the quantized layers
    actual = sum(t.numel() * t.element_size() for t in sd.values())
    assert opsc_weight_bytes(llama_layer_shapes(cfg), bits_per_layer, 32) == actual
    per_layer = [layer_shapes_of(layer) for layer in m.model.layers]
    assert opsc_weight_bytes(per_layer, bits_per_layer, 32) == actual

    # rebuild the layers on the meta device: no float weights are ever made for them
    from safetensors.torch import load, save
    sd2 = load(save(sd))
    emb_sd = quantized_state_dict(nn.ModuleDict({"embed_tokens": m.model.embed_tokens}))
    m2 = tiny_model(seed=9, attention_bias=True)
    with torch.device("meta"):
        m2.model.layers = nn.ModuleList(
            type(m.model.layers[0])(m2.config, i) for i in range(3)
        )
    load_quantized_(m2.model.layers, sd2)
    holder = nn.ModuleDict({"embed_tokens": m2.model.embed_tokens})
    load_quantized_(holder, load(save(emb_sd)))
    m2.model.embed_tokens = holder["embed_tokens"]
    m2.lm_head.weight = m.lm_head.weight
    m2.model.norm.weight = m.model.norm.weight
    assert not any(t.is_meta for t in m2.state_dict().values())
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, ref)


def test_layer_bytes_hand_computed():
    from splitcli.quant.transform import LayerShapes
    s = LayerShapes(linears=(("a", 64, 128, True),), others=(("n", 10),))
    # 4-bit: 64*64 code bytes + 2 * 64*2 groups * 2 bytes + 24 qmeta + 64*4 bias + 10*4 norm
    assert layer_weight_bytes(s, 4, 64) == 4096 + 512 + 24 + 256 + 40
    assert layer_weight_bytes(s, 16, 64) == (64 * 128 + 64 + 10) * 4
    assert layer_weight_bytes(s, 16, 64, float_bytes=2) == (64 * 128 + 64 + 10) * 2
    assert layer_weight_bytes(s, None, 64) == 0
    with pytest.raises(SplitLLMError):
        layer_weight_bytes(s, 4, 48)


def test_load_rejects_bad_state_dict():
    m = tiny_model()
    quantize_layers_(m.model.layers, [0], 8, 32)
    sd = quantized_state_dict(m.model.layers)
    bad = dict(sd)
    bad["0.self_attn.q_proj.qmeta"] = torch.tensor([99, 0, 8, 32, 64, 64], dtype=torch.int32)
    with pytest.raises(SplitLLMError, match="format"):
        load_quantized_(tiny_model().model.layers, bad)
    partial = {k: v for k, v in sd.items() if not k.startswith("2.")}
    with pytest.raises(SplitLLMError, match="missing"):
        load_quantized_(tiny_model().model.layers, partial)


def test_quantize_layers_noops_and_bad_ids():
    m = tiny_model()
    quantize_layers_(m.model.layers, [0, 1], [16, None], 32)
    quantize_layers_(m.model.layers, [], 4, 32)
    assert sum(isinstance(x, (QuantLinear, Int4Linear)) for x in m.modules()) == 0
    with pytest.raises(SplitLLMError, match="does not exist"):
        quantize_layers_(m.model.layers, [3], 4, 32)
    with pytest.raises(SplitLLMError):
        quantize_layers_(m.model.layers, [0, 1], [4], 32)


def test_int4_linear_empty_batch_and_export_round_trip():
    torch.manual_seed(4)
    lin = nn.Linear(64, 128)
    m = Int4Linear.from_linear(lin, 32)
    with torch.no_grad():
        assert m(torch.zeros(0, 64)).shape == (0, 128)
    e = m.export()
    # the export is the portable format: the very bytes QuantLinear stores for the same weight
    portable = QuantLinear.from_linear(lin, 4, 32).export()
    assert e.keys() == portable.keys() and all(torch.equal(e[k], portable[k]) for k in e)
    q, _, _ = quantize_groupwise(lin.weight, 4, 32, torch.bfloat16)
    assert torch.equal(e["codes"], pack_codes(q, 4))
    m2 = Int4Linear.from_portable(64, 128, 32, e["codes"], e["scales"], e["zeros"], e["bias"])
    e2 = m2.export()
    assert all(torch.equal(e[k], e2[k]) for k in e)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(m2(x), m(x))


def test_default_group_size():
    from splitcli.quant import default_group_size

    smol = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    assert default_group_size(llama_layer_shapes(smol)) == 64
    assert default_group_size(llama_layer_shapes(tiny_config(hidden_size=256, intermediate_size=512))) == 128
    with pytest.raises(SplitLLMError, match="none of the group sizes"):
        default_group_size(llama_layer_shapes(tiny_config(hidden_size=96, intermediate_size=192)))
