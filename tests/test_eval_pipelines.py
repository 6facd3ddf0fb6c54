"""Pipelines and baselines on a tiny model: exactness with compression off, baselines perturb but
stay finite, and the fake-quantization math on hand tensors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitcli.errors import SplitLLMError
from splitcli.eval.baselines import (
    atom_fake_quant, atom_keep_channels, fake_quant_groups, fake_quant_per_token, smooth_factors,
)
from splitcli.eval.pipelines import BASELINES, PipelineConfig, build_pipeline, cache_key, resolve
from splitcli.eval.toy import tiny_llama, toy_tokenizer
from splitcli.plan.codec_settings import CodecSettings

_WORDS = ("the quick brown fox jumps over the lazy dog while a man is sitting on a roof and "
          "Sarah was a much better surgeon than Maria so the capital of France is Paris ").split()


@pytest.fixture(scope="module")
def lm():
    tok = toy_tokenizer()
    model = tiny_llama(len(tok), layers=4, hidden=64)
    return SimpleNamespace(model=model, tokenizer=tok, sha256="tiny", model_id="tiny")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A synthetic WikiText-2 file, long enough for the 2048-token calibration slice."""
    root = tmp_path_factory.mktemp("data")
    (root / "wikitext2").mkdir()
    g = torch.Generator().manual_seed(0)
    words = [_WORDS[i] for i in torch.randint(0, len(_WORDS), (6000,), generator=g).tolist()]
    (root / "wikitext2" / "wiki.test.raw").write_text(" ".join(words))
    return root


def _batch(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0  # right padding, as the evaluator batches
    mask[2, 3:] = 0
    return ids, mask


def _real(logits, mask):
    return logits[mask.bool()]  # [real tokens, V]: padded positions are never read


def test_split_with_compression_off_equals_fp(lm, data_dir):
    ids, mask = _batch(len(lm.tokenizer))
    fp = build_pipeline(lm, PipelineConfig("fp")).logits_fn(ids, mask)
    for ell in (1, 2, 3):
        cfg = PipelineConfig("split", split_layer=ell, q_w1=16, codec="none")
        assert cfg.compression_off
        split = build_pipeline(lm, cfg, data_dir).logits_fn(ids, mask)
        assert torch.equal(_real(split, mask), _real(fp, mask)), f"split at {ell} differs from fp"
    local = build_pipeline(lm, PipelineConfig("local", q_w1=16)).logits_fn(ids, mask)
    assert torch.equal(_real(local, mask), _real(fp, mask))


def test_split_and_local_quantize_only_their_layers(lm, data_dir):
    ids, mask = _batch(len(lm.tokenizer))
    fp = _real(build_pipeline(lm, PipelineConfig("fp")).logits_fn(ids, mask), mask)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    split = build_pipeline(lm, PipelineConfig("split", split_layer=2, codec="none"), data_dir)
    assert split.info["weight_bits"] == [4, 4, None, None]
    local = build_pipeline(lm, PipelineConfig("local", split_layer=2, q_w2=8))
    assert local.info["weight_bits"] == [4, 4, 8, 8]
    for p in (split, local):
        out = _real(p.logits_fn(ids, mask), mask)
        assert torch.isfinite(out).all() and not torch.equal(out, fp)
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "building a pipeline changed the loaded model"


def test_split_with_codec_changes_logits_a_little(lm, data_dir):
    pytest.importorskip("splitcli.runtime.codec_wire")
    ids, mask = _batch(len(lm.tokenizer))
    fp = _real(build_pipeline(lm, PipelineConfig("fp")).logits_fn(ids, mask), mask)
    p = build_pipeline(lm, PipelineConfig("split", split_layer=2, q_w1=16, codec_settings=CodecSettings(q_bar=3, entropy=False)), data_dir)
    out = _real(p.logits_fn(ids, mask), mask)
    assert p.info["wire"] == "tabq" and torch.isfinite(out).all()
    assert not torch.equal(out, fp)


def test_split_with_the_predictive_codec(lm, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    ids, mask = _batch(len(lm.tokenizer))                     # rows of a batch, right padding
    fp = _real(build_pipeline(lm, PipelineConfig("fp")).logits_fn(ids, mask), mask)
    cfg = PipelineConfig("split", split_layer=2, q_w1=16, codec="predictive")
    p = build_pipeline(lm, cfg, data_dir)
    out = _real(p.logits_fn(ids, mask), mask)
    assert p.info["wire"] == "predictive" and p.info["codec"]["frame_version"] == 4 and torch.isfinite(out).all()
    assert not torch.equal(out, fp)
    assert (out.argmax(-1) == fp.argmax(-1)).float().mean() > 0.5
    tabq = resolve(PipelineConfig("split", split_layer=2, q_w1=16), lm.model)
    key = cache_key(resolve(cfg, lm.model), "m")
    assert key != cache_key(tabq, "m") and "predictive" in resolve(cfg, lm.model).relevant()
    # results cached when the codec predicted from the exact table are not today's
    assert "table rows8" in resolve(cfg, lm.model).relevant()["predictive"]


@pytest.mark.parametrize("name", BASELINES)
def test_each_baseline_changes_logits_but_keeps_them_finite(lm, data_dir, name):
    ids, mask = _batch(len(lm.tokenizer))
    fp = _real(build_pipeline(lm, PipelineConfig("fp")).logits_fn(ids, mask), mask)
    p = build_pipeline(lm, PipelineConfig(name, calib_tokens=64), data_dir)
    out = _real(p.logits_fn(ids, mask), mask)
    assert torch.isfinite(out).all()
    assert not torch.equal(out, fp)
    # Still the same model, roughly: the top token agrees on most positions.
    assert (out.argmax(-1) == fp.argmax(-1)).float().mean() > 0.5
    if name.startswith("atom"):
        assert p.info["keep_channels"] == 2  # round(64 * 128 / 4096)


def test_cache_key_depends_only_on_what_changes_numbers(lm):
    a = resolve(PipelineConfig("fp", codec_settings=CodecSettings(q_bar=3, entropy=False)), lm.model)
    b = resolve(PipelineConfig("fp", codec_settings=CodecSettings(q_bar=4, entropy=False)), lm.model)
    assert cache_key(a, "m") == cache_key(b, "m") != cache_key(a, "other-weights")
    s3 = resolve(PipelineConfig("split", codec_settings=CodecSettings(q_bar=3, entropy=False)), lm.model)
    s4 = resolve(PipelineConfig("split", codec_settings=CodecSettings(q_bar=4, entropy=False)), lm.model)
    assert cache_key(s3, "m") != cache_key(s4, "m")
    assert s3.split_layer == 2 and s3.l_w == 2 and s3.group_size == 64  # L // 2 and the model's group
    explicit = resolve(PipelineConfig("split", codec_settings=CodecSettings(q_bar=3, entropy=False), split_layer=2, l_w=2, group_size=64), lm.model)
    assert cache_key(explicit, "m") == cache_key(s3, "m")


@pytest.mark.parametrize("kwargs, message", [
    (dict(pipeline="nope"), "unknown pipeline"),
    (dict(pipeline="split", codec="zip"), "--codec"),
    (dict(pipeline="split", codec_settings="q_bar=3"), "CodecSettings"),
    (dict(pipeline="smoothquant-w4a4", alpha=1.5), "alpha"),
    (dict(pipeline="split", split_layer=0), "--split-layer"),
])
def test_bad_configs_are_one_line_errors(kwargs, message):
    with pytest.raises(SplitLLMError, match=message):
        PipelineConfig(**kwargs)


def test_split_layer_out_of_range(lm):
    with pytest.raises(SplitLLMError):
        resolve(PipelineConfig("split", split_layer=4), lm.model)


# ---- the fake-quantization math on hand tensors -----------------------------------------------

def test_atom_keeps_exactly_the_chosen_channels_at_8_bits():
    x = torch.tensor([[0.1, -0.2, 0.3, 100.0, 0.05, -0.4, 0.25, -50.0],
                      [0.0, 0.5, -0.5, -80.0, 0.2, 0.1, -0.3, 20.0]])  # [tokens, channels]
    meansq = x.pow(2).mean(0)
    keep = atom_keep_channels(meansq, 2)
    assert keep.tolist() == [3, 7]
    out = atom_fake_quant(x, keep, bits=3, group_size=3)
    # kept channels: symmetric 8-bit per token over the kept channels only
    kept = x[:, [3, 7]]
    step = kept.abs().amax(-1, keepdim=True) / 127
    assert torch.equal(out[:, [3, 7]], torch.round(kept / step) * step)
    assert (out[:, [3, 7]] - kept).abs().le(step / 2 + 1e-6).all()
    # the 6 normal channels, in order, in groups of 3 at 3 bits, never seeing the outliers
    normal = x[:, [0, 1, 2, 4, 5, 6]]
    assert torch.equal(out[:, [0, 1, 2, 4, 5, 6]], fake_quant_groups(normal, 3, 3))
    assert (out[:, [0, 1, 2, 4, 5, 6]] - normal).abs().max() <= 1.0 / 7 / 2 + 1e-6  # widest normal group spans 1.0


def test_atom_with_no_kept_channels_is_plain_group_quant():
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(atom_fake_quant(x, atom_keep_channels(x.pow(2).mean(0), 0), 4, 4), fake_quant_groups(x, 4, 4))


def test_group_fake_quant_hand_values():
    # 2 bits over [0, 3]: four levels 0, 1, 2, 3 reproduce the input exactly
    assert torch.equal(fake_quant_groups(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), 2, 4), torch.tensor([[0.0, 1.0, 2.0, 3.0]]))
    # a short last group (5 = 4 + 1): a one-value group is exact; constant groups stay exact
    x = torch.tensor([[0.0, 0.4, 0.6, 3.0, -7.5]])
    out = fake_quant_groups(x, 2, 4)
    assert out[0, 4] == -7.5 and torch.allclose(out[0, :4], torch.tensor([0.0, 0.0, 1.0, 3.0]))
    assert torch.equal(fake_quant_groups(torch.full((2, 6), 2.5), 3, 3), torch.full((2, 6), 2.5))
    assert fake_quant_groups(torch.empty(3, 0), 4, 4).shape == (3, 0)


def test_per_token_fake_quant_hand_values():
    x = torch.tensor([[7.0, -7.0, 3.4, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = fake_quant_per_token(x, 4)  # qmax 7: step 1 in row 0; an all-zero row stays zero
    assert torch.equal(out, torch.tensor([[7.0, -7.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    huge = torch.tensor([[3e38, -3e38, 1.0]])
    assert torch.isfinite(fake_quant_per_token(huge, 4)).all()


def test_smooth_factors_hand_values():
    act = torch.tensor([4.0, 1.0, 0.0])
    w = torch.tensor([[1.0, -4.0, 0.0], [0.5, 2.0, 0.0]])  # column absmax [1, 4, 0]
    s = smooth_factors(act, w, 0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 0.5]))
    assert math.isfinite(s[2].item()) and s[2] > 0  # dead channel: floored, no division by zero
    assert torch.allclose(smooth_factors(act, w, 1.0)[:2], act[:2])


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.integers(1, 6), st.integers(1, 12),
       st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_group_fake_quant_error_within_half_a_step(bits, group, channels, scale, seed):
    x = torch.randn(3, channels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    out = fake_quant_groups(x, bits, group)
    for start in range(0, channels, group):
        g, o = x[:, start:start + group], out[:, start:start + group]
        step = (g.amax(-1) - g.amin(-1)) / (2**bits - 1)
        assert ((o - g).abs().amax(-1) <= step / 2 + 1e-9 * scale).all()
