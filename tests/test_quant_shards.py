"""`splitllm quantize` shards: exact sizes, exact reload, determinism, refusals, edge-only loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from splitcli.cli import app
from splitcli.errors import SplitLLMError
from splitcli.model.loader import load_model
from splitcli.model.safetensors_io import payload_bytes, read_tensors
from splitcli.model.shard_loader import load_cloud, load_edge, resident_bytes
from splitcli.model.shards import (
    CLOUD_FILE, EDGE_FILE, MANIFEST_FILE, SHARD_FORMAT_VERSION, QuantSpec, dir_digest, edge_state_dict, predicted_cloud_bytes,
    predicted_edge_bytes, write_shards,
)
from splitcli.model.split import CloudHalf, EdgeHalf, decoder_parts
from splitcli.runtime.session import SplitSession

runner = CliRunner()
ARGS = ("-l", "2", "--front-bits", "4", "--back-bits", "none", "--group-size", "32", "--kv-bits", "8")


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def shard_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "q"
    r = runner.invoke(app, ["quantize", "-m", str(tiny_model_dir), *ARGS, "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_quantize_writes_self_contained_dir(shard_dir, tiny_lm):
    names = {p.name for p in shard_dir.iterdir()}
    assert {EDGE_FILE, CLOUD_FILE, MANIFEST_FILE, "config.json", "tokenizer.json"} <= names
    m = yaml.safe_load((shard_dir / MANIFEST_FILE).read_text())
    assert m["format_version"] == SHARD_FORMAT_VERSION == 3 and m["split_layer"] == 2 and m["l_w"] == 2
    assert m["layer_bits"] == [4, 4, None, None] and m["group_size"] == 32 and m["kv_bits"] == 8
    assert m["model_sha256"] == tiny_lm.sha256
    edge, _ = read_tensors(shard_dir / EDGE_FILE)
    cloud, _ = read_tensors(shard_dir / CLOUD_FILE)
    assert not any(k.startswith(("model.layers.2.", "model.layers.3.", "lm_head", "model.norm")) for k in edge)
    assert {k.split(".")[2] for k in cloud if k.startswith("model.layers.")} == {"2", "3"}
    assert "lm_head.weight" in cloud and "model.norm.weight" in cloud
    assert edge["model.embed_tokens.codes"].dtype == torch.uint8  # 8-bit embedding


def test_predicted_shard_bytes_exact(shard_dir, tiny_lm):
    parts = decoder_parts(tiny_lm.model)
    spec = QuantSpec(2, 4, None, None, "front", 32, 8, 8)
    assert predicted_edge_bytes(parts, spec) == payload_bytes(shard_dir / EDGE_FILE)
    assert predicted_cloud_bytes(parts, 2) == payload_bytes(shard_dir / CLOUD_FILE)


def test_edge_process_holds_exactly_the_edge_shard(shard_dir):
    edge = load_edge(shard_dir)
    n_qmeta = sum(1 for k in read_tensors(shard_dir / EDGE_FILE)[0] if k.endswith(".qmeta"))
    rotary = sum(b.untyped_storage().nbytes() for b in edge.model.model.rotary_emb.buffers())
    # qmeta (6 x int32 per quantized module) is read and dropped; rotary tables are computed
    assert resident_bytes(edge.model) == payload_bytes(shard_dir / EDGE_FILE) - 24 * n_qmeta + rotary
    parts = edge.half.parts
    assert all(p.is_meta for i in (2, 3) for p in parts.layers[i].parameters())
    assert parts.lm_head.weight.is_meta and parts.norm.weight.is_meta


def test_edge_loader_never_opens_cloud_shard(shard_dir, tmp_path):
    d = _copy(shard_dir, tmp_path / "d")
    (d / CLOUD_FILE).unlink()
    edge = load_edge(d)
    assert edge.manifest.split_layer == 2
    with pytest.raises(SplitLLMError, match="missing"):
        load_cloud(d)
    d2 = _copy(shard_dir, tmp_path / "d2")
    (d2 / EDGE_FILE).unlink()
    load_cloud(d2)


def test_shard_reload_equals_in_memory_quantized_model(shard_dir, tiny_lm):
    from splitcli.quant import QuantEmbedding, quantize_layers_

    # the same quantization done in memory on a copy of the float model
    import copy

    model = copy.deepcopy(tiny_lm.model)
    parts = decoder_parts(model)
    quantize_layers_(parts.layers, [0, 1], 4, 32)
    model.model.embed_tokens = QuantEmbedding.from_embedding(parts.embed_tokens, bits=8)
    parts = decoder_parts(model)
    ids = torch.randint(0, 49152, (2, 7), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(7).expand(2, 7)
    ref_hidden = EdgeHalf(parts, 2)(ids, pos, None, None)
    ref_logits = CloudHalf(parts, 2)(ref_hidden, pos, None, None)
    edge, cloud = load_edge(shard_dir), load_cloud(shard_dir)
    hidden = edge.half(ids, pos, None, None)
    assert torch.equal(hidden, ref_hidden)
    assert torch.equal(cloud.half(hidden, pos, None, None), ref_logits)
    # and through a session with the quantized KV cache: prefill + decode runs and is finite
    s = SplitSession.from_halves(edge.half, cloud.half)
    assert type(s.edge_cache).__name__ == "QuantizedKVCache"
    out = s.forward(ids[:1, :5])
    out = s.forward(ids[:1, 5:6])
    assert out.shape == (1, 1, 49152) and torch.isfinite(out).all()


def test_deterministic_output(tiny_lm, tiny_model_dir, tmp_path):
    spec = QuantSpec(1, 3, 8, 2, "front", 32, 8, 16)
    a = write_shards(tiny_lm, tiny_model_dir, spec, tmp_path / "a")
    write_shards(tiny_lm, tiny_model_dir, spec, tmp_path / "b")
    assert a.layer_bits == (3, 3, 8, 8)
    assert dir_digest(tmp_path / "a") == dir_digest(tmp_path / "b")
    # writing in place with force reproduces the same bytes too
    write_shards(tiny_lm, tiny_model_dir, spec, tmp_path / "a", force=True)
    assert dir_digest(tmp_path / "a") == dir_digest(tmp_path / "b")
    assert predicted_edge_bytes(decoder_parts(tiny_lm.model), spec) == payload_bytes(tmp_path / "a" / EDGE_FILE)


def test_back_method_and_embed16(tiny_lm, tiny_model_dir, tmp_path):
    spec = QuantSpec(2, 4, 16, 1, "back", 32, 16, 16)
    m = write_shards(tiny_lm, tiny_model_dir, spec, tmp_path / "b")
    assert m.layer_bits == (16, 16, 16, 4)
    edge = load_edge(tmp_path / "b")
    assert torch.equal(edge.half.parts.embed_tokens.weight, tiny_lm.model.model.embed_tokens.weight)
    assert predicted_edge_bytes(decoder_parts(tiny_lm.model), spec) == payload_bytes(tmp_path / "b" / EDGE_FILE)
    with pytest.raises(SplitLLMError, match="keeps no copy"):
        QuantSpec(2, 4, None, 1, "back").layer_bits(4)


def _edit_manifest(d: Path, **changes):
    m = yaml.safe_load((d / MANIFEST_FILE).read_text())
    m.update(changes)
    (d / MANIFEST_FILE).write_text(yaml.safe_dump(m))


def test_bad_shards_refused(shard_dir, tmp_path):
    d = _copy(shard_dir, tmp_path / "trunc")
    data = (d / EDGE_FILE).read_bytes()
    (d / EDGE_FILE).write_bytes(data[:-100])
    with pytest.raises(SplitLLMError, match="truncated"):
        load_edge(d)
    _edit_manifest(d, files={**yaml.safe_load((d / MANIFEST_FILE).read_text())["files"],
                             EDGE_FILE: {"bytes": len(data) - 100, "sha256": "0" * 64}})
    with pytest.raises(SplitLLMError, match="sha256"):
        load_edge(d)

    d = _copy(shard_dir, tmp_path / "tamper")
    raw = bytearray((d / CLOUD_FILE).read_bytes())
    raw[-1] ^= 1
    (d / CLOUD_FILE).write_bytes(bytes(raw))
    with pytest.raises(SplitLLMError, match="sha256"):
        load_cloud(d)

    d = _copy(shard_dir, tmp_path / "hash")
    _edit_manifest(d, model_sha256="ab" * 32)
    with pytest.raises(SplitLLMError, match="model_sha256"):
        load_edge(d)
    with pytest.raises(SplitLLMError, match="different model"):
        load_edge(shard_dir, model_sha256="cd" * 32)

    d = _copy(shard_dir, tmp_path / "ell")
    _edit_manifest(d, split_layer=3)
    with pytest.raises(SplitLLMError, match="split_layer"):
        load_cloud(d)
    with pytest.raises(SplitLLMError, match="ℓ=2, not 3"):
        load_edge(shard_dir, split_layer=3)

    d = _copy(shard_dir, tmp_path / "version")
    _edit_manifest(d, format_version=99)
    with pytest.raises(SplitLLMError, match="version 99"):
        load_edge(d)
    # version 1 may hold int4 codes in the writer's CPU layout: refused, with the fix named
    _edit_manifest(d, format_version=1)
    for load in (load_edge, load_cloud):
        with pytest.raises(SplitLLMError, match=r"version 1 is not supported \(its int4.*re-run `splitllm quantize`"):
            load(d)
    r = runner.invoke(app, ["generate", "--shards", str(d), "--prompt", "hi", "-n", "1"])
    assert r.exit_code == 2 and "re-run `splitllm quantize`" in r.output and "Traceback" not in r.output
    # version 2 stored 8-bit weights group-wise, which the int8 kernel cannot run: refused too
    _edit_manifest(d, format_version=2)
    for load in (load_edge, load_cloud):
        with pytest.raises(SplitLLMError, match=r"version 2 is not supported \(its 8-bit.*re-run `splitllm quantize`"):
            load(d)
    (d / MANIFEST_FILE).unlink()
    with pytest.raises(SplitLLMError, match="manifest.yaml"):
        load_cloud(d)


def test_cli_refuses_existing_out_and_bad_flags(shard_dir, tiny_model_dir, tmp_path):
    r = runner.invoke(app, ["quantize", "-m", str(tiny_model_dir), *ARGS, "--out", str(shard_dir)])
    assert r.exit_code == 2 and "--force" in r.output and "Traceback" not in r.output
    for extra, msg in ((["--back-bits", "five"], "--back-bits"), (["--front-bits", "5"], "weight bits"),
                       (["--kv-bits", "2"], "--kv-bits"), (["--method", "middle"], "--method"),
                       (["--group-size", "48"], "group size"), (["-l", "9"], "split layer")):
        r = runner.invoke(app, ["quantize", "-m", str(tiny_model_dir), *ARGS, *extra, "--out", str(tmp_path / "x")])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (extra, r.output)


def test_generate_from_shards(shard_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "g.json"
    r = runner.invoke(app, ["generate", "--shards", str(shard_dir), "-p", "Hello", "-n", "4", "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["split_layer"] == 2 and len(data["tokens"]) == 4 and data["shards"] == str(shard_dir)
    r = runner.invoke(app, ["generate", "--shards", str(shard_dir), "-m", str(tiny_model_dir), "-p", "Hi", "-n", "2"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["generate", "--shards", str(shard_dir), "-l", "1", "-p", "Hi", "-n", "2"])
    assert r.exit_code == 2 and "ℓ=2, not 1" in r.output


def test_edge_state_dict_leaves_model_untouched(tiny_lm):
    parts = decoder_parts(tiny_lm.model)
    before = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    edge_state_dict(parts, QuantSpec(2, 4, None, None, "front", 32, 8, 16))
    after = tiny_lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert type(parts.layers[0].mlp.up_proj).__name__ == "Linear"


def test_quantize_from_plan(tiny_model_dir, tmp_path):
    """`quantize --config plan.yaml` takes ℓ, ℓw, bits, group and Qa from the plan; explicit flags win."""
    from typer.testing import CliRunner

    from splitcli.cli import app
    from splitcli.model.shards import read_manifest
    from splitcli.plan.schema import Budgets, CodecSettings, Plan

    plan = Plan(model_id=str(tiny_model_dir), n_layers=4, split_layer=2, l_w=2, method="front", q_w1=4, q_w2=None,
                qa=8, codec=CodecSettings(q_bar=6, delta=0.05, tau_quantile=0.999), group_size=32, max_tokens=64,
                budgets=Budgets(memory_bytes=10**7, max_accuracy_drop=0.01), embed_bits=16)
    path = tmp_path / "plan.yaml"
    plan.save(path)
    r = CliRunner().invoke(app, ["quantize", "--config", str(path), "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "a")
    assert (m.split_layer, m.l_w, m.front_bits, m.group_size, m.kv_bits, m.embed_bits) == (2, 2, 4, 32, 8, 16)
    r = CliRunner().invoke(app, ["quantize", "--config", str(path), "-l", "3", "--lw", "3", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert (read_manifest(tmp_path / "b").split_layer, read_manifest(tmp_path / "b").l_w) == (3, 3)
