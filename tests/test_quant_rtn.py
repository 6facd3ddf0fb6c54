import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitcli.errors import SplitLLMError
from splitcli.quant.rtn import (
    dequantize_groupwise,
    pack_codes,
    packed_width,
    quantize_groupwise,
    unpack_codes,
    valid_group_sizes,
)

BITS = (2, 3, 4, 8)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(BITS), rows=st.integers(0, 4), n=st.integers(0, 37), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (rows, n), generator=g).to(torch.uint8)
    p = pack_codes(q, bits)
    assert p.dtype == torch.uint8
    assert p.shape == (rows, packed_width(n, bits))
    assert torch.equal(unpack_codes(p, bits, n), q)


def test_packed_width_values():
    # hand-computed: 2-bit 4/byte, 3-bit 8 per 3 bytes, 4-bit 2/byte, 8-bit 1/byte
    assert [packed_width(64, b) for b in BITS] == [16, 24, 32, 64]
    assert packed_width(9, 3) == 6 and packed_width(1, 2) == 1 and packed_width(0, 4) == 0


def test_pack_layout_pinned():
    # little-endian within a chunk: first code in the lowest bits
    assert pack_codes(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21]]
    assert pack_codes(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[0b00111001]]
    q3 = torch.tensor([[7, 0, 0, 0, 0, 0, 0, 5]], dtype=torch.uint8)  # 7 | 5 << 21
    word = 7 | (5 << 21)
    assert pack_codes(q3, 3).tolist() == [[word & 255, (word >> 8) & 255, word >> 16]]


def test_pack_rejects_out_of_range():
    with pytest.raises(SplitLLMError):
        pack_codes(torch.tensor([[4]], dtype=torch.uint8), 2)


@settings(max_examples=30, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    scale=st.sampled_from([1e-3, 1.0, 100.0]),
    offset=st.sampled_from([0.0, 3.0]),
    seed=st.integers(0, 2**31),
)
def test_error_at_most_half_step(bits, dtype, scale, offset, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 48, generator=g) * scale + offset
    q, s, z = quantize_groupwise(w, bits, 16, dtype)
    assert q.dtype == torch.uint8 and int(q.max()) < 2**bits
    assert s.dtype == dtype and z.shape == (5, 3)
    # float64 dequantization isolates the quantizer's error from float32 output rounding
    w_hat = dequantize_groupwise(q, s, z, bits, torch.float64)
    err = (w.double() - w_hat).abs().reshape(5, 3, 16)
    half = s.double().unsqueeze(-1) / 2
    assert bool((err <= half * (1 + 1e-9)).all())


def test_hand_computed_two_bit():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    q, s, z = quantize_groupwise(w, 2, 4)
    # step 1, middle code 2 stands for 2.0
    assert q.tolist() == [[0, 1, 2, 3]] and s.tolist() == [[1.0]] and z.tolist() == [[2.0]]
    assert torch.equal(dequantize_groupwise(q, s, z, 2), w)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("value", [0.0, 1.0, -2.5, 2.0**100, 1e30, 0.1])
def test_constant_groups_exact(bits, value):
    w = torch.full((3, 8), value)
    # bf16 scales reproduce a constant exactly only when bf16 holds it
    exact_bf16 = float(torch.tensor(value).bfloat16()) == float(torch.tensor(value))
    for dtype in (torch.float32, torch.bfloat16) if exact_bf16 else (torch.float32,):
        q, s, z = quantize_groupwise(w, bits, 4, dtype)
        assert torch.equal(dequantize_groupwise(q, s, z, bits), w)


def test_constant_not_representable_in_bf16_is_close():
    w = torch.full((1, 4), 0.1)
    q, s, z = quantize_groupwise(w, 4, 4, torch.bfloat16)
    assert float((dequantize_groupwise(q, s, z, 4) - w).abs().max()) <= float(s.float().max()) / 2


def test_empty_rows():
    q, s, z = quantize_groupwise(torch.zeros(0, 8), 4, 4)
    assert q.shape == (0, 8) and s.shape == (0, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rejected(bad):
    w = torch.zeros(2, 8)
    w[1, 3] = bad
    with pytest.raises(SplitLLMError, match="NaN or Inf"):
        quantize_groupwise(w, 4, 4)


def test_bad_group_size_message():
    with pytest.raises(SplitLLMError) as e:
        quantize_groupwise(torch.zeros(2, 576), 4, 128)
    msg = str(e.value)
    assert "576" in msg and "128" in msg and "64" in msg and "\n" not in msg
    assert e.value.exit_code == 2
    assert valid_group_sizes(12) == [1, 2, 3, 4, 6, 12]
    with pytest.raises(SplitLLMError):
        quantize_groupwise(torch.zeros(2, 8), 4, 0)


@pytest.mark.parametrize("bits", [1, 5, 16, 32])
def test_bad_bits(bits):
    with pytest.raises(SplitLLMError):
        quantize_groupwise(torch.zeros(2, 8), bits, 4)


def test_huge_range():
    w = torch.tensor([[-3e38, 3e38, 0.0, 1.0]])
    with pytest.raises(SplitLLMError, match="too large"):
        quantize_groupwise(w, 4, 4, torch.float16)
    q, s, z = quantize_groupwise(w, 8, 4, torch.float32)
    w_hat = dequantize_groupwise(q, s, z, 8, torch.float64)
    assert float((w.double() - w_hat).abs().max()) <= float(s) / 2 * (1 + 1e-6)


@pytest.mark.parametrize("bits,group", [(8, 32), (4, 32), (4, 8), (3, 16)])
def test_dequantize_into_out_is_the_same_values(bits, group):
    from splitcli.quant.rtn import dequantize_groupwise, quantize_groupwise

    w = torch.randn(2, 3, 7, 32, generator=torch.Generator().manual_seed(bits + group)) * 3
    q, s, z = quantize_groupwise(w, bits, group, torch.float16)
    want = dequantize_groupwise(q, s, z, bits)
    scratch = torch.full((2, 3, 9, 32), float("nan"))
    view = scratch[:, :, :7]  # a non-contiguous view, as the static KV cache's scratch prefix is
    got = dequantize_groupwise(q, s, z, bits, out=view)
    assert got is view and torch.equal(got, want)
    assert bool(scratch[:, :, 7:].isnan().all())  # nothing written past the view
    assert torch.equal(dequantize_groupwise(q, s, z, bits, torch.float64),
                       dequantize_groupwise(q, s, z, bits, torch.float64, out=torch.empty(2, 3, 7, 32, dtype=torch.float64)))


def test_every_static_cache_checks_its_capacity_and_counts_its_bytes():
    from splitcli.model.fast import StaticKV
    from splitcli.quant.static_kv import QuantStaticKV

    for make in (lambda c: StaticKV(2, 3, 32, capacity=c), lambda c: QuantStaticKV(2, 3, 32, 8, capacity=c)):
        with pytest.raises(SplitLLMError, match="capacity >= 1, got 0"):
            make(0)
        cache = make(4)
        assert cache.nbytes() == 0 and cache.capacity == 4
        cache.reserve(6, batch=1)
        assert cache.capacity == 6
    assert StaticKV(2, 3, 32).capacity == QuantStaticKV(2, 3, 32, 4).capacity == 256
    fp, q8 = StaticKV(2, 3, 32, capacity=5), QuantStaticKV(2, 3, 32, 8, capacity=5)
    fp.reserve(5, 1)
    q8.reserve(5, 1)
    assert fp.nbytes() == 2 * 2 * 3 * 5 * 32 * 4  # layers x (K, V) x kv heads x positions x D x float32
    assert q8.nbytes() == 2 * 2 * 3 * 5 * (32 + 2 * 2)  # 8-bit codes + fp16 scale and zero per head
