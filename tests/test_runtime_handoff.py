"""Edge-local generation and the handoff: the KV payload format, and I_kv = 0 == I_kv = 1 == no handoff."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
import torch

from splitcli.errors import SplitLLMError
from splitcli.model.split import EdgeHalf, decoder_parts
from splitcli.runtime.generate import SamplingConfig, generate
from splitcli.runtime.handoff import (
    HandoffSession, KVLayout, KVRows, cache_rows, decode_kv, encode_kv, handoff_generate, install_rows,
    kv_layout, kv_payload_bytes, kv_rows_bytes,
)
from splitcli.runtime.link import EmulatedLink, LinkWire, parse_link
from splitcli.runtime.session import UnsplitSession
from splitcli.runtime.wire import RawWire

sys.path.insert(0, str(Path(__file__).parent))
from conftest import _tiny  # noqa: E402

LAYOUT = KVLayout(range(2, 4), batch=2, heads=3, d_k=4, d_v=4, max_tokens=64)


def _rows(n=5, layers=(2, 3), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [KVRows(k, torch.randn(2, 3, n, 4, generator=g).to(dtype), torch.randn(2, 3, n, 4, generator=g).to(dtype))
            for k in layers]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kv_payload_round_trips_exactly(dtype):
    rows = _rows(dtype=dtype)
    payload = encode_kv(rows, start=7, count=5)
    assert len(payload) == kv_payload_bytes(LAYOUT, 5, rows[0].keys.element_size()) == kv_rows_bytes(
        rows, rows[0].keys.element_size())
    got = decode_kv(payload, LAYOUT)
    assert (got.start, got.count) == (7, 5)
    for a, b in zip(rows, got.layers):
        assert a.layer == b.layer and b.keys.dtype == dtype
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_kv_payload_can_travel_in_half_precision():
    rows = _rows()
    got = decode_kv(encode_kv(rows, 0, 5, torch.float16), LAYOUT)
    assert got.layers[0].keys.dtype == torch.float16
    assert torch.allclose(got.layers[0].keys.float(), rows[0].keys, atol=1e-2)


def test_truncated_and_oversized_payloads_are_refused():
    payload = encode_kv(_rows(), 0, 5)
    for cut in (0, 3, 20, 40, len(payload) // 2, len(payload) - 1):
        with pytest.raises(SplitLLMError):
            decode_kv(payload[:cut], LAYOUT)
    with pytest.raises(SplitLLMError, match="does not match its header"):
        decode_kv(payload + b"\0", LAYOUT)
    corrupted = bytearray(payload)
    corrupted[60] ^= 1
    with pytest.raises(SplitLLMError, match="checksum"):
        decode_kv(bytes(corrupted), LAYOUT)
    with pytest.raises(SplitLLMError, match="not a KV payload"):
        decode_kv(b"XXXX" + payload[4:], LAYOUT)


@pytest.mark.parametrize("layout, words", [
    (KVLayout(range(2, 4), 2, 2, 4, 4, 64), "this cache holds"),      # other head count
    (KVLayout(range(2, 4), 1, 3, 4, 4, 64), "this cache holds"),      # other batch
    (KVLayout(range(2, 4), 2, 3, 8, 8, 64), "this cache holds"),      # other head_dim
    (KVLayout(range(0, 3), 2, 3, 4, 4, 64), "outside"),               # layer 3 not taken here
    (KVLayout(range(3, 4), 2, 3, 4, 4, 64), "layers"),                # one layer only
    (KVLayout(range(2, 4), 2, 3, 4, 4, 4), "beyond"),                 # more positions than allowed
])
def test_wrong_shape_payloads_are_refused(layout, words):
    with pytest.raises(SplitLLMError, match=words):
        decode_kv(encode_kv(_rows(), 0, 5), layout)


def test_header_claiming_huge_sizes_is_refused_before_allocating():
    # a 44-byte payload whose header claims 2^31 rows per layer: rejected on its length alone
    header = struct.pack("<4sBBHIIIIII", b"SKVC", 1, 0, 1, 2, 3, 4, 4, 0, 2**31)
    forged = header + struct.pack("<HI", 2, 2**31) + b"\0" * 4
    big = KVLayout(range(2, 4), 2, 3, 4, 4, 2**32 - 1)
    with pytest.raises(SplitLLMError, match="does not match its header"):
        decode_kv(forged, big)
    rows_over = header[:-8] + struct.pack("<II", 0, 4) + struct.pack("<HI", 2, 5) + b"\0" * 4
    with pytest.raises(SplitLLMError, match="over 4 rows"):
        decode_kv(rows_over, big)


def test_encode_rejects_mixed_shapes_and_order():
    rows = _rows()
    with pytest.raises(SplitLLMError, match="shape"):
        encode_kv([rows[0], KVRows(3, torch.zeros(2, 3, 5, 8), torch.zeros(2, 3, 5, 8))], 0, 5)
    with pytest.raises(SplitLLMError, match="ascend"):
        encode_kv(rows[::-1], 0, 5)
    with pytest.raises(SplitLLMError, match="at least one"):
        encode_kv([], 0, 0)


def test_cache_rows_and_install_check_positions_and_cache_kinds():
    from splitcli.quant import KVQuantConfig, QuantizedKVCache

    model = _tiny("llama")
    parts = decoder_parts(model)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    u = UnsplitSession(model)
    u.prefill(ids)
    length, rows = cache_rows(u.cache, range(1, 3), 2)
    assert length == 6 and rows[0].keys.shape[2] == 4
    payload = decode_kv(encode_kv(rows, 2, 4), kv_layout(parts, range(1, 3), 1))
    with pytest.raises(SplitLLMError, match="start at position 2"):
        install_rows(UnsplitSession(model).cache, payload, torch.float32)
    quantized = QuantizedKVCache(KVQuantConfig(bits=8))
    quantized.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    with pytest.raises(SplitLLMError, match="does not expose"):
        cache_rows(quantized, range(1), 0)


CFG = SamplingConfig(max_new_tokens=20)


def _prompt(batch=1, length=10, seed=1):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_handoff_output_equals_no_handoff(tiny_model):
    """Compression off, fp32 edge: I_kv = 0 == I_kv = 1 == no handoff, at every ℓ, before and after
    the sliding window (8) fills."""
    ids = _prompt()
    reference = generate(UnsplitSession(tiny_model), ids, None, CFG).tokens
    n = decoder_parts(tiny_model).num_layers
    for ell in range(1, n):
        for w in (1, 6):
            for i_kv in (0, 1):
                got = handoff_generate(HandoffSession(tiny_model, ell), ids, None, CFG, local_tokens=w, i_kv=i_kv)
                assert torch.equal(got.tokens, reference), f"ℓ={ell} w={w} I_kv={i_kv}"
                assert got.local_tokens == w and got.report.i_kv == i_kv


def test_logits_after_handoff_match_the_unsplit_model():
    model = _tiny("mistral")
    ids = _prompt(length=12)
    for i_kv in (0, 1):
        u, h = UnsplitSession(model), HandoffSession(model, 2)
        u.prefill(ids), h.prefill(ids)
        report = h.handoff(i_kv)
        nxt = ids[:, -1:]
        for _ in range(8):
            a, b = u.forward(nxt), h.forward(nxt)
            assert (a - b).abs().max().item() <= 1e-4
            nxt = a[:, -1].argmax(-1, keepdim=True)
        assert report.positions == 12 and not h.local


def test_left_padded_batch_hands_off():
    model = _tiny("llama")
    ids = _prompt(batch=3, length=9, seed=2)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :8] = 0
    reference = generate(UnsplitSession(model), ids, mask, CFG).tokens
    for i_kv in (0, 1):
        got = handoff_generate(HandoffSession(model, 2), ids, mask, CFG, local_tokens=4, i_kv=i_kv)
        assert torch.equal(got.tokens, reference)


def test_handoff_bytes_are_eq3s_payloads():
    model = _tiny("llama")
    parts = decoder_parts(model)
    ids = _prompt(length=10)
    link = EmulatedLink(parse_link("10Mbit/s,10ms"))
    kv = handoff_generate(HandoffSession(model, 1, LinkWire(RawWire("fp32"), link)), ids, None, CFG,
                          local_tokens=5, i_kv=1).report
    # KV of layers [1, 4) for the prompt and the 4 tokens fed before the handoff
    assert kv.positions == 14 and kv.layers == (1, 4) and kv.hidden_bytes == 0
    assert kv.kv_bytes == kv_payload_bytes(kv_layout(parts, range(1, 4), 1), 14, 4)
    assert kv.kv_bytes in [r.nbytes for r in link.records]
    hidden = handoff_generate(HandoffSession(model, 1), ids, None, CFG, local_tokens=5, i_kv=0).report
    assert hidden.kv_bytes == 0 and hidden.hidden_bytes == 13 + 14 * 64 * 4  # raw fp32 frame of [14, H]
    assert hidden.total_bytes < kv.total_bytes  # sending KV costs more than the hidden state alone
    full = HandoffSession(model, 1)
    full.prefill(ids)
    assert full.handoff(1, edge_layers=True).layers == (0, 4)


def test_the_edge_model_generates_the_local_tokens():
    cloud, edge = _tiny("llama"), _tiny("qwen2")  # different weights, same shapes
    ids = _prompt()
    edge_alone = generate(UnsplitSession(edge), ids, None, CFG).tokens
    got = handoff_generate(HandoffSession(cloud, 2, edge_model=edge), ids, None, CFG, local_tokens=5, i_kv=1)
    assert torch.equal(got.tokens[:, :5], edge_alone[:, :5])


def test_handoff_errors():
    model = _tiny("llama")
    session = HandoffSession(model, 2)
    with pytest.raises(SplitLLMError, match="I_kv"):
        session.handoff(2)
    with pytest.raises(SplitLLMError, match="edge_layers"):
        session.handoff(0, edge_layers=True)
    session.handoff(1)
    with pytest.raises(SplitLLMError, match="already"):
        session.handoff(1)
    with pytest.raises(SplitLLMError, match="fresh"):
        handoff_generate(session, _prompt(), None, CFG, local_tokens=1, i_kv=1)
    with pytest.raises(SplitLLMError, match="local tokens"):
        handoff_generate(HandoffSession(model, 2), _prompt(), None, CFG, local_tokens=-1, i_kv=1)
    with pytest.raises(SplitLLMError, match="ends at"):
        HandoffSession(model, 2, edge=EdgeHalf(decoder_parts(model), 1))
    with pytest.raises(SplitLLMError, match="hidden size"):
        HandoffSession(model, 2, edge_model=_wide(model))


def _wide(model):
    import transformers as tf

    cfg = tf.LlamaConfig(**{**model.config.to_dict(), "hidden_size": 128})
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def test_generation_that_ends_before_w_never_hands_off():
    got = handoff_generate(HandoffSession(_tiny("llama"), 2), _prompt(), None, SamplingConfig(max_new_tokens=3),
                           local_tokens=10, i_kv=1)
    assert got.report is None and got.local_tokens == 3


def test_real_model_handoff_equals_no_handoff(real_lm):
    tok = real_lm.tokenizer
    ids = torch.tensor([tok("The river flows through the old town and", add_special_tokens=True)["input_ids"]])
    cfg = SamplingConfig(max_new_tokens=16)
    reference = generate(UnsplitSession(real_lm.model), ids, None, cfg).tokens
    for i_kv in (0, 1):
        got = handoff_generate(HandoffSession(real_lm.model, 15), ids, None, cfg, local_tokens=6, i_kv=i_kv)
        assert torch.equal(got.tokens, reference), f"I_kv={i_kv}"
