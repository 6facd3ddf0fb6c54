"""Algorithm 2 live: the policy steps down on a collapsing link, acts on every decision, and traces it."""

from __future__ import annotations

import copy
import json
import math
import sys
from itertools import groupby
from pathlib import Path

import pytest
import torch

from splitcli.codec import CodecConfig, decode, encode
from splitcli.cost.latency import outage_probability, transmissions_needed, log_inv_outage
from splitcli.errors import SplitLLMError
from splitcli.model.split import EdgeHalf, decoder_parts
from splitcli.plan.early_exit import ExitPolicy
from splitcli.runtime.adaptive import (
    adaptive_generate, codec_frame_bound, format_trace, link_model_for, session_wire_bytes, with_q_bar, write_trace,
)
from splitcli.runtime.codec_wire import CodecWire
from splitcli.runtime.generate import SamplingConfig, generate
from splitcli.runtime.handoff import HandoffSession, cache_rows
from splitcli.runtime.link import EmulatedLink, parse_link
from splitcli.runtime.session import SplitSession, UnsplitSession

sys.path.insert(0, str(Path(__file__).parent))
from conftest import _tiny  # noqa: E402

D = 0.1  # the 100 ms deadline


def _policy(spec, q_bar=8, i_kv=1, eps=0.01):
    return ExitPolicy(deadline_s=D, q_bar=q_bar, q_bar_min=2, i_kv=i_kv, link=link_model_for(spec, eps))


def _wide_llama():
    """A tiny Llama with a wide hidden state and one KV head: frames of a few KB per step, so that
    0.5 Mbit/s cannot carry even the smallest one inside 100 ms, while KV stays a minority of the
    bytes (compressing the hidden state then matters)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=1, max_position_embeddings=256)
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _prompt(batch=1, length=6, seed=1):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_policy_steps_down_as_the_link_collapses():
    """10 -> 0.5 Mbit/s at step 8, D = 100 ms: keep, then compress harder, then I_kv = 0, then stop.

    The edge's rate estimate averages its last 16 frames, so after the drop it falls through the
    rates at which each stage fits; until it has caught up the steps miss D and are outages.
    """
    spec = parse_link("10Mbit/s@0;0.5Mbit/s@8,20ms")
    link = EmulatedLink(spec, estimate_window=16)
    wire = CodecWire(CodecConfig(tau=4.0, tau_quantile=None, q_bar=8, delta=0.0, entropy=False))
    session = SplitSession(_wide_llama(), 1, wire)
    result = adaptive_generate(session, _prompt(batch=40), None, SamplingConfig(max_new_tokens=64),
                               _policy(spec), link, fixed_compute_s=0.005)
    steps = result.rows[1:]
    assert [d for d, _ in groupby(r.decision for r in steps)] == ["keep", "compress", "drop_kv", "stop"]

    ran = [r for r in steps if r.measured_ms is not None]
    for row in ran:  # every kept step is within D or marked as an outage
        assert row.outage == (row.measured_ms > D * 1e3)
        assert row.measured_ms <= D * 1e3 or row.outage
        assert row.measured_ms == pytest.approx(row.compute_ms + row.link_ms)
    assert not any(r.outage for r in steps if r.step < 8)  # 10 Mbit/s carries everything in time

    keep = [r for r in steps if r.decision == "keep"]
    compress = [r for r in steps if r.decision == "compress"]
    drop = [r for r in steps if r.decision == "drop_kv"]
    assert all(r.q_bar == 8 and r.i_kv == 1 and r.kv_bytes > 0 for r in keep)
    assert all(r.q_bar < 8 and r.i_kv == 1 and r.kv_bytes > 0 for r in compress)
    assert max(r.wire_bytes for r in compress) < min(r.wire_bytes for r in keep)
    first_drop = drop[0].step
    assert all(r.i_kv == 0 and r.kv_bytes == 0 for r in steps if r.step >= first_drop)  # sticky
    # the frames really were coded at the decided q̄ (one codec frame per run step after the prefill's)
    for row, stats in zip(ran, wire.stats[1:]):
        assert stats.mean_width <= row.q_bar

    stop = steps[-1]
    assert stop.decision == "stop" and stop.measured_ms is None and not stop.outage
    summary = result.summary
    assert summary.stopped_early and summary.tokens == result.tokens.shape[1] == stop.step
    assert summary.steps == len(ran) and summary.eps == 0.01
    assert summary.outages == sum(r.outage for r in ran) > 0
    assert summary.outage_rate == pytest.approx(summary.outages / summary.steps)
    assert summary.decisions == {"keep": len(keep), "compress": len(compress), "drop_kv": len(drop), "stop": 1}
    assert session.wire is wire and wire.cfg.q_bar == 8  # the session gets its own settings back


def test_trace_is_jsonl_and_printable(tmp_path):
    spec = parse_link("2Mbit/s,20ms,jitter=5ms,loss=0.05,seed=3")
    session = SplitSession(_tiny("llama"), 2)
    result = adaptive_generate(session, _prompt(), None, SamplingConfig(max_new_tokens=24), _policy(spec),
                               EmulatedLink(spec))
    path = tmp_path / "trace.jsonl"
    write_trace(path, result)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [x["kind"] for x in lines] == ["step"] * len(result.rows) + ["summary"]
    assert lines[1]["decision"] in ("keep", "drop_kv", "stop") and lines[-1]["eps"] == 0.01
    assert lines[-1]["outage_rate"] == result.summary.outage_rate
    assert sum(x["retransmissions"] for x in lines[:-1]) == sum(r.retransmissions for r in result.rows)
    text = format_trace(result)
    assert len(text) == len(result.rows) + 1 + len(result.summary.lines())
    assert any("eps requested 0.01" in line for line in text)
    assert sum("OUTAGE" in line for line in text) == result.summary.outages


def test_same_seed_same_trace():
    spec = parse_link("1Mbit/s@0;0.2Mbit/s@5,20ms,jitter=8ms,loss=0.1,seed=11")

    def run():
        result = adaptive_generate(SplitSession(_tiny("llama"), 2), _prompt(), None,
                                   SamplingConfig(max_new_tokens=16), _policy(spec), EmulatedLink(spec),
                                   fixed_compute_s=0.002)
        return [(r.decision, r.link_ms, r.retransmissions, r.outage) for r in result.rows]

    assert run() == run()


def test_raw_wire_cannot_compress_and_says_so():
    spec = parse_link("0.5Mbit/s,20ms")
    session = SplitSession(_tiny("llama"), 2)  # raw fp32 frames

    def wire_bytes(q_bar, i_kv, w):  # a byte model that believes compression helps
        return 700.0 * q_bar + i_kv * 100.0  # q̄ 8 misses D at 0.5 Mbit/s, q̄ 6 fits

    result = adaptive_generate(session, _prompt(), None, SamplingConfig(max_new_tokens=6), _policy(spec, i_kv=0),
                               EmulatedLink(spec), wire_bytes=wire_bytes, fixed_compute_s=0.001)
    compress = [r for r in result.rows if r.decision == "compress"]
    assert compress and all("raw wire cannot compress" in r.note and r.q_bar is None for r in compress)
    assert {r.wire_bytes for r in result.rows[1:]} == {13 + 64 * 4}  # uncompressed frames went out


def test_kv_rows_make_the_cloud_hold_the_whole_session():
    """I_kv = 1 sends the edge layers' rows: the cloud's cache then covers every layer, and the full
    model continued on it alone gives the split's next logits (the cloud could take over)."""
    model = _tiny("llama")
    spec = parse_link("100Mbit/s,1ms")
    session = SplitSession(model, 2)
    result = adaptive_generate(session, _prompt(), None, SamplingConfig(max_new_tokens=8), _policy(spec),
                               EmulatedLink(spec))
    length, edge_rows = cache_rows(session.edge_cache, range(2), 0)
    _, copied = cache_rows(session.cloud_cache, range(2), 0)
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) for a, b in zip(edge_rows, copied))
    nxt = result.tokens[:, -1:]
    alone = copy.deepcopy(session.cloud_cache)
    with torch.inference_mode():
        took_over = model(input_ids=nxt, position_ids=torch.tensor([[length]]), cache=alone, use_cache=True).logits
    assert (took_over[:, -1] - session.forward(nxt)[:, -1]).abs().max().item() <= 1e-4
    # and the bytes the policy predicted are the bytes that went out
    predict = session_wire_bytes(session, 1)
    assert all(r.wire_bytes == predict(8, 1, r.step) for r in result.rows[1:])


def test_a_qa_bit_edge_cache_starts_without_kv():
    from splitcli.quant import KVQuantConfig, QuantizedKVCache

    class QuantizedEdge(EdgeHalf):
        def new_cache(self):
            return QuantizedKVCache(KVQuantConfig(bits=8))

    model = _tiny("llama")
    spec = parse_link("10Mbit/s,5ms")
    session = SplitSession(model, 2, edge=QuantizedEdge(decoder_parts(model), 2))
    result = adaptive_generate(session, _prompt(), None, SamplingConfig(max_new_tokens=4), _policy(spec),
                               EmulatedLink(spec))
    assert all(r.i_kv == 0 and r.kv_bytes == 0 for r in result.rows)
    assert result.summary.decisions == {"keep": 3} and "Qa-bit" in result.summary.notes[0]


@pytest.mark.parametrize("link_text, handed, decision", [
    ("10Mbit/s,20ms", 1, "keep"),    # all L layers' KV fits
    ("1Mbit/s,20ms", 0, "drop_kv"),  # KV does not, the hidden states at ℓ do
    ("0.2Mbit/s,20ms", None, "stop"),  # nothing does: end with the edge's own tokens
])
def test_handoff_is_decided_like_a_step(link_text, handed, decision):
    model = _tiny("llama")
    spec = parse_link(link_text)
    cfg = SamplingConfig(max_new_tokens=12)
    reference = generate(UnsplitSession(model), _prompt(length=10), None, cfg).tokens
    result = adaptive_generate(HandoffSession(model, 2), _prompt(length=10), None, cfg, _policy(spec),
                               EmulatedLink(spec), local_tokens=5, fixed_compute_s=0.005)
    stages = [(r.stage, r.decision) for r in result.rows]
    assert stages[:5] == [("local", "prefill")] + [("local", "local")] * 4
    assert stages[5] == ("handoff", decision)
    assert torch.equal(result.tokens, reference[:, :result.tokens.shape[1]])
    if handed is None:
        assert result.handoff is None and result.tokens.shape[1] == 5
        return
    assert result.handoff.i_kv == handed and result.tokens.shape[1] == 12
    if handed:  # eq. (2): KV of every layer, the edge's included, for the 14 positions so far
        assert result.handoff.layers == (0, 4) and result.handoff.positions == 14
        assert result.rows[5].kv_bytes > result.handoff.kv_bytes  # plus the step's own edge rows
    else:
        assert result.handoff.hidden_bytes == 13 + 14 * 64 * 4 and result.rows[5].kv_bytes == 0


def test_with_q_bar_keeps_frames_decodable():
    model = tuple(tuple([1] * (1 << w)) for w in range(2, 7))  # a static model for widths 2..6
    cfg = CodecConfig(tau=math.inf, tau_quantile=None, q_bar=6, symbol_model=model)
    lower = with_q_bar(cfg, 4)
    assert (lower.q_bar, lower.q_min, len(lower.symbol_model)) == (4, 2, 3)
    x = torch.randn(3, 32)
    assert decode(encode(x, lower), lower).shape == (3, 32)
    narrow = with_q_bar(CodecConfig(tau=math.inf, tau_quantile=None, q_bar=6, q_min=4), 3)
    assert (narrow.q_bar, narrow.q_min) == (3, 3)
    assert with_q_bar(cfg, 8).symbol_model is None  # no calibrated model for widths 7..8
    with pytest.raises(SplitLLMError):
        with_q_bar(cfg, 1)


@pytest.mark.parametrize("q_bar", [2, 5, 8])
def test_codec_frame_bound_is_an_upper_bound(q_bar):
    cfg = CodecConfig(tau=2.5, tau_quantile=None, q_bar=q_bar, delta=0.0, entropy=False)
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(q_bar))
    frame = encode(x, cfg)
    sparse = (x.abs() >= 2.5).sum().item() * 6 / 7  # u16 column + f32 value per outlier, per row
    assert len(frame) <= codec_frame_bound(cfg, 7, 96, q_bar, sparse)


def test_link_model_matches_the_emulated_loss():
    spec = parse_link("2Mbit/s,loss=0.05")
    model = link_model_for(spec, eps=0.001)
    assert outage_probability(2e6, model.bandwidth_hz, model.snr) == pytest.approx(0.05)
    # eq. (9) then asks for the tries that leave <= eps: 0.05^3 < 0.001 < 0.05^2
    assert transmissions_needed(log_inv_outage(2e6, model.bandwidth_hz, model.snr), 0.001) == 3
    lossless = link_model_for(parse_link("2Mbit/s"), eps=0.01)
    assert transmissions_needed(log_inv_outage(2e6, lossless.bandwidth_hz, lossless.snr), 0.01) == 1


def test_adaptive_generate_rejects_bad_calls():
    model = _tiny("llama")
    spec = parse_link("1Mbit/s")
    cfg = SamplingConfig(max_new_tokens=2)
    used = SplitSession(model, 2)
    used.prefill(_prompt())
    with pytest.raises(SplitLLMError, match="fresh"):
        adaptive_generate(used, _prompt(), None, cfg, _policy(spec), EmulatedLink(spec))
    with pytest.raises(SplitLLMError, match="HandoffSession"):
        adaptive_generate(SplitSession(model, 2), _prompt(), None, cfg, _policy(spec), EmulatedLink(spec),
                          local_tokens=3)
    with pytest.raises(SplitLLMError, match="compute"):
        adaptive_generate(SplitSession(model, 2), _prompt(), None, cfg, _policy(spec), EmulatedLink(spec),
                          fixed_compute_s=-1.0)
    codec = CodecWire(CodecConfig(tau=math.inf, tau_quantile=None))
    with pytest.raises(SplitLLMError, match="widest code"):
        adaptive_generate(SplitSession(model, 2, codec), _prompt(), None, cfg, _policy(spec, q_bar=12),
                          EmulatedLink(spec))
