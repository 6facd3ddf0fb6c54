"""The opt-in 8-bit input of splitllm's 4-bit kernel (Int4Linear.act_bits = 8, a plan's
edge_act_bits): the integer product of the input rounded as documented, its fallbacks, and the
setting's path from a plan to the edge's modules, the fused products and the C step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splitcli.deploy import SplitSpec, build_split
from splitcli.errors import SplitLLMError
from splitcli.model.fused import FusedLinear
from splitcli.plan.schema import Plan
from splitcli.quant import kernels, use_int4_act_bits_
from splitcli.quant.modules import Int4Linear
from tests.test_plan_schema import _plan
from tests.test_quant_kernels import _extremes, _same_nonfinite, _weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.why_unavailable()}")


def _rounded(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8 [M, K/G, G] as float64 integers, sx [M, K/G, 1] float32): the rounding kernels.c
    documents, in its float32 operations (inv = 127 / amax, x * inv to nearest even)."""
    xg = x.reshape(x.shape[0], -1, group)
    amax = xg.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    return torch.round(xg * inv).double(), amax / torch.tensor(127.0)


def _reference(x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """y [M, N] in float64 from the rounded input's exact integer sums per group, scaled as the
    kernel scales them, plus the zero term over the input's exact sum."""
    x8, sx = _rounded(x, group)
    n, k = q.shape
    s, z = sz[..., 0].double(), sz[..., 1].double()  # [N, K/G]
    dots = torch.einsum("ngk,mgk->mng", q.double().reshape(n, k // group, group), x8)  # exact integers
    xs = x.reshape(x.shape[0], -1, group).double().sum(-1)  # [M, K/G]
    return (dots * s * sx.double().squeeze(-1)[:, None, :]).sum(-1) + ((z - 8 * s) * xs[:, None, :]).sum(-1)


@needs_kernel
@pytest.mark.parametrize("group", [64, 128, 256])
@pytest.mark.parametrize("n", [4, 12])
def test_the_8_bit_input_product_is_the_integer_product_of_the_documented_rounding(group, n):
    packed, blocked, w, q = _weights(n, 768, group)
    sz = kernels.unblock_pairs4(blocked)  # [N, K/G, 2]
    for m in range(1, kernels.GEMV_MAX_TOKENS + 1):
        x = torch.randn(m, 768) * 3
        y = kernels.mm4(x, packed, blocked, group, act_bits=8)
        ref = _reference(x, q, sz, group)
        scale = x.double().abs() @ w.double().abs().t()
        assert float(((y.double() - ref).abs() / scale).max()) < 1e-6  # only float32 sums apart
        # and within the rounding's own bound of the float product: |dx| <= amax / 254 per input
        amax = x.reshape(m, -1, group).abs().amax(-1).double()  # [M, K/G]
        wabs = w.double().abs().reshape(n, -1, group).sum(-1)  # [N, K/G]
        bound = (amax / 254) @ wabs.t()
        err = (y.double() - x.double() @ w.double().t()).abs()
        assert bool((err <= bound * 1.0001 + 1e-5 * scale).all())
        assert float(err.max()) > 0  # coarser than the int16 input: it does round


@needs_kernel
def test_8_bit_input_rows_stand_alone_and_extremes_go_to_the_float_product():
    packed, blocked, w, _ = _weights(8, 128, 64)
    x = torch.randn(kernels.GEMV_MAX_TOKENS, 128)
    together = kernels.mm4(x, packed, blocked, 64, act_bits=8)
    alone = torch.cat([kernels.mm4(x[i : i + 1], packed, blocked, 64, act_bits=8) for i in range(x.shape[0])])
    assert torch.equal(together, alone)
    assert kernels.mm4(torch.empty(0, 128), packed, blocked, 64, act_bits=8).shape == (0, 8)
    assert torch.equal(kernels.mm4(torch.zeros(1, 128), packed, blocked, 64, act_bits=8), torch.zeros(1, 8))
    c = torch.full((1, 128), 0.75)  # every input is the group's largest: 127 levels exactly
    assert torch.allclose(kernels.mm4(c, packed, blocked, 64, act_bits=8), c @ w.t(), rtol=1e-5, atol=1e-5)
    ex = _extremes(128)  # tokens 0..6 (NaN, inf, huge, tiny, subnormal) are left to the float product
    y8, y16 = kernels.mm4(ex, packed, blocked, 64, act_bits=8), kernels.mm4(ex, packed, blocked, 64)
    assert _same_nonfinite(y8, y16)
    assert torch.equal(torch.nan_to_num(y8[:7]), torch.nan_to_num(y16[:7]))
    assert not torch.equal(y8[7], y16[7])  # the ordinary token is rounded to 8 bits


def test_input_bits_other_than_16_or_8_are_refused():
    packed, blocked, _, _ = _weights(4, 64, 64)
    with pytest.raises(SplitLLMError, match="input bits"):
        kernels.mm4(torch.randn(1, 64), packed, blocked, 64, act_bits=4)
    m = Int4Linear.from_linear(nn.Linear(64, 16, bias=False), 64)
    for bad in (4, 32, True, "8"):
        with pytest.raises(SplitLLMError, match="input bits"):
            m.use_act_bits(bad)
        with pytest.raises(SplitLLMError, match="8 or 16"):
            SplitSpec(edge_act_bits=bad)
        with pytest.raises(SplitLLMError, match="edge_act_bits"):
            _plan(edge_act_bits=bad)
    assert m.act_bits == 16


def test_the_plan_carries_edge_act_bits_and_reads_plans_without_it(tmp_path):
    plan = _plan(edge_act_bits=8)
    plan.save(tmp_path / "p.yaml")
    again = Plan.load(tmp_path / "p.yaml")
    assert again == plan and again.edge_act_bits == 8
    assert SplitSpec.from_plan(again).edge_act_bits == 8
    old = plan.to_dict()
    del old["edge_act_bits"]  # a plan written before the setting existed
    assert Plan.from_dict(old).edge_act_bits == 16


def test_torchs_kernel_keeps_its_bf16_input_whatever_the_setting():
    with kernels.disabled():
        m = Int4Linear.from_linear(nn.Linear(128, 32, bias=False), 64)
    assert m.layout == "torch"
    x = torch.randn(1, 128)
    y = m(x)
    assert use_int4_act_bits_(m, 8) == 1 and m.act_bits == 8
    assert torch.equal(m(x), y) and "input=bf16" in repr(m)


@needs_kernel
def test_fused_products_keep_each_modules_input_bits():
    a, b = (Int4Linear.from_linear(nn.Linear(128, 32, bias=False), 64) for _ in range(2))
    a.use_act_bits(8)
    assert FusedLinear.build([a, b]) is None  # different input widths: not one product
    b.use_act_bits(8)
    x = torch.randn(1, 128)
    separate = torch.cat([a(x), b(x)], -1)
    fused = FusedLinear.build([a, b])
    assert fused is not None and fused.act_bits == 8
    assert torch.equal(fused(x), separate)


@needs_kernel
def test_a_split_with_8_bit_edge_inputs_sets_every_edge_int4_module_and_runs_the_c_step():
    from splitcli.runtime.fast import fast_split_session
    from tests.conftest import _tiny
    from tests.test_decode_fast import _lm, _logits_run

    lm = _lm(_tiny("llama"))
    splits = {bits: build_split(lm, SplitSpec(split_layer=2, q_w1=4, qa=16, edge_act_bits=bits))
              for bits in (16, 8)}
    mods = [m for m in splits[8].edge.parts.layers.modules() if isinstance(m, Int4Linear)]
    assert mods and all(m.act_bits == 8 for m in mods)
    assert all(m.act_bits == 16 for m in splits[16].edge.parts.layers.modules() if isinstance(m, Int4Linear))
    # a prompt past GEMV_MAX_TOKENS: its products are float (calls of fewer tokens round too)
    ids = torch.randint(0, 128, (1, kernels.GEMV_MAX_TOKENS + 4), generator=torch.Generator().manual_seed(3))
    runs = {}
    for bits, split in splits.items():
        s = fast_split_session(split)
        assert s.edge.layers.step is not None, s.edge.layers.step_why
        runs[bits] = _logits_run(s, ids, None, 6)
    assert torch.equal(runs[8][0], runs[16][0])  # the prompt: the float product in both
    diffs = [float((x - y).abs().max()) for x, y in zip(runs[8][1:], runs[16][1:])]
    assert 0 < max(diffs) < 2e-2, diffs  # decode steps: the 8-bit input rounds, boundedly


def test_a_shard_split_takes_the_edge_act_bits_it_is_given(tiny_model_dir, tmp_path):
    from splitcli.deploy import build_shard_split
    from splitcli.model.loader import load_model
    from splitcli.model.shards import QuantSpec, write_shards

    write_shards(load_model(str(tiny_model_dir)), tiny_model_dir, QuantSpec(2, 4, None, None, "front", 64, 8, 16),
                 tmp_path / "shards")
    for bits in (8, 16):
        split, _, _ = build_shard_split(tmp_path / "shards", edge_act_bits=bits)
        mods = [m for m in split.edge.parts.layers.modules() if isinstance(m, Int4Linear)]
        assert mods and all(m.act_bits == bits for m in mods) and split.spec.edge_act_bits == bits
    with pytest.raises(SplitLLMError, match="8 or 16"):
        build_shard_split(tmp_path / "shards", edge_act_bits=4)
