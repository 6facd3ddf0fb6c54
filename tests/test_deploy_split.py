"""The deployment layer: a plan + flags becomes one split, the same for generate, eval and shards."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from conftest import _tiny
from splitcli.cli import app
from splitcli.deploy import SplitSpec, build_split, planned_edge
from splitcli.errors import SplitLLMError
from splitcli.plan.codec_settings import CodecSettings
from splitcli.plan.schema import Budgets, Plan

runner = CliRunner()


def _plan(**kw) -> Plan:
    base = dict(model_id="tiny", n_layers=4, split_layer=2, l_w=1, method="front", q_w1=4, q_w2=8, qa=4,
                codec=CodecSettings(q_bar=8, delta=0.05, tau_quantile=0.999), group_size=16, max_tokens=8,
                budgets=Budgets(memory_bytes=10**6, max_accuracy_drop=0.01), embed_bits=8)
    return Plan(**{**base, **kw})


def test_planned_edge_quantizes_copies_and_uses_qa_cache():
    from splitcli.quant import Int4Linear, Int8Linear, QuantEmbedding, QuantizedKVCache, QuantLinear

    model = _tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = SplitSpec.from_plan(_plan()).resolve(model)
    edge = planned_edge(model, spec)
    assert isinstance(edge.new_cache(), QuantizedKVCache)
    layers = edge.parts.layers
    assert isinstance(layers[0].mlp.up_proj, (Int4Linear, QuantLinear)) and layers[0].mlp.up_proj.bits == 4
    assert isinstance(layers[1].mlp.up_proj, Int8Linear) and layers[1].mlp.up_proj.bits == 8  # the int8 kernel
    assert layers[3] is model.model.layers[3]  # the cloud's layers are the model's own
    assert isinstance(edge.parts.embed_tokens, QuantEmbedding)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "building the edge changed the model"
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)


def test_opsc_edge_model_takes_an_unresolved_spec():
    """A bare SplitSpec (group size, l_w left to the model) gives the edge model its resolved twin
    gives; it used to fail inside the quantizer (a None group size)."""
    from splitcli.deploy import opsc_edge_model

    model = _tiny("llama")
    bare = SplitSpec(split_layer=2, q_w1=4)
    a, b = opsc_edge_model(model, bare), opsc_edge_model(model, bare.resolve(model))
    assert a is not model and a.model.layers[0].mlp.up_proj.bits == 4
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_spec_refusals():
    model = _tiny("llama")
    with pytest.raises(SplitLLMError, match="outside the valid range"):
        SplitSpec(split_layer=4).resolve(model)
    with pytest.raises(SplitLLMError, match="wire"):
        SplitSpec(wire="zip")
    with pytest.raises(SplitLLMError, match="embedding bits"):
        SplitSpec(embed_bits=4)
    with pytest.raises(SplitLLMError, match="full-attention"):
        planned_edge(_tiny("mistral"), SplitSpec(split_layer=2, qa=8).resolve(_tiny("mistral")))
    with pytest.raises(SplitLLMError, match="plain nn.Embedding.*16 bits"):
        planned_edge(_tiny("gemma2"), SplitSpec(split_layer=2, embed_bits=8).resolve(_tiny("gemma2")))


def test_compression_off_split_equals_unsplit(tiny_model):
    from types import SimpleNamespace

    from splitcli.runtime.session import UnsplitSession

    lm = SimpleNamespace(model=tiny_model, sha256="x", tokenizer=None)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    ref = UnsplitSession(tiny_model).forward(ids, logits_to_keep=0)
    split = build_split(lm, SplitSpec(split_layer=2))
    assert split.spec.compression_off and split.info["wire"] == "raw-fp32"
    assert torch.equal(split.session().forward(ids, logits_to_keep=0), ref)


@pytest.fixture()
def plan_file(tiny_model_dir, tmp_path):
    """A plan for the tiny model: 4-bit edge layers, 8-bit embedding, 8-bit KV, the codec at ℓ = 2."""
    plan = _plan(model_id=str(tiny_model_dir), q_w2=None, l_w=2, qa=8, group_size=32,
                 codec=CodecSettings(tau=3.0, q_bar=6, entropy=False))
    path = tmp_path / "plan.yaml"
    plan.save(path)
    return path


def test_eval_and_generate_config_run_the_same_edge(plan_file, tiny_model_dir, tmp_path):
    """For one plan, `eval --config` and `generate --config` build the same split: same logits."""
    from splitcli.eval.pipelines import build_pipeline, pipeline_from_plan
    from splitcli.model.loader import load_model
    from splitcli.runtime.generate import encode_prompts

    from splitcli.cli.common import split_spec

    lm = load_model(str(tiny_model_dir))
    plan = Plan.load(plan_file)
    # what `generate --config plan.yaml` builds (no flags), and what `eval --config plan.yaml` scores
    gen = build_split(lm, split_spec(plan, None, {}))
    pipe = build_pipeline(lm, pipeline_from_plan(plan))
    assert pipe.config.qa == 8 and pipe.config.embed_bits == 8 and pipe.config.codec == "tabq"
    ids, mask = encode_prompts(lm.tokenizer, ["The three primary colors are red, green and"])
    with torch.inference_mode():
        a = gen.session().forward(ids, mask, logits_to_keep=0)
        b = pipe.logits_fn(ids, mask)
    assert float((a - b).abs().max()) == 0.0
    # and it is the plan's edge: quantized KV, 8-bit embedding, the codec wire
    assert type(gen.edge.new_cache()).__name__ == "QuantizedKVCache"
    assert type(gen.edge.parts.embed_tokens).__name__ == "QuantEmbedding" and gen.wire.name == "tabq"


def test_shards_with_config_and_codec(plan_file, tiny_model_dir, tmp_path):
    """--shards combines with --config / --codec: the shards' edge, the plan's codec."""
    out = tmp_path / "q"
    r = runner.invoke(app, ["quantize", "--config", str(plan_file), "-m", str(tiny_model_dir), "--out", str(out)])
    assert r.exit_code == 0, r.output
    js = tmp_path / "g.json"
    r = runner.invoke(app, ["generate", "--shards", str(out), "--config", str(plan_file), "-p", "Hello there",
                            "-n", "4", "--json", str(js), "--no-steps"])
    assert r.exit_code == 0, r.output
    import json

    data = json.loads(js.read_text())
    assert data["wire"] == "tabq" and len(data["tokens"]) == 4
    r = runner.invoke(app, ["generate", "--shards", str(out), "--codec", "tabq", "--tau", "2.5", "--no-entropy",
                            "-p", "Hello there", "-n", "2", "--no-steps"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["generate", "--shards", str(out), "--max-bits", "5", "-p", "Hello", "-n", "1"])
    assert r.exit_code == 2 and "need --codec tabq" in r.output
    # shards of another ℓ than the plan's: refused with the fix named
    other = tmp_path / "q1"
    r = runner.invoke(app, ["quantize", "--config", str(plan_file), "-l", "1", "-m", str(tiny_model_dir), "--out", str(other)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["generate", "--shards", str(other), "--config", str(plan_file), "-p", "Hello", "-n", "1"])
    assert r.exit_code == 2 and "plan splits at ℓ=2" in r.output and "quantize --config" in r.output
