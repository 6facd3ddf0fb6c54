"""The one-token C step (quant/decode_step.c, driven by model/fast.py): which layers take it, that it
computes what the torch path does, its fallbacks (NaN / inf inputs, threads, disabled()) and its
operand checks. The real-model bounds against the eager split are in test_decode_fast.py."""

import dataclasses

import pytest
import torch

from splitcli.deploy import SplitSpec, build_split
from splitcli.model import fast, fused
from splitcli.model.split import decoder_parts
from splitcli.quant import decode_step, kernels
from splitcli.quant.decode_step import DecodeStep, Product
from splitcli.runtime.fast import FastUnsplitSession, fast_split_session
from tests.conftest import _tiny
from tests.test_decode_fast import _lm, _logits_run

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"no splitllm kernels: {kernels.why_unavailable()}")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, fast.STEP_MAX_THREADS))
    yield
    torch.set_num_threads(before)


def _ids(n=8, seed=3):
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _runs(split, steps=6):
    """(C step, torch path) logits of the same prompt and greedy steps on two fresh sessions."""
    ids = _ids()
    c = _logits_run(fast_split_session(split), ids, None, steps)
    with decode_step.disabled():
        t = _logits_run(fast_split_session(split), ids, None, steps)
    return c, t


@needs_kernels
@pytest.mark.parametrize("q_w1, act", [(16, 16), (4, 16), (8, 16), (4, 8)])
def test_the_c_step_computes_what_the_torch_path_does(two_threads, q_w1, act):
    split = build_split(_lm(_tiny("llama")), SplitSpec(split_layer=2, q_w1=q_w1, qa=16, edge_act_bits=act))
    s = fast_split_session(split)
    assert s.edge.layers.step is not None and s.cloud.layers.step is not None, s.edge.layers.step_why
    c, t = _runs(split)
    assert torch.equal(c[0], t[0])  # the prompt runs on the torch path in both
    diffs = [float((x - y).abs().max()) for x, y in zip(c[1:], t[1:])]
    # float: only sums in another order (measured ~1e-7 on this model); the quantized products'
    # int16 input rounding can flip on such a difference (tiny model: no outlier channels)
    # (8-bit input: a level is 1/127 of a group's largest |x|; measured 1.1e-3 here)
    assert 0 < max(diffs) <= (1e-5 if q_w1 == 16 else 1e-4 if act == 16 else 5e-3), diffs


@needs_kernels
def test_the_split_equals_the_unsplit_model_bit_for_bit_on_the_c_step(two_threads):
    model = _tiny("llama")
    split = build_split(_lm(model), SplitSpec(split_layer=2, wire="none"))
    ids = _ids()
    a = _logits_run(fast_split_session(split), ids, None, 6)
    unsplit = FastUnsplitSession(model)
    assert unsplit.model.layers.step is not None
    b = _logits_run(unsplit, ids, None, 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@needs_kernels
def test_layers_the_c_step_cannot_take_say_why_and_run_on_torch(two_threads):
    parts = decoder_parts(_tiny("qwen2"))  # q/k/v biases
    layers = fast.FastLayers(parts, 0, 2)
    assert layers.step is None and "biases" in layers.step_why
    with kernels.disabled():
        split = build_split(_lm(_tiny("llama")), SplitSpec(split_layer=2, q_w1=4, qa=16))  # torch's int4 layout
        why = fast_split_session(split).edge.layers.step_why
    # torch's int4 pack is private to the CPU: in AVX-512's 64-row tiles the tiny model's 32-row k and
    # v cannot be views of one fused product, so its q / k / v stay three modules (model/fused.py)
    tiles64 = torch.backends.cpu.get_cpu_capability() == "AVX512"
    assert "torch's kernel" in why or (tiles64 and "outside model.fused" in why), why
    o_proj = split.edge.parts.layers[0].self_attn.o_proj  # one module: always its own product
    assert o_proj.layout == "torch" and fast._product(fused.residual_call(o_proj)) == "int4 weights on torch's kernel"


@needs_kernels
def test_more_threads_than_the_step_takes_run_the_torch_path():
    split = build_split(_lm(_tiny("llama")), SplitSpec(split_layer=2, q_w1=16, qa=16))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(fast.STEP_MAX_THREADS + 1)
        c, t = _runs(split)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(x, y) for x, y in zip(c, t))


@needs_kernels
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_an_input_a_quantized_product_refuses_reruns_on_the_torch_path(two_threads, bad):
    split = build_split(_lm(_tiny("llama")), SplitSpec(split_layer=2, q_w1=4, qa=16))
    edge = fast_split_session(split).edge
    ids = _ids()

    @torch.inference_mode()  # as the halves run their layers
    def run():
        cache = edge.new_cache(32)
        edge.layers(edge.parts.embed_tokens(ids), torch.arange(8)[None], None, cache)
        h = edge.parts.embed_tokens(ids[:, -1:]).clone()
        h[0, 0, 5] = bad
        out = edge.layers(h, torch.tensor([[8]]), None, cache)
        return out, cache

    got, c1 = run()
    with decode_step.disabled():
        want, c2 = run()
    assert c1.length == c2.length == 9
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))  # the torch path's result exactly
    for a, b in ((c1.k, c2.k), (c1.v, c2.v)):
        assert torch.equal(torch.nan_to_num(a[:, :, :, :9]), torch.nan_to_num(b[:, :, :, :9]))


@needs_kernels
def test_a_cache_that_grows_mid_generation_keeps_the_c_step_right(two_threads):
    split = build_split(_lm(_tiny("llama")), SplitSpec(split_layer=2, q_w1=16, qa=16))
    ids = _ids()
    small = fast_split_session(split)
    small.edge_cache, small.cloud_cache = small.edge.new_cache(9), small.cloud.new_cache(9)  # grows at step 2
    a = _logits_run(small, ids, None, 6)
    b = _logits_run(fast_split_session(split), ids, None, 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_rotary_rows_past_the_table_grow_it_to_the_models_values():
    layers = fast.FastLayers(decoder_parts(_tiny("llama")), 0, 1)
    rope = layers.rope
    n = rope.table[0].shape[0]
    cos, sin = rope.row(n + 5)
    assert rope.table[0].shape[0] > n + 5
    c2, s2 = rope(torch.tensor([[n + 5]]))
    assert torch.equal(cos, c2[0, 0, 0]) and torch.equal(sin, s2[0, 0, 0])


@needs_kernels
def test_operands_that_do_not_fit_are_refused_before_any_c_code_runs():
    w = torch.randn(64, 48)
    with pytest.raises(ValueError, match="N % 16"):
        Product("float", 64, 40, torch.randn(64, 40))
    with pytest.raises(ValueError, match="contiguous"):
        Product("float", 48, 64, torch.randn(64, 48).t())
    with pytest.raises(ValueError, match="int8"):
        Product("int8", 64, 16, torch.zeros(16, 64, dtype=torch.int8), torch.zeros(15, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="unknown kind"):
        Product("int3", 64, 16, w)
    split = build_split(_lm(_tiny("llama")), SplitSpec(split_layer=2, q_w1=16, qa=16))
    layers = fast_split_session(split).edge.layers
    step: DecodeStep = layers.step
    cache = layers.new_cache(8)
    cache.reserve(1, 1)
    cos, sin = layers.rope.row(0)
    x = torch.zeros(64)
    for bad in ({"x": torch.zeros(63)}, {"pos": 8}, {"pos": -1}, {"k": cache.k[:, :, :1]},
                {"x": torch.zeros(64, dtype=torch.float64)}, {"cos": cos[:8]}, {"v": None}):
        args = dict(x=x, cos=cos, sin=sin, k=cache.k, v=cache.v, pos=0) | bad
        with pytest.raises(ValueError, match="do not fit"):
            step(**args)


@needs_kernels
@pytest.mark.parametrize("rows,d,g", [(1, 64, 64), (3, 64, 32), (7, 16, 16), (200, 64, 64), (5, 128, 8)])
@pytest.mark.parametrize("scale", [1.0, 1e-3, 300.0, 1e-6])
def test_the_steps_8_bit_kv_quantizer_is_quantize_kv_bit_for_bit(rows, d, g, scale):
    from splitcli.quant.rtn import quantize_kv

    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(rows + d)) * scale
    x[0] += 50 * scale  # a row far from zero
    x[-1, :g] = 0.25  # a constant group
    if rows > 2:
        x[1] = 0.0  # an all-zero row
    q, s, z, left = decode_step.kv8_quantize_rows(x, g)
    tq, ts, tz = quantize_kv(x, 8, g, torch.float16)
    assert left == 0
    assert torch.equal(q, tq) and torch.equal(s, ts) and torch.equal(z, tz)


@needs_kernels
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e6])  # 1e6: a zero past fp16's range
def test_rows_the_8_bit_kv_quantizer_cannot_store_are_left_to_torch(bad):
    x = torch.randn(3, 64)
    x[1, 7] = bad
    if bad == 1e6:
        x[1] = bad
    q, s, z, left = decode_step.kv8_quantize_rows(x, 32)
    assert left == 1


@needs_kernels
@pytest.mark.parametrize("q_w1", [16, 4])
def test_an_8_bit_kv_edge_runs_the_c_step_near_the_torch_path(two_threads, q_w1, monkeypatch):
    split = build_split(_lm(_tiny("llama")), SplitSpec(split_layer=2, q_w1=q_w1, qa=8))
    s = fast_split_session(split)
    assert type(s.edge_cache).__name__ == "QuantStaticKV" and s.edge_cache.bits == 8
    step, calls = s.edge.layers.step, []

    def counted(*args, **kw):  # the edge's own steps, on its 8-bit cache (the cloud's is float)
        calls.append(sorted(kw))
        return step(*args, **kw)

    monkeypatch.setattr(s.edge.layers, "step", counted)
    c, t = _runs(split)
    assert calls and all(kw == ["codes", "group", "scales", "zeros"] for kw in calls)
    diffs = [float((x - y).abs().max()) for x, y in zip(c[1:], t[1:])]
    assert 0 < max(diffs) <= 1e-4, diffs  # measured <= 2.4e-5 (float sums in another order, as above)


@needs_kernels
def test_the_8_bit_cache_operands_and_mismatched_layers_are_refused():
    split = build_split(_lm(_tiny("llama")), SplitSpec(split_layer=2, q_w1=16, qa=8))
    edge = fast_split_session(split).edge
    step, cache = edge.layers.step, edge.new_cache(8)
    cache.reserve(1, 1)
    cos, sin = edge.layers.rope.row(0)
    good = dict(codes=cache.codes, scales=cache.scales, zeros=cache.zeros, group=cache.group)
    assert step(torch.zeros(64), cos, sin, 0, **good)  # the operands as the fast path passes them
    for bad in ({"group": 0}, {"group": 3}, {"codes": cache.codes[:1]}, {"scales": cache.scales.float()},
                {"zeros": None}, {"codes": cache.codes.transpose(4, 5)}):
        with pytest.raises(ValueError, match="do not fit"):
            step(torch.zeros(64), cos, sin, 0, **(good | bad))
    ops = step.layers
    odd = dataclasses.replace(ops[1], head_dim=8, n_heads=8, n_kv=4)  # one cache cannot hold both
    assert "differ from the first layer" in DecodeStep.build([ops[0], odd], 64)[1]
    with pytest.raises(ValueError, match="decode step: layer 1"):
        DecodeStep([ops[0], odd], 64)


@needs_kernels
def test_a_one_token_prompt_runs_the_c_step_from_position_0(two_threads):
    split = build_split(_lm(_tiny("llama")), SplitSpec(split_layer=2, q_w1=4, qa=16))
    ids = _ids(1)
    c = _logits_run(fast_split_session(split), ids, None, 4)
    with decode_step.disabled():
        t = _logits_run(fast_split_session(split), ids, None, 4)
    assert 0 < max(float((x - y).abs().max()) for x, y in zip(c, t)) <= 1e-4


@needs_kernels
@pytest.mark.parametrize("q_w1", [16, 8])
def test_as_many_kv_heads_as_heads_and_a_small_head_dim(two_threads, q_w1):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    split = build_split(_lm(model), SplitSpec(split_layer=1, q_w1=q_w1, qa=16))
    assert fast_split_session(split).edge.layers.step is not None
    c, t = _runs(split)
    assert 0 < max(float((x - y).abs().max()) for x, y in zip(c[1:], t[1:])) <= 1e-4


@needs_kernels
@pytest.mark.parametrize("hidden, heads", [(144, 2), (48, 4)])
def test_head_dims_past_one_64_block_and_off_the_8_lane_grid(two_threads, hidden, heads):
    # head_dim 72: attention's 64-wide register block plus an 8-wide one; 12: the plain dot and the
    # scalar tails (D % 8 != 0). Float weights: the 8-bit kernel wants K % 64 == 0
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                         num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=256)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    split = build_split(_lm(model), SplitSpec(split_layer=1, q_w1=16, qa=16, group_size=16))  # widths % 64 != 0
    s = fast_split_session(split)
    assert s.edge.layers.step is not None and s.cloud.layers.step is not None, s.edge.layers.step_why
    c, t = _runs(split)
    assert 0 < max(float((x - y).abs().max()) for x, y in zip(c[1:], t[1:])) <= 1e-4


@needs_kernels
@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (14, 2), (6, 6)])
def test_query_heads_sharing_a_kv_head_in_blocks_of_three(two_threads, heads, kv_heads):
    # attention runs up to three query heads of one kv head together (a group of 3: one block; 7:
    # blocks of 3, 3 and a head alone; 1: multi-head attention), each head's numbers as alone; head
    # dim 48: one 32-wide block of outputs shared by the heads, then each head's 8-wide ones
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=48 * heads, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    split = build_split(_lm(model), SplitSpec(split_layer=1, q_w1=16, qa=16, group_size=8))
    s = fast_split_session(split)
    assert s.edge.layers.step is not None and s.cloud.layers.step is not None, s.edge.layers.step_why
    c, t = _runs(split)
    assert 0 < max(float((x - y).abs().max()) for x, y in zip(c[1:], t[1:])) <= 1e-4


def test_every_c_source_the_kernels_include_ships_with_the_package():
    import tomllib
    from pathlib import Path

    data = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    shipped = set(data["tool"]["setuptools"]["package-data"]["splitcli.quant"])
    assert {f.name for f in (kernels._SOURCE, *kernels._INCLUDED)} <= shipped


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # distance in units in the last place between float32 tensors of one sign (int order of the bits)
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


@needs_kernels
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000])
def test_the_steps_exp_is_within_one_ulp_of_exp(n):
    # the softmax's and SiLU's e^x (decode_step.c, exp8) against exp in double rounded once, over the
    # whole float range a step can meet: the tails (n % 8) through the same function
    g = torch.Generator().manual_seed(n)
    x = (torch.rand(n, generator=g) * 190 - 100).float()  # [-100, 90): subnormal results to overflow
    got, want = kernels.exp(x), x.double().exp().float()
    assert got.shape == (n,)
    if n:  # ulps count subnormals, 0 and inf on the same integer line as normal values
        assert int(_ulps(got, want).max()) <= 1
    dense = torch.linspace(-20, 20, 100_001)  # where softmax weights and SiLU live
    assert int(_ulps(kernels.exp(dense), dense.double().exp().float()).max()) <= 1


@needs_kernels
def test_the_steps_exp_edges():
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([nan, -inf, inf, 0.0, -0.0, 88.72, 88.73, 89.5, -103.97, -103.98, -104.5, -1e30, 1e30])
    want = torch.tensor([nan, 0.0, inf, 1.0, 1.0, float(torch.tensor(88.72).double().exp()), inf, inf,
                         1.401298464324817e-45, 0.0, 0.0, 0.0, inf])
    got = kernels.exp(x)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~want.isnan()], want[~want.isnan()]), (got, want)
