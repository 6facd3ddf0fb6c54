"""quant/kernels: splitllm's AVX2 4-bit kernel. Its layout round-trips exactly and is the same
bytes on every CPU; its product equals the float product of the dequantized weight within the
int16 input's bound (one token) or to float rounding (a prefill); zero, empty, NaN, inf and huge
inputs behave as a float product would; where it cannot run, Int4Linear stays on torch's kernel
and says why."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from splitcli.quant import kernels
from splitcli.quant.modules import Int4Linear
from splitcli.quant.rtn import dequantize_groupwise, quantize_groupwise

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the kernels are chosen up to 1-2 threads

needs_kernel = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.why_unavailable()}")


def _weights(n: int, k: int, g: int, seed: int = 0):
    torch.manual_seed(seed)
    q, s, z = quantize_groupwise(torch.randn(n, k), 4, g, torch.bfloat16)
    w = dequantize_groupwise(q, s, z, 4)  # [N, K] the float weight the codes stand for
    return kernels.pack4(q), kernels.block_pairs4(torch.stack([s, z], -1)), w, q


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|x| @ |w|.T: the scale a product's rounding is measured against (no cancellation hides it)."""
    return x.double().abs() @ w.double().abs().t()


def test_pack_round_trips_and_lays_each_run_out_as_documented():
    q = torch.randint(0, 16, (5, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    packed = kernels.pack4(q)
    assert packed.shape == (5, 128) and packed.dtype == torch.uint8
    assert torch.equal(kernels.unpack4(packed), q)
    # a run is 16 little-endian words; word w holds codes w, 16 + w, 32 + w, 48 + w in nibbles 0..3
    b = packed[0, 32:64].tolist()  # row 0's second run: codes 64..127
    for w in range(16):
        word = b[2 * w] | b[2 * w + 1] << 8
        assert [word >> (4 * i) & 15 for i in range(4)] == [int(q[0, 64 + 16 * i + w]) for i in range(4)]


def test_pairs_block_in_fours_and_round_trip():
    from splitcli.errors import SplitLLMError

    sz = torch.randn(8, 3, 2).to(torch.bfloat16)  # [N, groups, (scale, zero)]
    blocked = kernels.block_pairs4(sz)
    assert blocked.shape == (2, 3, 4, 2) and blocked.is_contiguous()
    assert torch.equal(blocked[1, 2, 3], sz[7, 2]) and torch.equal(blocked[0, 1, 2], sz[2, 1])
    assert torch.equal(kernels.unblock_pairs4(blocked), sz)
    with pytest.raises(SplitLLMError, match="N % 4 == 0"):
        kernels.block_pairs4(sz[:6])


@pytest.mark.parametrize("group", [64, 128, 256])
def test_supported_groups_are_whole_runs(group):
    assert kernels.supports4(512, group)
    assert not kernels.supports4(512, 32) and not kernels.supports4(96, 64) and not kernels.supports4(512, 0)


@needs_kernel
@pytest.mark.parametrize("group", [64, 128, 256])
@pytest.mark.parametrize("n", [4, 8, 12, 20])
def test_one_token_product_is_within_the_int16_bound_of_the_float_one(group, n):
    packed, sz, w, _ = _weights(n, 768, group)
    for m in range(1, kernels.GEMV_MAX_TOKENS + 1):
        x = torch.randn(m, 768)
        y = kernels.mm4(x, packed, sz, group)  # [M, N]
        assert y.shape == (m, n) and y.dtype == torch.float32
        err = (y.double() - x.double() @ w.double().t()).abs() / _bound(x, w)
        assert float(err.max()) < 2e-5  # int16 input: <= 2^-16 of each group's largest |x|, plus fp32 sums


@needs_kernel
def test_a_tokens_row_does_not_depend_on_the_others_in_the_call_or_on_row_pairing():
    packed, sz, w, _ = _weights(12, 512, 64)
    x = torch.randn(kernels.GEMV_MAX_TOKENS, 512)
    together = kernels.mm4(x, packed, sz, 64)
    alone = torch.cat([kernels.mm4(x[i : i + 1], packed, sz, 64) for i in range(x.shape[0])])
    assert torch.equal(together, alone)
    # rows run in blocks of four; a block on its own gives the same rows
    rows = torch.cat([kernels.mm4(x, packed[4 * i : 4 * i + 4].contiguous(), sz[i : i + 1].contiguous(), 64)
                      for i in range(3)], 1)
    assert torch.equal(rows, together)


@needs_kernel
@pytest.mark.parametrize("group", [64, 128, 256])
def test_a_prefill_is_the_float_product_of_the_dequantized_weight(group):
    packed, sz, w, _ = _weights(1100, 256, group)
    x = torch.randn(40, 256)
    y = kernels.mm4(x, packed, sz, group)
    assert float(((y.double() - x.double() @ w.double().t()).abs() / _bound(x, w)).max()) < 1e-6


@needs_kernel
@pytest.mark.parametrize("group", [64, 256])
def test_a_prefill_over_several_chunks_of_rows(monkeypatch, group):
    # 3 rows a chunk: 7 chunks, the last short, most starting inside a block of four rows
    monkeypatch.setattr(kernels, "_CHUNK_BYTES", 3 * 256 * 4)
    packed, sz, w, _ = _weights(20, 256, group)
    x = torch.randn(12, 256)
    ref = x @ w.t()
    assert torch.allclose(kernels.mm4(x, packed, sz, group), ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def _same_nonfinite(a: torch.Tensor, b: torch.Tensor) -> bool:
    """NaN where b is NaN, the same infinities (sign included) where b has them."""
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.isinf() & (a > 0), b.isinf() & (b > 0)) \
        and torch.equal(a.isinf() & (a < 0), b.isinf() & (b < 0))


def _extremes(k: int) -> torch.Tensor:
    """Tokens [8, K]: NaN, +inf, -inf, finite values whose float32 sum overflows, huge, tiny,
    subnormal, and an ordinary one (each must come out as the float product would have it)."""
    torch.manual_seed(5)
    x = torch.randn(8, k)
    x[0, 5] = float("nan")
    x[1, 70 % k] = float("inf")
    x[2, 3] = float("-inf")
    x[3] = 1e37  # the group's float32 sum overflows; the product of the dequantized weight does not
    x[4] *= 3e37
    x[5] *= 1e-36
    x[6] *= 1e-41  # subnormal
    return x


@needs_kernel
def test_zero_empty_constant_and_extreme_inputs_match_the_float_product():
    packed, sz, w, _ = _weights(8, 128, 64)
    assert kernels.mm4(torch.empty(0, 128), packed, sz, 64).shape == (0, 8)
    assert torch.equal(kernels.mm4(torch.zeros(1, 128), packed, sz, 64), torch.zeros(1, 8))
    c = torch.full((1, 128), 0.75)
    assert torch.allclose(kernels.mm4(c, packed, sz, 64), c @ w.t(), rtol=1e-5, atol=1e-5)
    x = _extremes(128)
    y = kernels.mm4(x, packed, sz, 64)  # 8 tokens: the one-token kernel, the extremes left to float
    # the float product a token at a time (near 3.4e38 whether a sum overflows depends on its order)
    ref = torch.cat([x[i : i + 1] @ w.t() for i in range(8)])
    assert _same_nonfinite(y, ref)
    finite = torch.isfinite(ref)
    rel = (y - ref).abs()[finite] / (x.abs() @ w.abs().t())[finite]
    assert float(rel.max()) < 2e-5  # huge, tiny and subnormal tokens included
    assert torch.equal(kernels.mm4(x[7:], packed, sz, 64), y[7:])  # the ordinary token, alone: the same
    m, w8 = _int8(6, 128)
    y8 = kernels.mm8(x, m.codes, m.scales)
    ref8 = torch.cat([x[i : i + 1] @ w8.t() for i in range(8)])
    assert _same_nonfinite(y8, ref8)
    finite = torch.isfinite(ref8)
    assert float(((y8 - ref8).abs()[finite] / (x.abs() @ w8.abs().t())[finite]).max()) < 2e-5


@needs_kernel
def test_an_input_that_is_not_a_2d_cpu_tensor_is_refused_not_read():
    from splitcli.errors import SplitLLMError

    packed, sz, _, _ = _weights(16, 128, 64)
    m8, _ = _int8(16, 128)
    for x in (torch.randn(1, 128, device="meta"), torch.randn(128), torch.randn(1, 128).to_sparse()):
        with pytest.raises(SplitLLMError, match="2-D strided CPU input"):
            kernels.mm4(x, packed, sz, 64)
        with pytest.raises(SplitLLMError, match="2-D strided CPU input"):
            kernels.mm8(x, m8.codes, m8.scales)
    lin = Int4Linear(128, 16, 64, packed, sz, None, "splitllm")
    with pytest.raises(SplitLLMError):  # the meta input used to reach the C code: a segfault
        lin(torch.randn(1, 128, device="meta"))


@needs_kernel
def test_int4_linear_on_kernels_exports_the_codes_it_was_given_and_matches_its_dequantized_weight():
    torch.manual_seed(1)
    lin = nn.Linear(256, 96)
    m = Int4Linear.from_linear(lin, 64)
    assert m.layout == "splitllm" and "splitllm-avx2" in repr(m)
    q, s, z = quantize_groupwise(lin.weight, 4, 64, torch.bfloat16)
    e = m.export()
    assert torch.equal(e["scales"], s) and torch.equal(e["zeros"], z)
    assert torch.equal(m.dequantized_weight(), dequantize_groupwise(q, s, z, 4))
    x = torch.randn(2, 3, 256)  # [..., K] keeps its leading shape
    y = m(x)
    ref = x @ m.dequantized_weight().t() + lin.bias
    assert y.shape == (2, 3, 96) and torch.allclose(y, ref, rtol=1e-4, atol=1e-4)
    with kernels.disabled():
        t = Int4Linear.from_linear(lin, 64)
    assert t.layout == "torch" and kernels.available()
    assert all(torch.equal(a, b) for a, b in zip(t.export().values(), e.values()))
    assert torch.allclose(t(x), y, rtol=2e-2, atol=2e-2)  # torch's kernel rounds x to bf16
    g32 = Int4Linear.from_linear(nn.Linear(256, 96), 32)
    assert g32.layout == "torch"  # 32-code groups are not whole runs: torch's kernel


_LAYOUT = "from torch import nn; from splitcli.quant.modules import Int4Linear; from splitcli.quant import kernels; " \
          "print(Int4Linear.from_linear(nn.Linear(128, 32), 64).layout, '|', kernels.why_unavailable())"


def _layout_in_subprocess(tmp_path, **env) -> tuple[str, str]:
    full = {**os.environ, "SPLITLLM_CACHE": str(tmp_path / "cache"), **env}
    r = subprocess.run([sys.executable, "-c", _LAYOUT], env=full, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    layout, why = r.stdout.strip().splitlines()[-1].split("|")
    return layout.strip(), why.strip()


def test_where_the_kernel_cannot_run_int4_stays_on_torch_and_says_why(tmp_path):
    assert _layout_in_subprocess(tmp_path, SPLITLLM_CPU_KERNELS="torch") == ("torch", "SPLITLLM_CPU_KERNELS=torch")
    layout, why = _layout_in_subprocess(tmp_path, ATEN_CPU_CAPABILITY="default")
    assert layout == "torch" and "DEFAULT" in why
    if kernels.available():  # a machine that can build it: without a compiler it cannot
        layout, why = _layout_in_subprocess(tmp_path, CC=str(tmp_path / "no-such-cc"))
        assert layout == "torch" and "could not build" in why
        assert not list((tmp_path / "cache" / "kernels").glob("*.tmp"))  # no half-built file left
        layout, why = _layout_in_subprocess(tmp_path, CC="env cc")  # then with one (a command line): built, used
        assert (layout, why) == ("splitllm", "")
        built = list((tmp_path / "cache" / "kernels").glob("kernels-*.so"))
        assert len(built) == 1
        built[0].write_bytes(built[0].read_bytes()[:100])  # damaged: built again, not given up on
        assert _layout_in_subprocess(tmp_path) == ("splitllm", "")
        assert built[0].stat().st_size > 1000
        # a loadable file of another ABI under the name: rebuilt, and the new build is what loads
        # (dlopen would hand back the old object for the same name)
        foreign = tmp_path / "foreign.c"
        foreign.write_text("int splitllm_abi(void) { return 1; }\n")
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(built[0]), str(foreign)], check=True, timeout=120)
        assert _layout_in_subprocess(tmp_path) == ("splitllm", "")
        assert not list((tmp_path / "cache" / "kernels").glob("*.load"))


def test_the_kernels_run_wherever_they_should():
    """A build that breaks must fail the suite, not turn every kernel test into a skip."""
    import platform
    import shutil

    expected = (platform.machine().lower() in ("x86_64", "amd64")
                and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                and (shutil.which("cc") or shutil.which("gcc")) is not None
                and os.environ.get(kernels.KERNEL_ENV, "").lower() != "torch")
    if not expected:
        pytest.skip("no AVX2 dispatch or no C compiler here: torch's kernels are the expected ones")
    assert kernels.available(), kernels.why_unavailable()


def test_operands_that_do_not_fit_never_reach_the_c_code():
    from splitcli.errors import SplitLLMError

    packed, sz, _, _ = _weights(16, 128, 64)
    for bad_packed, bad_sz, k in [
        (packed[:, :32], sz, 128),  # too few bytes per row
        (packed, sz[:, :1], 128),  # too few groups
        (packed, sz[:3], 128),  # rows disagree
        (packed, kernels.unblock_pairs4(sz).contiguous(), 128),  # pairs not in blocks of four rows
        (packed[:14], sz, 128),  # rows not a multiple of four
        (packed, sz.float(), 128),  # wrong dtype
        (packed.t().contiguous().t(), sz, 128),  # not contiguous
        (packed, sz, 256),  # another input width
    ]:
        with pytest.raises(SplitLLMError, match="4-bit kernel operands do not fit"):
            kernels.check_operands4(k, bad_packed, bad_sz, 64)
        if kernels.available():
            with pytest.raises(SplitLLMError):
                kernels.mm4(torch.randn(1, k), bad_packed, bad_sz, 64)
    with pytest.raises(SplitLLMError):  # at construction too
        Int4Linear(128, 16, 64, packed, sz[:, :1].contiguous(), None, "splitllm")
    with pytest.raises(SplitLLMError, match="packed rows"):
        Int4Linear(128, 32, 64, packed, sz, None, "splitllm")
    assert Int4Linear(128, 16, 64, packed, sz, None, "splitllm").layout == "splitllm"  # the fitting ones pass


def _int8(n: int, k: int, seed: int = 0):
    from splitcli.quant.modules import Int8Linear

    torch.manual_seed(seed)
    m = Int8Linear.from_linear(nn.Linear(k, n, bias=False))
    return m, m.dequantized_weight()  # [N, K]


@needs_kernel
@pytest.mark.parametrize("n", [1, 2, 3, 64])
def test_8bit_one_token_product_is_within_the_int16_bound_and_int8linear_uses_it(n):
    m, w = _int8(n, 192)
    assert m.gemv and "splitllm-avx2" in repr(m)
    for tokens in range(1, kernels.GEMV_MAX_TOKENS + 1):
        x = torch.randn(tokens, 192)
        y = kernels.mm8(x, m.codes, m.scales)
        assert float(((y.double() - x.double() @ w.double().t()).abs() / _bound(x, w)).max()) < 2e-5
        assert torch.equal(m(x), y)  # the module's own call runs it
    # more tokens: torch's int8 kernel (bf16 input), within its rounding
    x = torch.randn(kernels.GEMV_MAX_TOKENS + 1, 192)
    assert float(((m(x).double() - x.double() @ w.double().t()).abs() / _bound(x, w)).max()) < 1e-2
    with kernels.disabled():
        assert not _int8(n, 192)[0].gemv


@needs_kernel
def test_8bit_zero_empty_nan_inf_and_rows_alone():
    m, w = _int8(5, 128)
    assert kernels.mm8(torch.empty(0, 128), m.codes, m.scales).shape == (0, 5)
    assert torch.equal(kernels.mm8(torch.zeros(1, 128), m.codes, m.scales), torch.zeros(1, 5))
    x = torch.randn(3, 128)
    x[0, 3], x[1, 100] = float("nan"), float("-inf")
    y = kernels.mm8(x, m.codes, m.scales)
    assert bool(torch.isnan(y[0]).all()) and not bool(torch.isfinite(y[1]).any())
    assert torch.allclose(y[2], x[2] @ w.t(), rtol=1e-4, atol=1e-4)
    rows = torch.cat([kernels.mm8(x[2:], m.codes[i : i + 1], m.scales[i : i + 1]) for i in range(5)], 1)
    assert torch.equal(rows, y[2:])  # rows two at a time or alone: the same arithmetic


def test_8bit_operands_that_do_not_fit_never_reach_the_c_code():
    from splitcli.errors import SplitLLMError

    m, _ = _int8(4, 128)
    for x, codes, scales in [
        (torch.randn(1, 96), m.codes[:, :96].contiguous(), m.scales),  # width not whole groups of 64
        (torch.randn(1, 128), m.codes[:, :64], m.scales),  # widths disagree
        (torch.randn(1, 128), m.codes, m.scales[:3]),  # rows disagree
        (torch.randn(1, 128), m.codes.to(torch.int16), m.scales),  # wrong dtype
        (torch.randn(kernels.GEMV_MAX_TOKENS + 1, 128), m.codes, m.scales),  # too many tokens
    ]:
        with pytest.raises(SplitLLMError, match="8-bit kernel operands do not fit"):
            kernels.mm8(x, codes, scales)


@needs_kernel
@pytest.mark.parametrize("group", [8, 16, 64])
def test_kv8_prefix_dequantization_is_bit_for_bit_torchs(group):
    from splitcli.quant.rtn import quantize_kv

    torch.manual_seed(2)
    cap, t, d = 40, 33, 64
    x = torch.randn(2, 1, 3, cap, d) * torch.logspace(-6, 4, cap)[:, None]  # many magnitudes
    x[0, 0, 1, 7, :group] = 3.0  # a constant group
    q, s, z = quantize_kv(x, 8, group, torch.float16)  # [2, 1, 3, cap, D], [.., cap, D/G] x 2
    s[1, 0, 2, 5, 0], z[1, 0, 2, 6, 0] = float("inf"), float("nan")  # non-finite groups dequantize as torch's do
    views = [a.narrow(3, 0, t) for a in (q, s, z)]  # prefix views, as the cache hands them over
    full = torch.full((2, 1, 3, cap, d), -7.0)
    out = full.narrow(3, 0, t)
    ref = dequantize_groupwise(*views, 8, torch.float32, out=torch.empty(2, 1, 3, t, d))
    assert kernels.kv8_dequantize(*views, out)
    assert torch.equal(out.nan_to_num(1.5), ref.nan_to_num(1.5)) and torch.equal(out.isnan(), ref.isnan())
    assert bool((full[..., t:, :] == -7.0).all())  # nothing past the prefix written
    # what it does not take is left to torch: float32 scales, a group that is not whole vectors
    assert not kernels.kv8_dequantize(views[0], views[1].float(), views[2].float(), out)
    assert not kernels.kv8_dequantize(views[0][..., :60], views[1], views[2], out[..., :60])
    empty = torch.zeros(2, 1, 0, dtype=torch.uint8)  # no values: declined, never divided by (SIGFPE)
    assert not kernels.kv8_dequantize(empty, torch.ones(2, 1, 1, dtype=torch.float16),
                                      torch.ones(2, 1, 1, dtype=torch.float16), torch.empty(2, 1, 0))


@needs_kernel
def test_tokens_left_to_the_float_path_do_not_depend_on_each_other():
    packed, sz, w, _ = _weights(8, 128, 64)
    m8, _ = _int8(6, 128)
    x = torch.randn(8, 128) * 1e36  # every token past 1e30: all eight fall back
    x[3, 0] = float("nan")
    for full, one in [(kernels.mm4(x, packed, sz, 64), lambda i: kernels.mm4(x[i : i + 1], packed, sz, 64)),
                      (kernels.mm8(x, m8.codes, m8.scales), lambda i: kernels.mm8(x[i : i + 1], m8.codes, m8.scales))]:
        alone = torch.cat([one(i) for i in range(8)])
        assert torch.equal(full.nan_to_num(0.5), alone.nan_to_num(0.5))


def test_a_splitllm_layout_module_where_the_kernels_cannot_run_is_a_one_line_error(monkeypatch):
    from splitcli.errors import SplitLLMError

    packed, sz, _, _ = _weights(16, 128, 64)
    lin = Int4Linear(128, 16, 64, packed, sz, None, "splitllm")  # e.g. unpickled on another machine
    monkeypatch.setitem(kernels._state, "lib", None)
    monkeypatch.setitem(kernels._state, "why", "not an x86-64 CPU (aarch64)")
    with pytest.raises(SplitLLMError, match=r"not available here: not an x86-64 CPU \(aarch64\)"):
        lin(torch.randn(1, 128))



@needs_kernel
def test_the_thread_count_chooses_between_splitllms_kernels_and_torchs():
    m8, _ = _int8(16, 128)
    x = torch.randn(1, 128)
    alone = kernels.mm8(x, m8.codes, m8.scales)
    assert torch.equal(m8(x), alone)  # one thread: splitllm's int8 kernel
    torch.set_num_threads(2)  # the fixture restores it
    assert torch.equal(m8(x), alone)  # two: still splitllm's (the C decode step runs it there)
    torch.set_num_threads(3)
    assert not torch.equal(m8(x), alone)  # three: torch's (bf16 input)
    assert torch.allclose(m8(x), alone, rtol=2e-2, atol=2e-2)
    torch.set_num_threads(2)
    assert Int4Linear.from_linear(nn.Linear(128, 16), 64).layout == "splitllm"  # int4: up to 2 threads
    torch.set_num_threads(3)
    assert Int4Linear.from_linear(nn.Linear(128, 16), 64).layout == "torch"


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 1152, 576), (2, 576, 576), (8, 16, 5), (3, 8, 1), (1, 64, 7), (2, 64, 11)])
def test_fp16_weight_product_is_the_float_product_of_the_half_weight(m, k, n):
    # float32 products and sums of the exact half values: as close as float32 sums of k terms get
    x, w, b = torch.randn(m, k), torch.randn(n, k).half(), torch.randn(n)
    ref = x.double() @ w.double().t()
    bound = 1e-6 * (x.double().abs() @ w.double().abs().t()) * k ** 0.5 + 1e-6
    assert bool(((kernels.mm16(x, w).double() - ref).abs() <= bound).all())
    assert bool(((kernels.mm16(x, w, b).double() - ref - b.double()).abs() <= bound + 1e-6 * b.double().abs()).all())
    rows = torch.cat([kernels.mm16(x[i : i + 1], w, b) for i in range(m)])
    assert torch.equal(rows, kernels.mm16(x, w, b))  # a row alone or among others: the same arithmetic
    cols = torch.cat([kernels.mm16(x, w[j : j + 1], b[j : j + 1]) for j in range(n)], 1)
    assert torch.equal(cols, kernels.mm16(x, w, b))  # and whichever block of four rows of W holds it


@needs_kernel
def test_fp16_weight_product_of_zero_empty_nan_and_inf_inputs():
    w = torch.randn(5, 16).half()
    assert kernels.mm16(torch.empty(0, 16), w).shape == (0, 5)
    assert torch.equal(kernels.mm16(torch.zeros(1, 16), w), torch.zeros(1, 5))
    x = torch.randn(3, 16)
    x[0, 3], x[1, 10] = float("nan"), float("inf")
    y = kernels.mm16(x, w)
    assert bool(torch.isnan(y[0]).all()) and not bool(torch.isfinite(y[1]).any())
    assert torch.allclose(y[2], x[2] @ w.float().t(), rtol=1e-5, atol=1e-5)


def test_fp16_operands_that_do_not_fit_never_reach_the_c_code():
    from splitcli.errors import SplitLLMError

    w = torch.randn(4, 16).half()
    for x, weight, bias in [
        (torch.randn(1, 12), w[:, :12].contiguous(), None),  # width not whole runs of 8
        (torch.randn(1, 16), w[:, :8], None),  # widths disagree
        (torch.randn(1, 16), w.float(), None),  # not half
        (torch.randn(1, 16), w.t().contiguous().t(), None),  # not contiguous
        (torch.randn(1, 16), w, torch.randn(3)),  # bias of another length
        (torch.randn(1, 16), w, torch.randn(4).double()),  # bias not float32
        (torch.randn(kernels.GEMV_MAX_TOKENS + 1, 16), w, None),  # too many rows
    ]:
        with pytest.raises(SplitLLMError, match="fp16 kernel operands do not fit"):
            kernels.mm16(x, weight, bias)
