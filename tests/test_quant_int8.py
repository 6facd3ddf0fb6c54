"""Int8Linear: per-channel symmetric int8 on torch's `_weight_int8pack_mm` (run under every
ATEN_CPU_CAPABILITY by scripts/test.sh)."""

import pytest
import torch
from torch import nn

from splitcli.errors import SplitLLMError
from splitcli.quant import (
    Int8Linear, dequantize_weight, fake_quantized_weight, int8_kernel_supports, quantize_symmetric_rows,
    quantize_weight,
)
from splitcli.quant.transform import (
    layer_shapes_of, layer_weight_bytes, linear_matrix_bytes, load_quantized_, quantize_layers_, quantized_state_dict,
)
from tests.test_quant_modules import tiny_model


def _linear(n, k, bias=False, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(3)
    return lin


def test_symmetric_rows_bound_and_edges():
    w = torch.randn(40, 96) * torch.logspace(-3, 3, 40)[:, None]
    w[3] = 0  # an all-zero row: scale 0, codes 0, exact
    w[5, 7] = 1e4  # one huge value in a row
    q, s = quantize_symmetric_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and s.shape == (40,)
    assert int(q.abs().max()) <= 127 and float(s[3]) == 0 and not q[3].any()
    w_hat = q.double() * s.double()[:, None]
    assert bool(((w.double() - w_hat).abs() <= s.double()[:, None] / 2 + 1e-12).all())
    with pytest.raises(SplitLLMError, match="NaN"):
        quantize_symmetric_rows(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(SplitLLMError, match="non-empty"):
        quantize_symmetric_rows(torch.zeros(3, 0))
    # a constant row is reconstructed exactly when its value is a bf16 multiple of 127ths
    q, s = quantize_symmetric_rows(torch.full((1, 16), 127.0))
    assert torch.equal(q.float() * s.float(), torch.full((1, 16), 127.0))


@pytest.mark.parametrize("n,k,bias", [(48, 64, False), (64, 576, True), (7, 32, True), (33, 48, False)])
def test_int8_linear_matches_dequantized_reference(n, k, bias):
    lin = _linear(n, k, bias)
    m = Int8Linear.from_linear(lin)
    assert int8_kernel_supports(k) and m._kernel
    x = torch.randn(3, 5, k)
    ref = nn.functional.linear(x, m.dequantized_weight(), m.bias)
    y = m(x)
    assert y.shape == (3, 5, n) and y.dtype == torch.float32
    # bf16 activations and output: relative error of a few bf16 ulps of the output scale
    assert float((y - ref).abs().max()) <= 2e-2 * float(ref.abs().max())
    # the dequantized weight is within half a step of the original
    assert float((m.dequantized_weight() - lin.weight.detach()).abs().max()) <= float(m.scales.float().max()) / 2 + 1e-7


def test_int8_unsupported_width_falls_back_to_exact_dequantize():
    lin = _linear(8, 24, bias=True)  # 24 % 16 != 0: the kernel crashes on AVX-512 there
    m = Int8Linear.from_linear(lin)
    assert not int8_kernel_supports(24) and not m._kernel
    x = torch.randn(2, 24)
    assert torch.equal(m(x), nn.functional.linear(x, m.dequantized_weight(), m.bias))


def test_int8_export_import_exact_through_state_dict():
    model = tiny_model()
    layers = model.model.layers
    quantize_layers_(layers, [0, 2], 8, group_size=32)
    assert all(isinstance(m, Int8Linear) for m in layers[0].modules() if isinstance(m, (nn.Linear, Int8Linear))
               and m is not layers[0])
    sd = quantized_state_dict(layers)
    assert sd["0.mlp.up_proj.codes"].dtype == torch.int8 and sd["0.mlp.up_proj.scales"].shape == (128,)
    assert "0.mlp.up_proj.zeros" not in sd
    assert sd["0.mlp.up_proj.qmeta"].tolist() == [1, 3, 8, 64, 64, 128]
    fresh = tiny_model(seed=1).model.layers
    load_quantized_(fresh, sd)
    for name, m in layers.named_modules():
        if isinstance(m, Int8Linear):
            m2 = fresh.get_submodule(name)
            assert isinstance(m2, Int8Linear)
            assert torch.equal(m2.codes, m.codes) and torch.equal(m2.scales, m.scales)
    x = torch.randn(1, 4, 64)
    pos = torch.arange(4)[None]
    rot = model.model.rotary_emb(x, pos)
    a = layers[0](x, position_embeddings=rot, attention_mask=None)
    b = fresh[0](x, position_embeddings=rot, attention_mask=None)
    assert torch.equal(a, b)
    # stored bytes = the byte model the planner and the shard predictor use
    shapes = layer_shapes_of(tiny_model().model.layers[0])
    stored = sum(t.numel() * t.element_size() for k, t in sd.items() if k.startswith("0."))
    assert stored == layer_weight_bytes(shapes, 8, 32)
    assert linear_matrix_bytes(128, 64, 8, 32) == 128 * 64 + 128 * 2 + 24


def test_int8_load_refuses_mismatched_tensors():
    model = tiny_model()
    quantize_layers_(model.model.layers, [0], 8, group_size=32)
    sd = quantized_state_dict(model.model.layers)
    bad = dict(sd)
    bad["0.mlp.up_proj.codes"] = bad["0.mlp.up_proj.codes"].to(torch.uint8)
    with pytest.raises(SplitLLMError, match="do not match their qmeta"):
        load_quantized_(tiny_model().model.layers, bad)
    bad = dict(sd)
    del bad["0.mlp.up_proj.scales"]
    with pytest.raises(SplitLLMError, match="missing"):
        load_quantized_(tiny_model().model.layers, bad)


def test_fake_quantized_weight_is_the_runtime_scheme():
    lin = _linear(32, 64)
    m = Int8Linear.from_linear(lin)
    assert torch.equal(fake_quantized_weight(lin.weight, 8, 64), m.dequantized_weight())
    q = quantize_weight(lin.weight, 4, 32)
    assert len(q) == 3 and torch.equal(dequantize_weight(q, 4), fake_quantized_weight(lin.weight, 4, 32))


def test_static_quantized_kv_returns_exactly_the_dequantized_stored_values():
    from splitcli.quant import KVQuantConfig
    from splitcli.quant.rtn import dequantize_groupwise, quantize_kv
    from splitcli.quant.static_kv import QuantStaticKV

    torch.manual_seed(0)
    for bits, group in ((8, None), (4, None), (4, 16)):
        cache = QuantStaticKV(2, 3, 32, bits, capacity=2, cfg=KVQuantConfig(bits=bits, group_size=group))
        ks, vs = [], []
        for step, t in enumerate((5, 1, 1, 3)):  # a prefill, then decode steps past the capacity (growth)
            k, v = torch.randn(1, 3, t, 32) * 4, torch.randn(1, 3, t, 32)
            cache.reserve(cache.length + t, 1)
            ks.append(k)
            vs.append(v)
            got_k, got_v = cache.write(1, cache.length, k, v)
            cache.length += t
            want = torch.stack([torch.cat(ks, 2), torch.cat(vs, 2)])
            q, s, z = quantize_kv(want, bits, group or 32, torch.float16)
            ref = dequantize_groupwise(q, s, z, bits)
            assert torch.equal(got_k, ref[0]) and torch.equal(got_v, ref[1]), (bits, group, step)
        assert cache.capacity >= 10
