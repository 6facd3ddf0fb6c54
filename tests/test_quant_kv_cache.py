import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from splitcli.errors import SplitLLMError
from splitcli.quant import (
    KVQuantConfig,
    QuantizedKVCache,
    QuantizedKVLayer,
    fp_kv_bytes_per_token,
    kv_bytes_per_token,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval()


def decode_logits(model, cache, ids, steps):
    """Prefill ids[:, :-steps], then feed the rest one token at a time (teacher forcing, so both
    caches see the same tokens); logits of every step."""
    prompt = ids.shape[1] - steps
    out = []
    with torch.no_grad():
        r = model(ids[:, :prompt], cache=cache, use_cache=True)
        out.append(r.logits[:, -1])
        for t in range(prompt, ids.shape[1]):
            r = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            out.append(r.logits[:, -1])
    return torch.stack(out, 1)  # [batch, steps + 1, vocab]


@pytest.mark.parametrize("bits,tol", [(8, 0.01), (4, 0.1)])
def test_logits_close_to_fp_cache(model, bits, tol):
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    ref = decode_logits(model, DynamicCache(), ids, 6)
    cache = QuantizedKVCache(KVQuantConfig(bits=bits))
    got = decode_logits(model, cache, ids, 6)
    err = float((got - ref).abs().max() / ref.abs().max())
    assert err < tol
    assert err > 0  # it really is quantized
    assert cache.get_seq_length() == 13


def test_eight_bit_tighter_than_four(model):
    ids = torch.randint(0, 96, (1, 13), generator=torch.Generator().manual_seed(2))
    ref = decode_logits(model, DynamicCache(), ids, 4)
    e8 = (decode_logits(model, QuantizedKVCache(KVQuantConfig(bits=8)), ids, 4) - ref).abs().max()
    e4 = (decode_logits(model, QuantizedKVCache(KVQuantConfig(bits=4)), ids, 4) - ref).abs().max()
    assert e8 < e4


def test_generate_runs(model):
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(3))
    cache = QuantizedKVCache(KVQuantConfig(bits=4))
    out = model.generate(ids, cache=cache, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 11)
    assert cache.get_seq_length() == 10  # the last generated token is never fed back


@pytest.mark.parametrize("bits,group,scale", [(8, None, "float16"), (4, None, "float16"), (4, 4, "float32"), (2, 8, "float16"), (3, None, "float32")])
def test_memory_matches_formula(model, bits, group, scale):
    cfg = KVQuantConfig(bits=bits, group_size=group, scale_dtype=scale)
    cache = QuantizedKVCache(cfg)
    ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        model(ids[:, :1], cache=cache, use_cache=True)
    per_token = kv_bytes_per_token(2, 2, 16, cfg)
    assert cache.nbytes() == 3 * 11 * per_token


def test_bytes_per_token_hand_computed():
    # SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64
    assert kv_bytes_per_token(30, 3, 64, KVQuantConfig(bits=8)) == 30 * 2 * 3 * (64 + 4)
    assert kv_bytes_per_token(30, 3, 64, KVQuantConfig(bits=4)) == 30 * 2 * 3 * (32 + 4)
    assert kv_bytes_per_token(1, 1, 64, KVQuantConfig(bits=4, group_size=32, scale_dtype="float32")) == 2 * (32 + 16)
    assert fp_kv_bytes_per_token(30, 3, 64) == 30 * 2 * 3 * 64 * 4
    with pytest.raises(SplitLLMError):
        kv_bytes_per_token(1, 1, 64, KVQuantConfig(bits=4, group_size=48))


def test_config_validation():
    for bad in [dict(bits=16), dict(bits=1), dict(group_size=0), dict(scale_dtype="bf8"), dict(version=0)]:
        with pytest.raises(SplitLLMError):
            KVQuantConfig(**bad)


def test_layer_constant_and_zero_exact_and_crop():
    layer = QuantizedKVLayer(KVQuantConfig(bits=4))
    k = torch.zeros(1, 2, 3, 8)
    v = torch.full((1, 2, 3, 8), 1.5)
    k_out, v_out = layer.update(k, v)
    assert torch.equal(k_out, k) and torch.equal(v_out, v)
    k2 = torch.randn(1, 2, 2, 8)
    k_out, v_out = layer.update(k2, k2)
    assert k_out.shape == (1, 2, 5, 8) and torch.equal(k_out[..., :3, :], k)
    assert layer.get_seq_length() == 5
    layer.crop(-2)
    assert layer.get_seq_length() == 3
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.nbytes() == 0


def test_non_finite_kv_propagates_instead_of_becoming_finite():
    # no per-step check (a host sync): a NaN makes its group NaN, as a float cache would carry it
    layer = QuantizedKVLayer(KVQuantConfig(bits=8))
    k = torch.zeros(1, 2, 1, 8)
    k[0, 0, 0, 3] = float("nan")
    k_out, v_out = layer.update(k, torch.ones(1, 2, 1, 8))
    assert bool(k_out[0, 0].isnan().all()) and torch.equal(k_out[0, 1], k[0, 1]) and torch.equal(v_out, torch.ones(1, 2, 1, 8))
    k_out, _ = layer.update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))
    assert bool(k_out[0, 0, 0].isnan().all()) and bool((k_out[0, 0, 1] == 0).all())  # later tokens unaffected


def test_batch_select_and_repeat():
    layer = QuantizedKVLayer(KVQuantConfig(bits=8))
    k = torch.randn(2, 1, 3, 8)
    k_all, _ = layer.update(k, k)
    layer.batch_select_indices(torch.tensor([1]))
    layer.batch_repeat_interleave(2)
    k_new, _ = layer.update(torch.zeros(2, 1, 1, 8), torch.zeros(2, 1, 1, 8))
    assert torch.equal(k_new[0, :, :3], k_all[1]) and torch.equal(k_new[1, :, :3], k_all[1])
