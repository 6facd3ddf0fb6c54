"""The cloud server on the fast decode path (`runtime.fast.fast_cloud_half`): a remote session
alone is bit-identical to the in-process `FastSplitSession`; batched decode steps stay within
float rounding of the same steps alone and never change what a session's cache holds but its own
new position; KV handoffs, memory accounting and the eager fallback."""

from __future__ import annotations

import contextlib
import threading
from types import SimpleNamespace

import grpc
import pytest
import torch

from conftest import _tiny
from splitcli.deploy import SplitSpec, build_split
from splitcli.errors import SplitLLMError
from splitcli.model.fast import FastCloudHalf, row_major_head
from splitcli.plan.codec_settings import CodecSettings
from splitcli.runtime.fast import FastSplitSession, fast_cloud_half, fast_edge_half, fast_split_session
from splitcli.runtime.handoff import KVRows, decode_kv, encode_kv, kv_layout
from splitcli.serve.batching import Batcher, CloudState, forward_one
from splitcli.runtime.kv_rows import install_static_rows
from splitcli.serve.batching_fast import check_cache, forward_batch_fast
from splitcli.serve.cloud import CloudServer, CloudServicer, CloudSettings
from splitcli.serve.proto import split_pb2 as pb
from splitcli.serve.proto import split_pb2_grpc as pb_grpc
from splitcli.serve.protocol import WIRE_TO_PB, chunk_frame, codec_to_pb

SHA, KEY = "0" * 63 + "3", "test-key"
VOCAB = 128
PROMPTS = [[1, 5, 9, 33, 7], [2, 40, 3], [17, 18, 19, 20, 21, 22, 23, 24, 25], [99]]
TABQ = CodecSettings(tau=3.0, entropy=False, q_bar=6)


@pytest.fixture(scope="module")
def lm():
    return SimpleNamespace(model=_tiny("llama"), tokenizer=None, sha256=SHA)


@pytest.fixture(scope="module", params=["none", "tabq"])
def split(lm, request):
    return build_split(lm, SplitSpec(split_layer=2, wire=request.param, codec=TABQ))


@contextlib.contextmanager
def serving(split, **settings):
    server = CloudServer(split, CloudSettings(**{"model_sha256": SHA, "api_key": KEY, "max_top_k": _vocab(split),
                                                 **settings}))
    try:
        yield server
    finally:
        server.stop(0)
    assert server.servicer.session_count == 0 and server.servicer.kv_used == 0


def _vocab(split) -> int:
    return split.cloud.parts.lm_head.weight.shape[0]


def _open(split, max_tokens=40, kv_mode=pb.KV_HIDDEN, top_k=None):
    return pb.ClientMessage(open=pb.Open(
        model_sha256=SHA, split_layer=split.spec.split_layer, wire=WIRE_TO_PB[split.spec.wire], max_tokens=max_tokens,
        kv_mode=kv_mode, codec=codec_to_pb(split.spec.codec), protocol_version=1,
        sampling=pb.Sampling(top_k_logits=top_k or _vocab(split))))


def _stream(server, requests):
    """One session stream; `requests` is a generator that may wait on replies (the edge's loop)."""
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.SplitCloudStub(channel)
    return channel, stub.Session(requests, metadata=[("authorization", f"Bearer {KEY}")], timeout=60)


def _full_logits(token: pb.Token) -> torch.Tensor:
    """The top-k a step returned, back in vocab order (float32 on the wire, exact)."""
    ids = list(token.top_k.token_ids)
    out = torch.full((max(len(ids), max(ids) + 1),), float("nan"))  # NaN where a short top-k sent nothing
    out[torch.tensor(list(token.top_k.token_ids))] = torch.tensor(list(token.top_k.logits))
    return out


def _reference(split, prompt, n):
    """Greedy tokens and each step's logits [V] of the in-process fast split session."""
    session = fast_split_session(split)
    assert isinstance(session, FastSplitSession)
    logits = [session.prefill(torch.tensor([prompt]))[0, -1]]
    tokens = [int(logits[-1].argmax())]
    for _ in range(n - 1):
        logits.append(session.forward(torch.tensor([[tokens[-1]]]))[0, -1])
        tokens.append(int(logits[-1].argmax()))
    return tokens, logits


def _remote(server, split, prompt, n, hold=None, top_k=None):
    """The same greedy generation against the server, the edge half here on the fast path (its
    frames encoded by the split's wire); each step waits for the previous reply. Returns the tokens
    and each step's logits [V]."""
    edge = fast_edge_half(split.edge)
    cache = edge.new_cache()
    replies: list = []
    got = threading.Event()

    def requests():
        yield _open(split, top_k=top_k)
        ids, pos = prompt, 0
        for step in range(n):
            hidden = edge(torch.tensor([ids]), torch.arange(pos, pos + len(ids))[None], None, cache)
            got.clear()
            yield from chunk_frame(split.wire.encode(hidden[0]), step, pos, len(ids), 1 << 20)
            assert got.wait(30)
            pos += len(ids)
            ids = [replies[-1].token.top_k.token_ids[0]]
        if hold is not None:
            hold.wait(30)
        yield pb.ClientMessage(close=pb.Close())

    channel, call = _stream(server, requests())
    with channel:
        for reply in call:
            if reply.WhichOneof("kind") == "token":
                replies.append(reply)
                got.set()
    logits = [_full_logits(r.token) for r in replies]
    return [int(t.top_k.token_ids[0]) for t in (r.token for r in replies)], logits


def test_unbatched_remote_session_is_bit_identical_to_fast_split_session(split):
    """Prefill + 5 decode steps, one session: tokens identical and logits max |Δ| == 0."""
    with serving(split) as server:
        assert server.servicer.fast and isinstance(server.servicer.cloud, FastCloudHalf)
        for prompt in PROMPTS[:3]:
            ref_tokens, ref_logits = _reference(split, prompt, 6)
            tokens, logits = _remote(server, split, prompt, 6)
            assert tokens == ref_tokens
            assert max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits)) == 0.0
        assert server.servicer.batcher.largest_batch == 1


def test_a_small_top_k_reply_screens_the_head_and_keeps_the_exact_top(split):
    """top_k_logits = 5 (5 x 8 <= 128 rows): every step's head reads the int8 screen
    (`quant.screen`); the reply holds the same 5 ids as the vocab-wide logits, with the float
    products of those rows (one gathered product: within float rounding of the full head's)."""
    with serving(split) as server:
        head = server.servicer.cloud.head
        head.build_screen()  # else after _Head.SCREEN_AFTER_STEPS such steps
        before = head.screened[0]
        ref_tokens, ref_logits = _reference(split, PROMPTS[0], 6)
        channel_tokens, logits = _remote(server, split, PROMPTS[0], 6, top_k=5)
        assert head.screened[0] - before == 6
    assert channel_tokens == ref_tokens
    for got, ref in zip(logits, ref_logits):
        ids = torch.nonzero(~torch.isnan(got)).squeeze(1)
        assert set(ids.tolist()) == set(ref.topk(5).indices.tolist())
        assert torch.allclose(got[ids], ref[ids], rtol=0, atol=1e-5)


def test_real_model_remote_session_is_the_fast_path_bit_for_bit(real_lm):
    """SmolLM2-135M at ℓ = 15, raw fp32 wire, prefill + 3 decode steps over the server: every
    vocab-wide logit equals the in-process FastSplitSession's (max |Δ| == 0). (Once the fast half
    is built the eager one computes on the same re-laid-out weights and, here, the same values: what
    shows the server ran the fast half is `servicer.fast` and, in the next test, its static cache.)"""
    import copy

    lm = SimpleNamespace(model=copy.deepcopy(real_lm.model), tokenizer=None, sha256=SHA)  # the fixture's layout untouched
    split = build_split(lm, SplitSpec(split_layer=15, wire="none"))
    prompt = real_lm.tokenizer("The capital of France is")["input_ids"]
    with serving(split) as server:
        assert server.servicer.fast
        ref_tokens, ref_logits = _reference(split, prompt, 4)
        tokens, logits = _remote(server, split, prompt, 4)
    assert tokens == ref_tokens
    assert max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits)) == 0.0


def test_session_cache_is_the_reservation(split):
    """A session's static cache is allocated for exactly the positions its Open reserved, so its
    bytes are the KV bytes admission counted; freed with the session."""
    hold = threading.Event()
    with serving(split) as server:
        servicer = server.servicer
        worker = threading.Thread(target=_remote, args=(server, split, PROMPTS[0], 3, hold))
        worker.start()
        try:
            for _ in range(600):
                sessions = list(servicer._sessions.values())
                if sessions and sessions[0].state.length == len(PROMPTS[0]) + 2:
                    break
                threading.Event().wait(0.05)
            (sess,) = sessions
            cache = sess.state.cache
            assert (cache.length, cache.capacity, cache.rows) == (len(PROMPTS[0]) + 2, 40, 1)
            assert cache.nbytes() == sess.reserved == servicer.kv_used == 40 * servicer.bytes_per_token
        finally:
            hold.set()
            worker.join(timeout=60)
        assert sess.state.cache is None and servicer.kv_used == 0


def _fast_halves(split):
    return fast_edge_half(split.edge), fast_cloud_half(split.cloud)


def _hidden(edge, n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, n), generator=g)
    return edge(ids, torch.arange(n)[None], None, edge.new_cache())


@pytest.mark.parametrize("row_major", [False, True], ids=["own-head", "row-major-head"])
def test_batched_decode_within_rounding_of_alone(split, row_major):
    """Sessions of lengths 9, 3, 5, 1 decode 4 steps batched and alone (the batched head in the
    half's own layout, or the Batcher's row-major copy). Bound (tighter than the eager
    batching test's 1e-4): same argmax, logits within 1e-5 (measured ~1e-7), the new K/V positions
    within 1e-6; and bit for bit: the positions a session held before a batched step are untouched,
    its capacity stays its own and nothing is written past its length (no padding, no other row)."""
    edge, cloud = _fast_halves(split)
    prompts = [_hidden(edge, n, seed) for seed, n in enumerate((9, 3, 5, 1))]
    solo = [CloudState(cloud.new_cache(24)) for _ in prompts]
    batched = [CloudState(cloud.new_cache(24)) for _ in prompts]
    for a, b, h in zip(solo, batched, prompts):
        forward_one(cloud, a, h)
        forward_one(cloud, b, h)
    worst = 0.0
    for step in range(4):
        nxt = [_hidden(edge, 1, 100 + 10 * step + i) for i in range(len(prompts))]
        before = [(s.cache.k.clone(), s.cache.v.clone()) for s in batched]
        ref = [forward_one(cloud, s, h) for s, h in zip(solo, nxt)]
        got = forward_batch_fast(cloud, batched, nxt, head_rows=row_major_head(cloud.parts) if row_major else None)
        worst = max(worst, max(float((r - g).abs().max()) for r, g in zip(ref, got)))
        assert [int(r.argmax()) for r in ref] == [int(g.argmax()) for g in got]
        for s, (k, v) in zip(batched, before):
            n = s.length - 1
            assert torch.equal(s.cache.k[:, :, :, :n], k[:, :, :, :n]) and torch.equal(s.cache.v[:, :, :, :n], v[:, :, :, :n])
            assert not s.cache.k[:, :, :, n + 1:].any() and not s.cache.v[:, :, :, n + 1:].any()
    assert worst < 1e-5
    for a, b in zip(solo, batched):
        assert a.length == b.length == b.cache.length and b.cache.capacity == 24 and b.cache.rows == 1
        n = a.length
        for x, y in ((a.cache.k, b.cache.k), (a.cache.v, b.cache.v)):
            assert float((x[:, :, :, :n] - y[:, :, :, :n]).abs().max()) < 1e-6


def test_batcher_runs_concurrent_sessions_batched(split):
    """Four sessions through the Batcher thread at once: batches form, and each session's tokens
    equal its in-process fast split session's (logits within the batched bound, 1e-5)."""
    edge, cloud = _fast_halves(split)
    batcher = Batcher(cloud, window_s=1.0, max_batch=8, active=lambda: len(PROMPTS))
    out, errors = {}, []

    def session(i, prompt):
        try:
            state, cache, ids, pos, toks, logits = CloudState(cloud.new_cache(32)), edge.new_cache(), prompt, 0, [], []
            for _ in range(5):
                hidden = edge(torch.tensor([ids]), torch.arange(pos, pos + len(ids))[None], None, cache)
                received = split.wire.decode(split.wire.encode(hidden[0]))[None]
                logits.append(batcher.run(state, received))
                pos += len(ids)
                ids = [int(logits[-1].argmax())]
                toks.append(ids[0])
            out[i] = toks, logits
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=session, args=(i, p)) for i, p in enumerate(PROMPTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        batcher.stop()
    assert not errors and len(out) == len(PROMPTS)
    assert batcher.largest_batch > 1
    for i, prompt in enumerate(PROMPTS):
        ref_tokens, ref_logits = _reference(split, prompt, 5)
        tokens, logits = out[i]
        assert tokens == ref_tokens
        assert max(float((a - b).abs().max()) for a, b in zip(logits, ref_logits)) < 1e-5


def _kv_rows(cache, first_layer, n):
    # a one-row StaticKV's rows [0, n) as the handoff payload's per-layer rows [1, kv_heads, n, D]
    return [KVRows(first_layer + j, cache.k[j, :, :, :n].clone(), cache.v[j, :, :, :n].clone())
            for j in range(cache.k.shape[0])]


def test_kv_handoff_installs_rows_into_the_static_cache(split):
    """The KV rows of an in-process fast session's cloud, sent as a handoff (I_kv = 1), then hidden
    decode steps: the server's logits equal the in-process session's, bit for bit."""
    edge, cloud = _fast_halves(split)
    ell, prompt = split.spec.split_layer, PROMPTS[2]
    session = fast_split_session(split)
    ref = [session.prefill(torch.tensor([prompt]))[0, -1]]
    kv = encode_kv(_kv_rows(session.cloud_cache, ell, len(prompt)), 0, len(prompt))
    tokens = [int(ref[-1].argmax())]
    for _ in range(3):
        ref.append(session.forward(torch.tensor([[tokens[-1]]]))[0, -1])
        tokens.append(int(ref[-1].argmax()))
    edge_cache = edge.new_cache()
    edge(torch.tensor([prompt]), torch.arange(len(prompt))[None], None, edge_cache)  # the edge's own state
    msgs = [_open(split, kv_mode=pb.KV_CACHE), *chunk_frame(kv, 0, 0, len(prompt), 1 << 20, kind=pb.PAYLOAD_KV)]
    for step, tok in enumerate(tokens[:3], start=1):
        pos = len(prompt) + step - 1
        hidden = edge(torch.tensor([[tok]]), torch.tensor([[pos]]), None, edge_cache)
        msgs += chunk_frame(split.wire.encode(hidden[0]), step, pos, 1, 1 << 20)
    msgs.append(pb.ClientMessage(close=pb.Close()))
    with serving(split) as server:
        channel, call = _stream(server, iter(msgs))
        with channel:
            replies = [r for r in call if r.WhichOneof("kind") == "token"]
    assert [int(r.token.top_k.token_ids[0]) for r in replies] == tokens[1:]
    assert max(float((_full_logits(r.token) - want).abs().max()) for r, want in zip(replies, ref[1:])) == 0.0


def test_install_static_rows_checks_positions_and_rows(split):
    _, cloud = _fast_halves(split)
    ell, layers = split.spec.split_layer, split.cloud.parts.num_layers - split.spec.split_layer
    layout = kv_layout(cloud.parts, range(ell, ell + layers), 1, 16)
    rows = [KVRows(ell + j, torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)) for j in range(layers)]
    cache = cloud.new_cache(16)
    install_static_rows(cache, decode_kv(encode_kv(rows, 0, 3), layout), ell, torch.float32)
    assert cache.length == 3 and cache.capacity == 16
    assert all(torch.equal(cache.k[j, :, :, :3], r.keys) and torch.equal(cache.v[j, :, :, :3], r.values)
               for j, r in enumerate(rows))
    with pytest.raises(SplitLLMError, match="start at position 0, but the receiving cache holds 3"):
        install_static_rows(cache, decode_kv(encode_kv(rows, 0, 3), layout), ell, torch.float32)
    short = [KVRows(r.layer, r.keys[:, :, :2], r.values[:, :, :2]) for r in rows]
    with pytest.raises(SplitLLMError, match="received 2 of 3 rows"):
        install_static_rows(cache, decode_kv(encode_kv(short, 3, 3), layout), ell, torch.float32)
    assert cache.length == 3  # a refused payload leaves the cache as it was


def test_fast_and_eager_caches_never_mix(split):
    edge, cloud = _fast_halves(split)
    h = _hidden(edge, 2, 0)
    with pytest.raises(SplitLLMError, match="fast cloud half was given a Hugging Face cache"):
        forward_one(cloud, CloudState(split.cloud.new_cache()), h)
    with pytest.raises(SplitLLMError, match="eager cloud half was given a static cache"):
        forward_one(split.cloud, CloudState(cloud.new_cache()), h)
    with pytest.raises(SplitLLMError, match="Hugging Face cache"):
        check_cache(cloud, split.cloud.new_cache())


def test_eager_when_asked_or_unsupported(lm):
    settings = CloudSettings(model_sha256=SHA, api_key=KEY)
    split = build_split(lm, SplitSpec(split_layer=2, wire="none"))
    eager = CloudServicer(split, settings, fast=False)
    try:
        assert not eager.fast and eager.cloud is split.cloud
    finally:
        eager.close()
    half = SimpleNamespace(model=_tiny("llama").to(torch.bfloat16), tokenizer=None, sha256=SHA)
    split = build_split(half, SplitSpec(split_layer=2, wire="none"))
    servicer = CloudServicer(split, settings)  # the static cache is float32: a bf16 model stays eager
    try:
        assert not servicer.fast and servicer.cloud is split.cloud
    finally:
        servicer.close()
    sliding = SimpleNamespace(model=_tiny("gemma2"), tokenizer=None, sha256=SHA)
    split = build_split(sliding, SplitSpec(split_layer=2, wire="none"))
    assert fast_cloud_half(split.cloud) is None
    servicer = CloudServicer(split, settings)
    try:
        assert not servicer.fast and servicer.cloud is split.cloud
    finally:
        servicer.close()


def test_cloud_only_baseline_runs_fast_and_equals_the_fast_unsplit_model(lm):
    """`bench serve`'s cloud-only split (ℓ = 0: every layer in the cloud) is served on the fast
    path too, so both of its modes are timed on one path; bit-identical to FastUnsplitSession."""
    from splitcli.bench.serve_replay import cloud_only_split
    from splitcli.runtime.fast import FastUnsplitSession

    split = cloud_only_split(lm, "none")
    cloud = fast_cloud_half(split.cloud)
    assert isinstance(cloud, FastCloudHalf) and cloud.split_layer == 0
    ids = torch.tensor([PROMPTS[2]])
    state = CloudState(cloud.new_cache(16))
    got = [forward_one(cloud, state, split.edge(ids, None, None, None))]
    ref_session = FastUnsplitSession(lm.model)
    ref = [ref_session.prefill(ids)[0, -1]]
    for tok in (3, 4):
        got.append(forward_one(cloud, state, split.edge(torch.tensor([[tok]]), None, None, None)))
        ref.append(ref_session.forward(torch.tensor([[tok]]))[0, -1])
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_row_major_head_only_for_several_rows(split):
    """One row keeps the half's own head (bit for bit what generate computes); several rows use the
    copy, within fp32 rounding of the own head; a quantized or biased head gets no copy."""
    _, cloud = _fast_halves(split)
    rows = row_major_head(cloud.parts)
    assert rows.is_contiguous() and torch.equal(rows, cloud.parts.lm_head.weight)
    x = torch.randn(3, 2, cloud.parts.config.hidden_size, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():  # as the half calls its head
        assert torch.equal(cloud.head(x[:1, -1:], 1, rows), cloud.head(x[:1, -1:], 1))
        assert float((cloud.head(x, 0, rows) - cloud.head(x, 0)).abs().max()) < 1e-5
    assert row_major_head(SimpleNamespace(lm_head=torch.nn.Linear(4, 8))) is None  # a bias


def test_a_session_released_mid_batch_does_not_fail_the_others(split, monkeypatch):
    """The server releases a session (its cache set to None) from another thread, possibly while
    its batched step runs: every session of the batch still gets its logits and its own position."""
    edge, cloud = _fast_halves(split)
    states = [CloudState(cloud.new_cache(16)) for _ in range(3)]
    for seed, (s, n) in enumerate(zip(states, (4, 2, 3))):
        forward_one(cloud, s, _hidden(edge, n, seed))
    call = type(cloud).__call__

    def releasing(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        states[1].closed, states[1].cache = True, None  # what CloudServicer's release does
        return out

    monkeypatch.setattr(type(cloud), "__call__", releasing)
    out = forward_batch_fast(cloud, states, [_hidden(edge, 1, 50 + i) for i in range(3)])
    assert len(out) == 3 and [s.length for s in states] == [5, 3, 4]
    assert states[0].cache.length == 5 and states[2].cache.length == 4
