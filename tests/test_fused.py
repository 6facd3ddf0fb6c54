"""model/fused.py: one product for q/k/v and gate/up equals the separate products (bit for bit for the
quantized kernels, to fp32 rounding for float GEMMs), the
modules keep computing what they did (their tensors become views of the fused ones: no second
copy), and the fast path's cheaper spellings (rms norm, rotary as a matrix) match the originals."""

import copy

import pytest
import torch
from torch import nn

from splitcli.model.fast import _rms_norm
from splitcli.model.fused import FusedLinear, _int4_repacked, _joined, fused_call, residual_call
from splitcli.model.shard_loader import resident_bytes
from splitcli.quant.modules import Int4Linear, Int8Linear, QuantLinear

K = 128
SIZES = (128, 64, 64)  # q, k, v widths: multiples of the int4 kernel's row tiles (64 with AVX-512)


def _linears(bias: bool, sizes=SIZES, seed: int = 0) -> list[nn.Linear]:
    torch.manual_seed(seed)
    return [nn.Linear(K, n, bias=bias) for n in sizes]


def _same(kind: str, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Quantized kernels compute each output column from its own row of weights: bit for bit.
    A float GEMM may block the reduction differently for another N (seen under
    ATEN_CPU_CAPABILITY=default on an AMD Zen 3: ~1e-7 apart), so float holds to fp32 rounding."""
    if kind != "float":
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def _make(kind: str, bias: bool, sizes=SIZES) -> list[nn.Module]:
    lins = _linears(bias, sizes)
    if kind == "float":
        return lins
    if kind.startswith("int4"):  # "int4-g32": 32-code groups, which only torch's kernel takes
        return [Int4Linear.from_linear(m, 32 if kind == "int4-g32" else 64) for m in lins]
    return [Int8Linear.from_linear(m) for m in lins]


@pytest.mark.parametrize("kind", ["float", "int4", "int4 on torch's kernel", "int4-g32", "int8",
                                  "int8 on torch's kernel"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_product_equals_the_separate_products_and_holds_each_weight_once(kind, bias, monkeypatch, request):
    from splitcli.quant import kernels

    if kind.endswith(" on torch's kernel"):
        monkeypatch.setattr(kernels, "available", lambda: False)
        kind = kind.split()[0]
    elif kind in ("int4", "int8") and kernels.available():  # splitllm's kernels: chosen at one thread
        request.getfixturevalue("one_torch_thread")
        calls = []
        for name in ("mm4", "mm8"):
            real = getattr(kernels, name)
            monkeypatch.setattr(kernels, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
        request.addfinalizer(lambda: calls or pytest.fail("splitllm's kernel was never called"))
    mods = _make(kind, bias)
    if kind == "int4-g32":
        assert all(m.layout == "torch" for m in mods)
        kind = "int4"
    x = torch.randn(2, 3, K)
    before = [m(x) for m in mods]
    many = torch.randn(12, K)  # more tokens than the one-token kernels take: the prefill paths
    before_many = [m(many) for m in mods]
    bytes_before = resident_bytes(nn.ModuleList(mods))
    fused = FusedLinear.build(mods)
    assert fused is not None and fused.kind == kind and fused.out_features == sum(SIZES)
    y = fused(x)  # [2, 3, N]
    assert y.dtype == torch.float32 and y.shape == (2, 3, sum(SIZES))
    assert _same(kind, y, torch.cat(before, -1))
    assert _same(kind, fused(many), torch.cat(before_many, -1))
    assert resident_bytes(nn.ModuleList(mods)) == bytes_before  # the fast path holds no second copy
    # the modules still compute what they did, now from views of the fused tensors
    assert all(_same(kind, m(x), b) for m, b in zip(mods, before))
    # building again over the same modules finds the joined tensors instead of copying them
    again = FusedLinear.build(mods)
    tensors = {"float": "weight", "int4": "packed", "int8": "codes"}[kind]
    assert getattr(again, tensors).data_ptr() == getattr(fused, tensors).data_ptr()
    assert torch.equal(again(x), y)
    # residual + product, the bf16 -> fp32 cast folded into the add
    one = FusedLinear.build([mods[0]])
    r = torch.randn(2, 3, SIZES[0])
    assert _same(kind, one.add_to(r, x), r + before[0])


def test_int4_rows_that_straddle_a_kernel_tile_are_fused_only_without_a_second_copy(int4_layout):
    # 32 rows: a whole tile with AVX2 / the default kernel, half of one with AVX-512
    mods = _make("int4", False, sizes=(32, 32, 64))
    x = torch.randn(1, K)
    before = [m(x) for m in mods]
    held = resident_bytes(nn.ModuleList(mods))
    fusable = _int4_repacked(mods) is not None  # this CPU's tiles hold each module's rows whole
    assert fusable or int4_layout == "torch"  # splitllm's layout is row by row
    call = fused_call(mods)
    assert isinstance(call, FusedLinear) == fusable  # fused exactly when no second copy is needed
    assert torch.equal(call(x), torch.cat(before, -1))
    assert resident_bytes(nn.ModuleList(mods)) == held
    assert all(torch.equal(m(x), b) for m, b in zip(mods, before))


def test_an_eager_int4_module_copies_its_fused_scales_once_not_per_call(monkeypatch):
    import splitcli.quant.modules as qm
    from splitcli.quant import kernels

    monkeypatch.setattr(kernels, "available", lambda: False)  # torch's layout: splitllm's views are contiguous

    mods = _make("int4", False)
    x = torch.randn(1, K)
    before = mods[1](x)
    FusedLinear.build(mods)
    assert not mods[1].scales_and_zeros.is_contiguous()
    seen = []  # the scales_and_zeros each kernel call gets (held, so no address is reused)
    real = qm._INT4_MM

    def spy(x2, packed, group, sz):
        seen.append(sz)
        return real(x2, packed, group, sz)

    monkeypatch.setattr(qm, "_INT4_MM", spy)
    outs = [mods[1](x) for _ in range(3)]
    assert all(torch.equal(o, before) for o in outs)
    assert all(sz.is_contiguous() for sz in seen) and len({sz.data_ptr() for sz in seen}) == 1
    # written in place through the view (load_state_dict does): the copy follows
    with torch.no_grad():
        mods[1].scales_and_zeros.mul_(2)
    assert torch.equal(mods[1](x), 2 * before)  # scales and zeros doubled: every weight doubled (no bias)


def test_int4_fused_survives_a_deepcopy_and_its_modules_export_the_same_codes(int4_layout):
    mods = _make("int4", False)
    exported = [m.export() for m in mods]
    FusedLinear.build(mods)
    # a view into the fused [K/g, N, 2] (torch's layout; splitllm's [N/4, K/g, 4, 2] block slices stay contiguous)
    assert mods[0].scales_and_zeros.is_contiguous() == (int4_layout == "splitllm")
    assert mods[0].scales_and_zeros.data_ptr() != 0 and mods[0].layout == int4_layout
    for m, e in zip(mods, exported):
        assert all(torch.equal(m.export()[k], v) for k, v in e.items())
    twin = copy.deepcopy(nn.ModuleList(mods))
    x = torch.randn(1, K)
    assert all(torch.equal(a(x), b(x)) for a, b in zip(twin, mods))


def test_what_cannot_fuse_falls_back_to_the_modules_own_forwards():
    lins = _linears(False)
    mixed = [lins[0], Int8Linear.from_linear(lins[1]), lins[2]]
    assert FusedLinear.build(mixed) is None
    x = torch.randn(1, 2, K)
    expect = torch.cat([m(x) for m in mixed], -1)
    assert torch.equal(fused_call(mixed)(x), expect)
    q = QuantLinear.from_linear(lins[0], 3, 32)  # no kernel at 3 bits
    assert FusedLinear.build([q]) is None
    r = torch.randn(1, 2, SIZES[0])
    assert torch.equal(residual_call(q)(r, x), r + q(x))
    ragged = _linears(True) + [nn.Linear(K, 16, bias=False)]  # bias on some only
    assert FusedLinear.build(ragged) is None


def test_joined_accepts_only_adjacent_slices_of_one_tensor():
    whole = torch.arange(24.0).reshape(6, 4)
    assert _joined([whole[:2], whole[2:6]], 0).data_ptr() == whole.data_ptr()
    assert _joined([whole[:2], whole[3:6]], 0) is None  # a gap
    assert _joined([whole[2:4], whole[:2]], 0) is None  # out of order
    assert _joined([whole[:2], torch.zeros(4, 4)], 0) is None  # another storage
    cols = whole.t().contiguous()  # [4, 6]
    assert _joined([cols[:, :3], cols[:, 3:]], 1) is not None


def test_rms_norm_is_llama_rms_norm_bit_for_bit():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(96, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    x = torch.randn(3, 5, 96) * 7
    assert torch.equal(_rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_model_saves_and_reloads_after_a_fast_session(family, tmp_path):
    # fused q/k/v and gate/up weights are interleaved column views of one tensor; save_pretrained
    # (transformers' shared-storage check views each tensor flat) must still write them
    import transformers as tf

    from splitcli.runtime.fast import FastUnsplitSession
    from splitcli.runtime.generate import SamplingConfig, generate
    from tests.conftest import _tiny

    model = _tiny(family)
    ids = torch.randint(0, 128, (1, 6))
    before = model(ids).logits
    generate(FastUnsplitSession(model), ids, None, SamplingConfig(max_new_tokens=3))
    assert not model.model.layers[0].self_attn.q_proj.weight.is_contiguous()  # fused: a column view
    model.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    saved, own = reloaded.state_dict(), model.state_dict()
    assert saved.keys() == own.keys() and all(torch.equal(saved[k], own[k]) for k in own)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, before, atol=1e-5, rtol=0)


def test_relayout_linear_is_the_fused_float_layout_of_one_module():
    from splitcli.model.fast import relayout_linear_

    lin = _linears(True, sizes=(64,))[0]
    x = torch.randn(1, K)
    before = lin(x)
    relayout_linear_(lin)
    w = lin.weight
    assert w.shape == (64, K) and not w.is_contiguous() and w.t().is_contiguous()  # [K, N] underneath
    assert torch.allclose(lin(x), before, atol=1e-6, rtol=0)
    assert lin.state_dict()["weight"].is_contiguous()  # saves like a fused module (its state_dict hook)
    # one rule: FusedLinear finds that layout instead of copying it, and relayout again changes nothing
    assert FusedLinear.build([lin]).weight.data_ptr() == w.data_ptr()
    relayout_linear_(lin)
    assert lin.weight.data_ptr() == w.data_ptr()
    # a quantized module is left as it is
    q = Int8Linear.from_linear(lin)
    codes = q.codes
    relayout_linear_(q)
    assert q.codes is codes
