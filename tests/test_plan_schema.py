import dataclasses

import pytest

from splitcli.configio import load_config, write_yaml
from splitcli.errors import SplitLLMError
from splitcli.plan.profile import (
    CodecCost, CodecPoint, DeviceInfo, LayerCost, Profile, StageCost, profile_from_architecture,
)
from splitcli.plan.schema import Budgets, CodecSettings, Plan


def _profile() -> Profile:
    layer = LayerCost(prefill_ms={1: 0.5, 128: 9.0}, decode_ms=0.4,
                      weight_bytes={4: 2_000_000, 16: 7_000_000},
                      kv_bytes_per_token={8: 408.0, 16: 768.0}, activation_peak_bytes=50_000)
    codec = CodecCost(0.01, 0.02, (CodecPoint(4, 0.99, 130.5, True), CodecPoint(6, 5.0, 190.0)))
    return Profile("smollm2-135m", 576, 3, 64, DeviceInfo("laptop", "x86", 2, 24 * 2**30),
                   (layer, layer), StageCost(56_623_104, 0.1, weight_bytes_by_bits={8: 14_352_384}),
                   StageCost(56_623_104, 2.3), codec)


def _plan(**over) -> Plan:
    fields = dict(model_id="smollm2-135m", n_layers=30, split_layer=10, l_w=10, method="front",
                  q_w1=4, q_w2=None, qa=16,
                  codec=CodecSettings(q_bar=4, delta=0.5, tau_quantile=0.99, q_bar_min=2),
                  group_size=64, max_tokens=256,
                  budgets=Budgets(memory_bytes=2**30, max_accuracy_drop=0.05, deadline_s=0.2))
    fields.update(over)
    return Plan(**fields)


def test_profile_yaml_roundtrip(tmp_path):
    profile = _profile()
    write_yaml(tmp_path / "p.yaml", profile.to_dict())
    again = Profile.from_dict(load_config(tmp_path / "p.yaml"))
    assert again == profile
    assert again.codec.bytes_per_token(4, 0.99, True) == 130.5
    with pytest.raises(SplitLLMError, match="no codec measurement"):
        again.codec.bytes_per_token(4, 0.99)


def test_profile_helpers():
    profile = _profile()
    assert profile.n_layers == 2
    assert profile.kv_bytes_per_token(8) == [408.0, 408.0]
    with pytest.raises(SplitLLMError, match="Qa=4"):
        profile.kv_bytes_per_token(4)
    assert profile.edge_decode_ms(2) == pytest.approx(0.1 + 0.8)
    assert profile.edge_decode_ms(0) == pytest.approx(0.1)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format_version=5), "format_version 5; this splitllm reads versions 1, 2, 3, 4"),
    (lambda d: d.pop("layers"), "missing layers"),
    (lambda d: d.update(bogus=1), "unknown keys bogus"),
    (lambda d: d.update(layers=[]), "at least one layer"),
    (lambda d: d["layers"][0].update(decode_ms=-1.0), "decode_ms"),
    (lambda d: d["layers"][0].update(decode_ms=float("nan")), "decode_ms"),
    (lambda d: d["layers"][0].update(weight_bytes={}), "weight_bytes"),
    (lambda d: d["layers"][0].update(weight_bytes={"four": 1}), "integer"),
    (lambda d: d["codec"]["points"].append(dict(d["codec"]["points"][0])), "duplicate"),
    (lambda d: d.update(hidden_size=0), "hidden_size"),
])
def test_profile_validation(mutate, message):
    data = _profile().to_dict()
    mutate(data)
    with pytest.raises(SplitLLMError, match=message):
        Profile.from_dict(data)


def test_profile_from_architecture_smollm2():
    params = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    profile = profile_from_architecture("smollm2", 30, 576, 3, 64, params, 49152 * 576)
    layer = profile.layers[0]
    assert params == 3_540_096
    assert layer.weight_bytes[16] == params * 2
    assert layer.weight_bytes[4] == params / 2 + (params // 64) * 4  # 64 divides params exactly
    assert layer.kv_bytes_per_token[16] == 768
    assert layer.kv_bytes_per_token[4] == 192 + 24
    assert profile.embedding.weight_bytes == 49152 * 576 * 2
    assert profile.embedding.weight_bytes_at(8) == 49152 * 576 + 49152 * 4  # codes + fp16 scale, zero per row


def test_stage_bytes_at_bits():
    stage = _profile().embedding
    assert stage.weight_bytes_at(8) == 14_352_384
    assert stage.weight_bytes_at(16) == stage.weight_bytes_at(32) == 56_623_104  # as loaded
    with pytest.raises(SplitLLMError, match="no embedding size at 4 bits"):
        stage.weight_bytes_at(4)
    with pytest.raises(SplitLLMError, match="no embedding size at 8 bits"):
        StageCost(100.0).weight_bytes_at(8)  # a profile from before the field existed
    with pytest.raises(SplitLLMError, match="weight_bytes_by_bits"):
        StageCost(100.0, weight_bytes_by_bits={8: -1.0})


def test_plan_yaml_roundtrip_and_no_overwrite(tmp_path):
    plan = _plan(notes={"ppl": 22.3})
    plan.save(tmp_path / "plan.yaml")
    assert Plan.load(tmp_path / "plan.yaml") == plan
    with pytest.raises(SplitLLMError, match="--force"):
        plan.save(tmp_path / "plan.yaml")
    assert Plan.load(tmp_path / "plan.yaml").embed_bits == 8
    other = dataclasses.replace(plan, qa=8, embed_bits=16)
    other.save(tmp_path / "plan.yaml", overwrite=True)
    assert (Plan.load(tmp_path / "plan.yaml").qa, Plan.load(tmp_path / "plan.yaml").embed_bits) == (8, 16)


def test_plan_edge_bits():
    assert _plan().edge_weight_bits == (4,) * 10
    assert _plan(l_w=3, q_w2=16).edge_weight_bits == (4, 4, 4) + (16,) * 7
    assert _plan(method="back", l_w=25, q_w2=16).edge_weight_bits == (16,) * 5 + (4,) * 5


@pytest.mark.parametrize("over, message", [
    (dict(split_layer=0), "split_layer"),
    (dict(split_layer=31), "split_layer"),
    (dict(l_w=5), "keeps no weights"),
    (dict(method="middle"), "method"),
    (dict(i_kv=2), "i_kv"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(q_w1=0), "q_w1"),
    (dict(format_version=7), "format_version"),
    (dict(model_id=""), "model_id"),
    (dict(embed_bits=4), "embed_bits"),
    # review: a typo like this built a 10^12-entry per-layer tuple before any other check (hang, OOM)
    (dict(n_layers=10**12, l_w=10**12), r"plan n_layers must lie in \[1, 10000\], got 1000000000000"),
])
def test_plan_validation(over, message):
    with pytest.raises(SplitLLMError, match=message):
        _plan(**over)


@pytest.mark.parametrize("kwargs, message", [
    (dict(q_bar=4, delta=0.5, tau=5.0, tau_quantile=0.9), "exactly one"),
    (dict(q_bar=4, delta=0.5, tau_quantile=1.5), "tau_quantile"),
    (dict(q_bar=1, delta=0.5, tau=5.0), "q_bar"),
    (dict(q_bar=4, delta=-1.0, tau=5.0), "delta"),
    (dict(q_bar=4, delta=0.5, tau=5.0, q_bar_min=5), "q_bar_min"),
])
def test_codec_settings_validation(kwargs, message):
    with pytest.raises(SplitLLMError, match=message):
        CodecSettings(**kwargs)


def test_plan_from_dict_errors():
    data = _plan().to_dict()
    data.pop("qa")
    with pytest.raises(SplitLLMError, match="missing qa"):
        Plan.from_dict(data)
    with pytest.raises(SplitLLMError, match="mapping"):
        Plan.from_dict([1, 2])
    data = _plan().to_dict()
    data["budgets"]["memory_bytes"] = 0
    with pytest.raises(SplitLLMError, match="memory_bytes"):
        Plan.from_dict(data)


def test_edge_prefill_interpolation():
    profile = _profile()  # layers: {1: 0.5, 128: 9.0} ms; embedding: no points, decode 0.1 ms
    assert profile.edge_prefill_ms(0, 10) == pytest.approx(1.0)  # embedding: 10 * 0.1
    assert profile.edge_prefill_ms(1, 1) == pytest.approx(0.1 + 0.5)
    assert profile.edge_prefill_ms(1, 128) == pytest.approx(12.8 + 9.0)
    # Between points: 0.5 + (64 - 1) / 127 * 8.5 per layer.
    mid = 0.5 + 63 / 127 * 8.5
    assert profile.edge_prefill_ms(2, 64) == pytest.approx(6.4 + 2 * mid)
    # Beyond the last point: ms per token held at 9 / 128.
    assert profile.edge_prefill_ms(1, 256) == pytest.approx(25.6 + 18.0)
    assert profile.edge_prefill_ms(2, 0) == 0.0
    with pytest.raises(SplitLLMError):
        profile.edge_prefill_ms(3, 1)
