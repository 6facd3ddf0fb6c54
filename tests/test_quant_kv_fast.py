"""The KV cache's per-token quantizer `quantize_kv` (float32, no host sync): its stated error bound,
edge inputs (zero, one token, constants, huge values, NaN / Inf), in-place writes, and that the
eager and static caches store the same bits with it."""

import pytest
import torch

from splitcli.errors import SplitLLMError
from splitcli.quant import KVQuantConfig, QuantizedKVLayer
from splitcli.quant.rtn import dequantize_groupwise, pack_codes, quantize_groupwise, quantize_kv
from splitcli.quant.static_kv import QuantStaticKV

BITS = (2, 3, 4, 8)
SD = (torch.float16, torch.float32)


def _groups(t: torch.Tensor, group: int) -> torch.Tensor:
    return t.double().unflatten(-1, (t.shape[-1] // group, group))


def check_bound(x: torch.Tensor, bits: int, group: int, sd: torch.dtype):
    """Assert every guarantee of `quantize_kv`'s docstring on finite x; return the worst error in steps."""
    q, s, z = quantize_kv(x, bits, group, sd)
    mid, qmax = 2 ** (bits - 1), 2**bits - 1
    assert q.dtype == torch.uint8 and s.dtype == z.dtype == sd and bool(torch.isfinite(s).all())
    g, s64, z64 = _groups(x, group), s.double(), z.double()
    lo, hi = g.amin(-1), g.amax(-1)
    need = torch.maximum((z64 - lo) / mid, (hi - z64) / (qmax - mid))  # exact in float64 here
    assert bool((s64 >= need).all()) and bool((s64 > 0).all())
    if sd == torch.float16:
        assert bool((s64 >= 2.0**-24).all()) and bool((s64 <= need * (1 + 2.0**-9) + 2.0**-23).all())
    else:
        assert bool((s64 <= need * (1 + 2.0**-19) + 2.0**-125).all())
    exact = (_groups(q, group) - mid) * s64[..., None] + z64[..., None]  # exact in float64
    err = (g - exact).abs()
    assert bool((err <= (0.5 + 2.0**-15) * s64[..., None]).all())
    deq = _groups(dequantize_groupwise(q, s, z, bits, torch.float32), group)  # float32, as attention sees it
    assert bool(((g - deq).abs() <= (0.5 + 2.0**-15) * s64[..., None]
                 + 2.0**-22 * (z64.abs() + qmax * s64)[..., None]).all())
    return float((err / s64[..., None]).max())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sd", SD)
@pytest.mark.parametrize("scale,offset", [(1.0, 0.0), (1e-3, 0.0), (30.0, 5.0), (1e-3, 1000.0), (1e-4, -3.3),
                                          (1e-30, 0.0), (1e-40, 0.0), (300.0, 0.0)])
def test_error_bound_holds(bits, sd, scale, offset):
    # (1e-3, 1000): the fp16 zero's rounding (spacing 0.5 there) dwarfs the range, the step must cover it;
    # 1e-30 and 1e-40 (float32 subnormal): fp16 underflows, the absolute margin keeps the step > 0
    gen = torch.Generator().manual_seed(bits * 31 + int(offset))
    x = torch.randn(2, 1, 3, 7, 64, generator=gen) * scale + offset
    worst = check_bound(x, bits, 64, sd)
    check_bound(x, bits, 16, sd)
    if scale >= 1e-3 and offset == 0.0:
        assert worst > 0.4  # the bound is about tight: some element sits near half a step


def test_error_bound_on_adversarial_groups():
    # each row's values a few float32 ulps around fp16 rounding midpoints and exact ties of the codes
    base = torch.tensor([1.0, 1.0 + 2.0**-11, 1000.25, -65504.0, 2.0**-14, 0.1])
    rows = []
    for b in base.tolist():
        ulp = abs(b) * 2.0**-23 if b else 2.0**-149
        rows.append(torch.tensor([b + k * ulp for k in range(-32, 32)]))
    x = torch.stack(rows)  # [6, 64]
    for bits in BITS:
        for sd in SD:
            check_bound(x, bits, 64, sd)
            check_bound(x, bits, 8, sd)
    ties = torch.arange(256, dtype=torch.float32)  # codes land exactly on the grid or on half steps
    for bits in BITS:
        check_bound(torch.stack([ties, ties + 0.5]), bits, 64, torch.float16)


@pytest.mark.parametrize("sd", SD)
def test_constants_zero_one_token_and_empty_are_exact(sd):
    for value in (0.0, 1.5, -3.0, 6e4 if sd == torch.float16 else 3e38, -2.0**-20):
        x = torch.full((2, 1, 3, 1, 64), value)  # one token
        for bits in BITS:
            q, s, z = quantize_kv(x, bits, 64, sd)
            assert torch.equal(dequantize_groupwise(q, s, z, bits), x), (value, bits)
            assert bool((q == 2 ** (bits - 1)).all())
    q, s, z = quantize_kv(torch.zeros(2, 1, 3, 0, 64), 8, 32, sd)  # no tokens
    assert q.shape == (2, 1, 3, 0, 64) and s.shape == z.shape == (2, 1, 3, 0, 2)


def test_values_past_fp16_are_fine_while_the_group_fits():
    x = torch.tensor([[-7e4, 7e4, 1e5, -1e5, 0.5, 3.0, 8e4, -12.0]])  # zero ~0, step ~790: both fit fp16
    check_bound(x, 8, 8, torch.float16)
    check_bound(x, 4, 4, torch.float16)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("row,lone,lone_bad,sd", [
    (NAN, NAN, True, torch.float16), (INF, INF, True, torch.float16),
    (-INF, -INF, True, torch.float32), (NAN, NAN, True, torch.float32),
    (1e5, 1e5, False, torch.float16),     # a constant 1e5: its fp16 zero overflows; lone, zero and step fit
    (-3e7, 3e7, True, torch.float16),     # range 6e7: the fp16 step overflows; lone: the zero (1.5e7) does
    (-3e38, 3e38, False, torch.float32),  # hi - lo overflows float32; lone: range 3e38 still fits
])
def test_non_finite_or_unrepresentable_groups_dequantize_non_finite(row, lone, lone_bad, sd):
    x = torch.randn(2, 1, 3, 4, 64, generator=torch.Generator().manual_seed(5))
    # the two extremes alternating: linspace(-3e38, 3e38) has no finite value in float32 (its step overflows)
    x[1, 0, 2, 3] = torch.tensor([row, -row]).repeat(32) if abs(row) in (3e7, 3e38) else row
    x[0, 0, 1, 2, 17] = lone
    hit = torch.zeros(2, 1, 3, 4, 2, dtype=torch.bool)  # groups of 32
    hit[1, 0, 2, 3, :] = True
    hit[0, 0, 1, 2, 0] = lone_bad
    for bits in (8, 4):
        q, s, z = quantize_kv(x, bits, 32, sd)
        finite = torch.isfinite(_groups(dequantize_groupwise(q, s, z, bits), 32))  # [..., 2, 32]
        assert torch.equal(~finite.any(-1), hit), (row, bits)  # every value of a hit group, no other group
        # every other group is what it would be without the bad ones: bit-identical and within the bound
        ok = x.masked_fill(hit.repeat_interleave(32, -1), 0.0)
        keep = (~hit).repeat_interleave(32, -1)
        q2, s2, z2 = quantize_kv(ok, bits, 32, sd)
        assert torch.equal(dequantize_groupwise(q, s, z, bits)[keep], dequantize_groupwise(q2, s2, z2, bits)[keep])
        if not lone_bad:
            check_bound(x[0], bits, 32, sd)  # the token holding the lone value quantizes normally


def test_out_writes_in_place_with_the_same_bits():
    x = torch.randn(2, 1, 3, 5, 64, generator=torch.Generator().manual_seed(7)) * 4
    want = quantize_kv(x, 8, 32, torch.float16)
    codes = torch.full((2, 1, 3, 9, 64), 7, dtype=torch.uint8)
    scales, zeros = (torch.full((2, 1, 3, 9, 2), -1.0, dtype=torch.float16) for _ in range(2))
    out = tuple(t.narrow(3, 2, 5) for t in (codes, scales, zeros))  # non-contiguous views, as the cache's
    got = quantize_kv(x, 8, 32, torch.float16, out=out)
    assert all(a is b for a, b in zip(got, out)) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert bool((codes[:, :, :, :2] == 7).all()) and bool((scales[:, :, :, 7:] == -1).all())


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(SplitLLMError, match="float16 or float32"):
        quantize_kv(torch.zeros(1, 8), 8, 8, torch.bfloat16)
    with pytest.raises(SplitLLMError, match="does not divide"):
        quantize_kv(torch.zeros(1, 8), 8, 3)
    with pytest.raises(SplitLLMError, match="unsupported"):
        quantize_kv(torch.zeros(1, 8), 5, 8)


def test_no_host_sync_and_few_ops_per_write():
    cache = QuantStaticKV(1, 3, 64, 8, capacity=8)
    cache.reserve(8, batch=1)
    k, v = torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64)
    cache.write(0, 0, k, v)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        cache.write(0, 1, k, v)
    names = [e.name for e in prof.events()]
    # a host sync on CPU is an item() / bool() read: aten::_local_scalar_dense
    assert "aten::_local_scalar_dense" not in names and "aten::item" not in names
    kv = torch.stack([k, v])
    counts = []
    for fn in (lambda: quantize_kv(kv, 8, 64, torch.float16), lambda: quantize_groupwise(kv, 8, 64, torch.float16)):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        counts.append(len([e for e in prof.events() if e.cpu_parent is None]))
    # 23 top-level aten calls (14 of them compute, the rest views and allocations) against the float64
    # weight quantizer's 49, which also syncs; the bound pins "few ops" without pinning the count exactly
    assert counts[0] <= 25 and counts[0] < counts[1] / 1.5, counts


def test_pack_without_range_check_is_the_same_bytes():
    q = torch.randint(0, 16, (2, 3, 5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(pack_codes(q, 4, check_range=False), pack_codes(q, 4))


@pytest.mark.parametrize("bits,group,sd", [(8, None, "float16"), (4, None, "float16"), (8, 16, "float32"),
                                           (3, 8, "float16"), (2, None, "float32")])
def test_eager_and_static_caches_store_the_same_bits(bits, group, sd):
    cfg = KVQuantConfig(bits=bits, group_size=group, scale_dtype=sd)
    eager, static = QuantizedKVLayer(cfg), QuantStaticKV(1, 3, 64, bits, capacity=4, cfg=cfg)
    gen = torch.Generator().manual_seed(bits)
    start = 0
    for t in (5, 1, 1, 1):  # a prefill, then decode steps (the static cache grows past its capacity)
        k, v = torch.randn(1, 3, t, 64, generator=gen) * 3, torch.randn(1, 3, t, 64, generator=gen)
        static.reserve(start + t, batch=1)
        ke, ve = eager.update(k, v)
        ks, vs = static.write(0, start, k, v)
        static.length = start = start + t
        assert torch.equal(ke, ks) and torch.equal(ve, vs)
    for held, name in zip(eager._kv.tensors(), ("codes", "scales", "zeros")):
        assert torch.equal(held, getattr(static, name)[0].narrow(3, 0, start)), name


def test_nan_gets_a_code_in_range_and_inputs_with_grad_are_detached():
    # a NaN's code must stay within its bits: a packed code past qmax would spill into the next group
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(11))
    x[0, 1] = NAN
    for bits in (3, 4):
        q, s, z = quantize_kv(x, bits, 4, torch.float16)
        assert int(q.max()) <= 2**bits - 1 and q[0, 1] == 0
        assert not torch.isfinite(dequantize_groupwise(q, s, z, bits)[0, :4]).any()
        assert torch.isfinite(dequantize_groupwise(q, s, z, bits)[0, 4:]).all()
    # the cache is pluggable into transformers, which may run with autograd on: no graph is kept,
    # also after the first call happened under inference_mode
    with torch.inference_mode():
        quantize_kv(torch.randn(1, 8), 8, 8, torch.float16)
    w = torch.randn(1, 8, requires_grad=True)
    q, s, z = quantize_kv(w * 2, 8, 8, torch.float16)
    assert not (s.requires_grad or z.requires_grad or q.requires_grad)
