"""Library pieces behind `profile` / `plan` / `generate --config`: shape estimates, byte tables,
per-bit timings in the profile schema, the accuracy table, the perplexity proxy and the planned edge."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import _tiny
from splitcli.errors import SplitLLMError
from splitcli.deploy.measure import ProfileSettings, activation_peak_bytes, kv_bytes_table, median_ms, weight_bytes_table
from splitcli.deploy.proxy import PerplexityProxy
from splitcli.plan.accuracy import AccuracyTable, edge_bits
from splitcli.plan.advise import canonical, default_space, describe_weights, summary_rows
from splitcli.plan.enumerate import Candidate
from splitcli.plan.profile import LayerCost, Profile, profile_from_architecture
from splitcli.plan.schema import Budgets, CodecSettings, Plan


class Cfg:
    hidden_size, num_attention_heads, num_key_value_heads, head_dim, intermediate_size = 64, 4, 2, 16, 128


def test_activation_peak_hand_computed():
    # T = 10: residual 640; attention 640 + 10*(4+4)*16 + 2*10*64 + 4*100 + 10*64 = 640+1280+1280+400+640
    # = 4240; MLP 640 + 3*1280 = 4480 -> (640 + 4480) * 4 bytes
    assert activation_peak_bytes(Cfg, 10) == (640 + 4480) * 4
    # T = 1000: the scores [4, T, T] dominate the attention phase
    t = 1000
    attention = t * 64 + t * 8 * 16 + 2 * t * 64 + 4 * t * t + t * 64
    assert activation_peak_bytes(Cfg, t) == (t * 64 + attention) * 4


def test_kv_and_weight_tables_exact():
    table = kv_bytes_table(Cfg, (4, 8, 16))
    # per head: packed codes (16 values) + fp16 scale and zero; K and V; 2 heads
    assert table == {4: 2 * 2 * (8 + 4), 8: 2 * 2 * (16 + 4), 16: 2 * 2 * 16 * 4}
    lin = torch.nn.Sequential(torch.nn.Linear(64, 128, bias=False))
    sizes = weight_bytes_table(lin, (4, 16), 32)
    assert sizes[16] == 64 * 128 * 4
    # codes 128 x 32 bytes + bf16 scales and zeros (128 x 2 groups x 2 x 2 bytes) + qmeta 24
    assert sizes[4] == 128 * 32 + 128 * 2 * 2 * 2 + 24


def test_embedding_bytes_match_the_edge_shard():
    from splitcli.deploy.measure import embedding_bytes_table
    from splitcli.quant import quantized_matrix_bytes

    emb = torch.nn.Embedding(100, 48)
    table = embedding_bytes_table(emb)
    # 8-bit codes, one bf16 scale and zero per row, 24 bytes of metadata: the edge shard's payload
    assert table == {8: 100 * 48 + 100 * 2 * 2 + 24, 16: 100 * 48 * 4}
    assert table[8] == quantized_matrix_bytes(100, 48, 8, 48)


def test_stack_scale_hand_computed():
    from splitcli.deploy.measure import stack_scale

    # Three layers timed alone at 2 + 3 + 5 = 10 ms; the stack took 8.5 ms including 0.5 ms of masks.
    assert stack_scale([2.0, 3.0, 5.0], 8.5, 0.5) == pytest.approx(0.8)
    assert stack_scale([0.0, 0.0], 3.0, 0.5) == 1.0  # nothing measured alone: leave the times as they are
    assert stack_scale([1.0], 0.2, 0.5) == 0.0  # a stack faster than its overhead: clamp, never negative


def test_settings_validation():
    s = ProfileSettings(bits=(16, 4, 4), tokens=(32, 1))
    assert s.bits == (4, 16) and s.tokens == (1, 32)
    for bad in (dict(bits=()), dict(bits=(5,)), dict(kv_bits=(1,)), dict(tokens=(0,)), dict(repeats=0),
                dict(group_size=0), dict(decode_context=0)):
        with pytest.raises(SplitLLMError):
            ProfileSettings(**bad)


def test_median_ms_skips_warmup():
    calls = []
    assert median_ms(lambda: calls.append(1), 3) >= 0 and len(calls) == 4


def test_profile_per_bit_timings_round_trip_and_prediction():
    base = profile_from_architecture("m", 3, 64, 2, 16, 1000, 100, decode_ms_per_layer=2.0)
    layer = LayerCost(prefill_ms={1: 2.0, 10: 20.0}, decode_ms=2.0, weight_bytes={4: 1.0, 16: 4.0},
                      kv_bytes_per_token={16: 1.0}, activation_peak_bytes=0.0,
                      decode_ms_by_bits={4: 0.5, 16: 2.0}, prefill_ms_by_bits={4: {1: 0.5, 10: 5.0}})
    profile = Profile(base.model_id, 64, 2, 16, base.device, (layer,) * 3, base.embedding, base.head, group_size=32)
    again = Profile.from_dict(profile.to_dict())
    assert again == profile and again.group_size == 32
    assert profile.edge_decode_ms_at((4, 4)) == pytest.approx(1.0)
    assert profile.edge_decode_ms_at((4, 16, 8)) == pytest.approx(0.5 + 2.0 + 2.0)  # 8 unmeasured: as loaded
    assert profile.edge_decode_ms_at((16, 16)) == profile.edge_decode_ms(2)
    assert profile.edge_prefill_ms_at((4,), 10) == pytest.approx(5.0)
    assert profile.edge_prefill_ms_at((16,), 5) == pytest.approx(profile.edge_prefill_ms(1, 5))
    # old profiles without the optional keys still load
    data = profile.to_dict()
    for item in data["layers"]:
        del item["decode_ms_by_bits"], item["prefill_ms_by_bits"]
    del data["group_size"]
    assert Profile.from_dict(data).layers[0].decode_ms_at(4) == 2.0
    with pytest.raises(SplitLLMError):
        LayerCost(prefill_ms={1: 1.0}, decode_ms=1.0, weight_bytes={4: 1.0}, kv_bytes_per_token={16: 1.0},
                  activation_peak_bytes=0.0, decode_ms_by_bits={4: math.nan})


def test_accuracy_table_semantics():
    table = AccuracyTable({"format_version": 1, "higher_is_better": True, "baseline": 0.5,
                           "results": [{"split_layer": 2, "q_w1": 4, "value": 0.4}, {"q_w1": 4, "drop": 0.01}]})
    c = Candidate(2, 2, "front", 4, None, 16, 8, 0.999)
    assert table.drop(c) == pytest.approx(0.2)
    assert table.drop(Candidate(3, 3, "front", 4, None, 16, 8, 0.999)) == 0.01
    assert math.isnan(table.drop(Candidate(3, 3, "front", 8, None, 16, 8, 0.999)))
    ppl = AccuracyTable({"format_version": 1, "higher_is_better": False, "baseline": 20.0, "results": [{"value": 21.0}]})
    assert ppl.drop(c) == pytest.approx(0.05)
    for bad in ({}, {"format_version": 2, "results": [{"drop": 0}]}, {"format_version": 1, "results": []},
                {"format_version": 1, "results": [{"value": 1.0}]}, {"format_version": 1, "results": [{"x": 1}]},
                {"format_version": 1, "results": [{"drop": "a"}]}, []):
        with pytest.raises(SplitLLMError):
            AccuracyTable(bad)


def test_proxy_baseline_matches_model_and_caches():
    model = _tiny("llama")
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    proxy = PerplexityProxy(model, ids, group_size=16)
    with torch.inference_mode():
        logits = model(ids).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1)).exp()
    assert proxy.baseline() == pytest.approx(float(ref), rel=1e-5)
    same = [Candidate(2, 2, "front", 16, None, 16, 8, 0.9), Candidate(3, 4, "front", 16, None, 16, 4, 0.9)]
    assert [proxy.drop(c) for c in same] == [0.0, 0.0] and proxy.evaluations == 1
    two_bit = Candidate(3, 3, "front", 2, None, 16, 8, 0.9)
    assert proxy.drop(two_bit) != 0.0 and proxy.evaluations == 2
    # l_w >= l all mean "every edge layer at q_w1": one evaluation serves them
    proxy.drop(Candidate(3, 4, "front", 2, None, 16, 4, 0.9))
    assert proxy.evaluations == 2
    proxy.drop(Candidate(2, 2, "front", 16, None, 4, 8, 0.9))  # a 4-bit KV cache changes the numbers
    assert proxy.evaluations == 3
    # the model's weights are restored after each evaluation
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, logits)
    assert edge_bits(Candidate(3, 1, "front", 4, 8, 16, 8, 0.9), 4) == (4, 8, 8)


def test_default_space_and_descriptions():
    profile = profile_from_architecture("m", 12, 64, 2, 16, 1000, 100, weight_bits=(4, 8, 16))
    space = default_space(profile)
    assert space.split_layers == tuple(range(1, 12)) and space.l_w == (0, 2, 4, 6, 8, 10, 12)
    assert (4, None) in space.q_w and (4, 8) in space.q_w and (8, 4) not in space.q_w
    assert describe_weights((4, 4, 8, 16)) == "4b x 2 + 8b x 1 + float x 1"
    assert describe_weights(()) == ""
    mixed_as_uniform = Candidate(5, 0, "front", 4, 8, 16, 8, 0.9)
    assert canonical(mixed_as_uniform, 12) == Candidate(5, 12, "front", 8, None, 16, 8, 0.9)
    assert canonical(Candidate(5, 2, "front", 4, 8, 16, 8, 0.9), 12).l_w == 2


