"""The handoff and Algorithm 2's KV rows on the fast decode path (runtime/fast.py FastHandoffSession,
runtime/kv_rows.py): exact against the fast unsplit model, the same tokens and bytes as the eager
HandoffSession, the fast split's cloud copy of the edge's rows, and the errors of the row API."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from splitcli.deploy import SplitSpec, build_split, handoff_session, opsc_edge_model
from splitcli.errors import SplitLLMError
from splitcli.model.fast import StaticKV
from splitcli.plan.early_exit import ExitPolicy
from splitcli.quant.static_kv import QuantStaticKV
from splitcli.runtime.adaptive import adaptive_generate, link_model_for
from splitcli.runtime.fast import FastHandoffSession, FastSplitSession, FastUnsplitSession, fast_split_session
from splitcli.runtime.generate import SamplingConfig, generate
from splitcli.runtime.handoff import HandoffSession, handoff_generate
from splitcli.runtime.kv_rows import KVPayload, KVRows, Span, install_spans, install_static_rows, static_rows
from splitcli.runtime.link import EmulatedLink, parse_link
from tests.conftest import _tiny

CFG = SamplingConfig(max_new_tokens=14)


def _lm(model):
    return SimpleNamespace(model=model, tokenizer=None, sha256="x", model_id="tiny")


def _prompt(batch=1, length=9, seed=1):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _run(session, ids, mask, steps, handoff_after=None, i_kv=1):
    """Prefill logits [B, T, V], then each greedy step's; hands off before step `handoff_after`."""
    out = [session.prefill(ids, mask, logits_to_keep=0)]
    nxt = out[-1][:, -1].argmax(-1)
    for step in range(steps):
        if step == handoff_after:
            session.handoff(i_kv)
        out.append(session.forward(nxt[:, None]))
        nxt = out[-1][:, -1].argmax(-1)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_kv_handoff_equals_the_fast_unsplit_model_bitwise(family):
    """Compression off, float edge, I_kv = 1: the local stage is the fast unsplit model's per-layer
    code and the rows cross exactly, so every logit before and after the handoff is the unsplit
    model's (max |Δ| = 0), on a left-padded batch, at every ℓ and handoff point."""
    model = _tiny(family)
    ids = _prompt(batch=3)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    reference = _run(FastUnsplitSession(model), ids, mask, 6)
    for ell in (1, 2, 3):
        split = build_split(_lm(model), SplitSpec(split_layer=ell))
        for after in (0, 1, 5):
            session = handoff_session(_lm(model), split)
            assert isinstance(session, FastHandoffSession)
            got = _run(session, ids, mask, 6, handoff_after=after)
            assert not session.local and session.report.positions == 9 + after
            for x, y in zip(reference, got):
                assert torch.equal(x, y), f"ℓ={ell} handoff after {after}"


@pytest.mark.parametrize("batch", [1, 3])
def test_hidden_state_handoff_gives_the_unsplit_tokens(batch):
    """I_kv = 0: the cloud re-processes the hidden states at ℓ as one prompt (another kernel than
    the steps that made them), so its cache is equal within float rounding and the tokens are the
    unsplit model's; a left-padded batch keeps its mask and positions through the handoff."""
    model = _tiny("llama")
    split = build_split(_lm(model), SplitSpec(split_layer=2))
    ids = _prompt(batch=batch)
    mask = torch.ones_like(ids)
    mask[1:, :4] = 0
    reference = _run(FastUnsplitSession(model), ids, mask, 8)
    got = _run(handoff_session(_lm(model), split), ids, mask, 8, handoff_after=3, i_kv=0)
    for x, y in zip(reference, got):
        assert torch.equal(x[:, -1].argmax(-1), y[:, -1].argmax(-1))
        assert float((x - y).abs().max()) <= 1e-4


def test_handoff_before_the_prompt_is_a_plain_fast_split():
    """w = 0 hands off before anything ran: nothing crosses, and the session is the fast split."""
    model = _tiny("llama")
    split = build_split(_lm(model), SplitSpec(split_layer=2))
    reference = generate(FastUnsplitSession(model), _prompt(), None, CFG).tokens
    for i_kv in (0, 1):
        session = handoff_session(_lm(model), split)
        got = handoff_generate(session, _prompt(), None, CFG, local_tokens=0, i_kv=i_kv)
        assert torch.equal(got.tokens, reference) and got.local_tokens == 0
        assert got.report.positions == 0 and got.report.total_bytes == 0
        assert session.edge_cache.length == session.cloud_cache.length == session.length


@pytest.mark.parametrize("q_w1,qa", [(4, 16), (8, 8), (4, 4)])
def test_quantized_edge_hands_off_like_the_eager_session(q_w1, qa):
    """An OPSC edge (q_w1-bit layers [0, ℓ), 8-bit [ℓ, L) locally) with a Qa-bit KV cache: the fast
    session produces the eager HandoffSession's tokens and sends the same bytes, and the edge's
    rows land in its own cache kind at the handoff."""
    model = _tiny("llama")
    spec = SplitSpec(split_layer=2, q_w1=q_w1, q_w2=8, l_w=2, qa=qa)
    split = build_split(_lm(model), spec)
    ids = _prompt(length=10)
    for i_kv in (0, 1):
        eager = HandoffSession(model, 2, wire=split.wire, edge=split.edge,
                               edge_model=opsc_edge_model(model, split.spec))
        fast = handoff_session(_lm(model), split)
        assert isinstance(fast, FastHandoffSession)
        a = handoff_generate(eager, ids, None, CFG, local_tokens=4, i_kv=i_kv)
        b = handoff_generate(fast, ids, None, CFG, local_tokens=4, i_kv=i_kv)
        assert torch.equal(a.tokens, b.tokens), f"I_kv={i_kv}"
        assert (a.report.kv_bytes, a.report.hidden_bytes, a.report.layers) == \
               (b.report.kv_bytes, b.report.hidden_bytes, b.report.layers)
        assert isinstance(fast.edge_cache, QuantStaticKV if qa < 16 else StaticKV)
        assert fast.edge_cache.length == fast.length
        # every logit, before and after the handoff, near the eager session's (as the fast split is)
        eager = HandoffSession(model, 2, wire=split.wire, edge=split.edge,
                               edge_model=opsc_edge_model(model, split.spec))
        a = _run(eager, ids, None, 8, handoff_after=3, i_kv=i_kv)
        b = _run(handoff_session(_lm(model), split), ids, None, 8, handoff_after=3, i_kv=i_kv)
        assert max(float((x - y).abs().max()) for x, y in zip(a, b)) <= 1e-4


def test_the_edge_model_generates_the_local_tokens_on_the_fast_path():
    """Edge and cloud models with different weights (the edge half is the edge model's layers
    [0, ℓ)): the local tokens are the edge model's alone, and every token is the eager session's."""
    from splitcli.runtime.fast import fast_handoff_session

    cloud, edge = _tiny("llama"), _tiny("qwen2")
    on_cloud = build_split(_lm(cloud), SplitSpec(split_layer=2))
    on_edge = build_split(_lm(edge), SplitSpec(split_layer=2))
    split = SimpleNamespace(edge=on_edge.edge, cloud=on_cloud.cloud, wire=on_cloud.wire)
    edge_alone = generate(FastUnsplitSession(edge), _prompt(), None, CFG).tokens
    for i_kv in (0, 1):
        got = handoff_generate(fast_handoff_session(split, edge), _prompt(), None, CFG, local_tokens=5, i_kv=i_kv)
        assert torch.equal(got.tokens[:, :5], edge_alone[:, :5])
        eager = handoff_generate(HandoffSession(cloud, 2, edge=on_edge.edge, edge_model=edge), _prompt(), None, CFG,
                                 local_tokens=5, i_kv=i_kv)
        assert torch.equal(got.tokens, eager.tokens), f"I_kv={i_kv}"
        assert not torch.equal(got.tokens, edge_alone)  # after the handoff the cloud's weights decide


def test_unsupported_models_hand_off_on_the_eager_session():
    model = _tiny("mistral")  # sliding-window attention: no fast path
    session = handoff_session(_lm(model), build_split(_lm(model), SplitSpec(split_layer=2)))
    assert type(session) is HandoffSession


def _policy(link, i_kv=1):
    return ExitPolicy(deadline_s=0.1, q_bar=8, q_bar_min=2, i_kv=i_kv, link=link_model_for(link, 0.01))


def test_algorithm_2_sends_the_same_kv_on_the_fast_split():
    """I_kv = 1 every step: the fast split's cloud ends up holding the edge's rows exactly, and the
    trace (decisions, bytes) is the eager split's."""
    model = _tiny("llama")
    split = build_split(_lm(model), SplitSpec(split_layer=2))
    link = parse_link("100Mbit/s,1ms")
    cfg = SamplingConfig(max_new_tokens=8)
    fast = fast_split_session(split)
    assert isinstance(fast, FastSplitSession)
    a = adaptive_generate(split.session(), _prompt(), None, cfg, _policy(link), EmulatedLink(link),
                          fixed_compute_s=0.005)
    b = adaptive_generate(fast, _prompt(), None, cfg, _policy(link), EmulatedLink(link), fixed_compute_s=0.005)
    assert torch.equal(a.tokens, b.tokens)
    assert [(r.decision, r.wire_bytes, r.kv_bytes) for r in a.rows] == [(r.decision, r.wire_bytes, r.kv_bytes)
                                                                       for r in b.rows]
    assert sum(r.kv_bytes for r in b.rows) > 0
    length, edge = fast.edge_rows(range(2))
    _, copied = static_rows([Span(0, fast._replica)], range(2), 0)
    assert length == fast.length == 9 + 7
    assert all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values) for x, y in zip(edge, copied))


def test_algorithm_2_hands_off_on_the_fast_session():
    """The handoff decided like a step (test_runtime_adaptive's case) on the fast session: all L
    layers' KV at the handoff, then the edge's rows each step; tokens are the unsplit model's."""
    model = _tiny("llama")
    split = build_split(_lm(model), SplitSpec(split_layer=2))
    link = parse_link("10Mbit/s,20ms")
    cfg = SamplingConfig(max_new_tokens=12)
    reference = generate(FastUnsplitSession(model), _prompt(length=10), None, cfg).tokens
    session = handoff_session(_lm(model), split)
    result = adaptive_generate(session, _prompt(length=10), None, cfg, _policy(link), EmulatedLink(link),
                               local_tokens=5, fixed_compute_s=0.005)
    assert [r.stage for r in result.rows[:6]] == ["local"] * 5 + ["handoff"]
    assert torch.equal(result.tokens, reference)
    assert result.handoff.i_kv == 1 and result.handoff.layers == (0, 4) and result.handoff.positions == 14
    eager = adaptive_generate(HandoffSession(model, 2), _prompt(length=10), None, cfg, _policy(link),
                              EmulatedLink(link), local_tokens=5, fixed_compute_s=0.005)
    assert [(r.stage, r.decision, r.wire_bytes, r.kv_bytes) for r in eager.rows] == \
           [(r.stage, r.decision, r.wire_bytes, r.kv_bytes) for r in result.rows]
    # the cloud's copy of the edge's layers: the handoff's rows, then each step's, exactly
    length, edge = session.edge_rows(range(2))
    copied_length, copied = static_rows([Span(0, session._replica)], range(2), 0)
    assert length == copied_length == session.length
    assert all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values) for x, y in zip(edge, copied))


def _cache(n_layers=2, length=3, batch=1):
    cache = StaticKV(n_layers, 2, 4, capacity=8)
    cache.reserve(length, batch)
    cache.k.normal_(generator=torch.Generator().manual_seed(0))
    cache.v.normal_(generator=torch.Generator().manual_seed(1))
    cache.length = length
    return cache


def test_static_rows_read_and_install_across_spans():
    front, back = _cache(2), _cache(3)
    length, rows = static_rows([Span(0, front), Span(2, back)], range(1, 4), 1)
    assert length == 3 and [r.layer for r in rows] == [1, 2, 3]
    assert torch.equal(rows[0].keys, front.k[1, :, :, 1:3]) and torch.equal(rows[2].values, back.v[1, :, :, 1:3])
    _, every = static_rows([Span(0, front), Span(2, back)], range(5), 0)
    a, b = StaticKV(2, 2, 4), StaticKV(3, 2, 4)
    install_spans([Span(0, a), Span(2, b)], KVPayload(0, 3, tuple(every)), torch.float32)
    assert a.length == b.length == 3
    assert torch.equal(a.k[:, :, :, :3], front.k[:, :, :, :3]) and torch.equal(b.v[:, :, :, :3], back.v[:, :, :, :3])


def test_static_row_errors_are_one_line():
    front, back = _cache(2), _cache(3, length=2)
    with pytest.raises(SplitLLMError, match="no layer 4"):
        static_rows([Span(0, front)], range(4, 6), 0)
    with pytest.raises(SplitLLMError, match="disagree on length"):
        static_rows([Span(0, front), Span(2, back)], range(4), 0)
    with pytest.raises(SplitLLMError, match="from position 4"):
        static_rows([Span(0, front)], range(2), 4)
    assert static_rows([Span(0, StaticKV(2, 2, 4))], range(2), 0) == (0, [])  # nothing held: no rows
    quant = QuantStaticKV(2, 2, 4, 8)
    with pytest.raises(SplitLLMError, match="does not expose"):
        static_rows([Span(0, quant)], range(1), 0)
    _, rows = static_rows([Span(0, front)], range(2), 0)
    with pytest.raises(SplitLLMError, match="exactly the layers 0..2"):
        install_static_rows(StaticKV(3, 2, 4), KVPayload(0, 3, tuple(rows)), 0, torch.float32)
    with pytest.raises(SplitLLMError, match="does not hold"):
        install_spans([Span(0, StaticKV(2, 2, 4))], KVPayload(0, 3, (*rows, KVRows(7, rows[0].keys, rows[0].values))),
                      torch.float32)


def test_a_kv_handoff_of_every_layer_lands_exactly_and_only_once():
    model = _tiny("llama")
    session = handoff_session(_lm(model), build_split(_lm(model), SplitSpec(split_layer=2)))
    session.prefill(_prompt())
    with pytest.raises(SplitLLMError, match="edge_layers needs"):
        session.handoff(0, edge_layers=True)
    _, local = session.edge_rows(range(4))  # the local stage's rows of all layers
    local = [KVRows(r.layer, r.keys.clone(), r.values.clone()) for r in local]
    assert session.handoff(1, edge_layers=True).layers == (0, 4)
    with pytest.raises(SplitLLMError, match="already"):
        session.handoff(1)
    _, front = static_rows([Span(0, session._replica)], range(2), 0)
    _, back = static_rows([Span(2, session.cloud_cache)], range(2, 4), 0)
    _, carried = session.edge_rows(range(2))
    for want, got in zip(local, [*front, *back]):
        assert want.layer == got.layer and torch.equal(want.keys, got.keys) and torch.equal(want.values, got.values)
    assert all(torch.equal(w.keys, c.keys) for w, c in zip(local, carried))


def test_real_model_fast_handoff_equals_the_fast_unsplit_model(real_lm):
    model = copy.deepcopy(real_lm.model)  # the fast path re-lays out its model's float weights
    tok = real_lm.tokenizer
    ids = torch.tensor([tok("The river flows through the old town and", add_special_tokens=True)["input_ids"]])
    cfg = SamplingConfig(max_new_tokens=16)
    reference = generate(FastUnsplitSession(model), ids, None, cfg).tokens
    split = build_split(_lm(model), SplitSpec(split_layer=15))
    for i_kv in (0, 1):
        session = handoff_session(_lm(model), split)
        assert isinstance(session, FastHandoffSession)
        got = handoff_generate(session, ids, None, cfg, local_tokens=6, i_kv=i_kv)
        assert torch.equal(got.tokens, reference), f"I_kv={i_kv}"
