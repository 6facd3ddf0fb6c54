"""The cloud server core without the network: batched decode equals unbatched, settings, frames."""

from __future__ import annotations

import pytest
import torch

from conftest import _tiny
from splitcli.errors import SplitLLMError
from splitcli.model.split import CloudHalf, EdgeHalf, decoder_parts
from splitcli.runtime.wire import RawWire
from splitcli.serve.batching import Batcher, CloudState, can_batch, forward_batch, forward_one
from splitcli.serve.cloud import CloudSettings, cloud_kv_bytes_per_token
from splitcli.serve.protocol import chunk_frame, codec_from_pb, codec_to_pb, decode_frame


@pytest.fixture(scope="module")
def halves():
    parts = decoder_parts(_tiny("llama"))
    return EdgeHalf(parts, 2), CloudHalf(parts, 2)


def _hidden(edge, n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (1, n), generator=g)
    return edge(ids, torch.arange(n)[None], None, edge.new_cache())


def test_batched_decode_equals_unbatched(halves):
    edge, cloud = halves
    assert can_batch(cloud)
    prompts = [_hidden(edge, n, seed) for seed, n in enumerate((3, 9, 5, 1))]
    solo = [CloudState(cloud.new_cache()) for _ in prompts]
    batched = [CloudState(cloud.new_cache()) for _ in prompts]
    for a, b, h in zip(solo, batched, prompts):
        forward_one(cloud, a, h)
        forward_one(cloud, b, h)
    worst = 0.0
    for step in range(4):
        nxt = [_hidden(edge, 1, 100 + 10 * step + i) for i in range(len(prompts))]
        ref = [forward_one(cloud, s, h) for s, h in zip(solo, nxt)]
        got = forward_batch(cloud, batched, nxt)
        worst = max(worst, max(float((r - g).abs().max()) for r, g in zip(ref, got)))
        assert [int(r.argmax()) for r in ref] == [int(g.argmax()) for g in got]
    assert worst < 1e-4
    # each session's cache holds its own rows only: no padding left behind
    for a, b in zip(solo, batched):
        assert a.length == b.length
        for i in range(2, 4):
            assert b.cache.layers[i].keys.shape == a.cache.layers[i].keys.shape
            assert torch.allclose(b.cache.layers[i].keys, a.cache.layers[i].keys, atol=1e-5)


def test_batcher_thread_batches_and_isolates_errors(halves):
    edge, cloud = halves
    batcher = Batcher(cloud, window_s=1.0, max_batch=8, active=lambda: 3)  # waits for all three, no longer
    try:
        states = [CloudState(cloud.new_cache()) for _ in range(3)]
        for i, s in enumerate(states):
            batcher.run(s, _hidden(edge, 2 + i, i))
        import threading

        out = {}
        threads = [threading.Thread(target=lambda i=i, s=s: out.__setitem__(i, batcher.run(s, _hidden(edge, 1, 50 + i))))
                   for i, s in enumerate(states)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert len(out) == 3 and batcher.largest_batch > 1
        with pytest.raises(SplitLLMError, match="closed"):
            gone = CloudState(cloud.new_cache(), closed=True)
            batcher.run(gone, _hidden(edge, 1, 0))
        assert batcher.run(states[0], _hidden(edge, 1, 7)).shape == (128,)
    finally:
        batcher.stop()


def test_batcher_waits_for_a_session_expected_back_and_not_for_others(halves):
    """Two sessions at the same pace (PACE after each answer), the second starting PACE / 2 later.
    With a 0 s window they alternate for good, one forward each; the straggler wait (each
    session's own measured pace, capped by straggler_s) pairs them. A session that stopped sending
    is not waited for past its due time. The pace is long beside a loaded 2-core box's scheduling
    jitter (tens of ms), so the two outcomes cannot be confused by it."""
    import threading
    import time

    edge, cloud = halves

    pace = 0.2

    def rounds(straggler_s, n=8):
        batcher = Batcher(cloud, window_s=0.0, max_batch=4, active=lambda: 2, straggler_s=straggler_s)
        try:
            states = [CloudState(cloud.new_cache()) for _ in range(2)]
            for i, st in enumerate(states):
                batcher.run(st, _hidden(edge, 3, i))

            def session(st, offset):
                for k in range(n):
                    time.sleep(pace + (offset if k == 0 else 0.0))
                    batcher.run(st, _hidden(edge, 1, 10 + k))

            threads = [threading.Thread(target=session, args=(st, o)) for st, o in zip(states, (0.0, pace / 2))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            return batcher.batched_steps - 2, batcher.forwards - 2  # less the two prefills
        finally:
            batcher.stop()

    steps, forwards = rounds(straggler_s=2.0)
    assert steps == 16 and forwards <= 11, (steps, forwards)  # pairs once the paces are learned
    steps, forwards = rounds(straggler_s=0.0)
    assert steps == 16 and forwards >= 13, (steps, forwards)  # no waiting: out of step for good
    # one session gone quiet: the other is not held up for more than its due time + slack
    batcher = Batcher(cloud, window_s=0.0, max_batch=4, active=lambda: 2, straggler_s=5.0)
    try:
        quiet, busy = CloudState(cloud.new_cache()), CloudState(cloud.new_cache())
        for st in (quiet, busy):
            batcher.run(st, _hidden(edge, 3, 1))
        batcher.run(quiet, _hidden(edge, 1, 2))  # learns a ~0 s pace, then never sends again
        t0 = time.monotonic()
        for k in range(3):
            batcher.run(busy, _hidden(edge, 1, 3 + k))
        assert time.monotonic() - t0 < 2.0
        quiet.closed = True
        batcher.run(busy, _hidden(edge, 1, 9))
        assert id(quiet) not in batcher._out  # an ended session is let go
    finally:
        batcher.stop()


def test_sliding_window_cloud_is_not_stacked():
    parts = decoder_parts(_tiny("mistral"))
    assert not can_batch(CloudHalf(parts, 2))


def test_settings_are_validated():
    with pytest.raises(SplitLLMError, match="API key"):
        CloudSettings(model_sha256="abc", api_key="")
    with pytest.raises(SplitLLMError, match="max_sessions"):
        CloudSettings(model_sha256="abc", api_key="k", max_sessions=0)
    with pytest.raises(SplitLLMError, match="max_frame_bytes"):
        CloudSettings(model_sha256="abc", api_key="k", max_message_bytes=1 << 20, max_frame_bytes=1 << 10)


def test_kv_bytes_per_token(halves):
    _, cloud = halves
    # 2 cloud layers x (K and V) x 2 kv heads x head dim 16 x 4 bytes
    assert cloud_kv_bytes_per_token(cloud) == 2 * 2 * 2 * 16 * 4


def test_codec_settings_round_trip():
    from splitcli.plan.codec_settings import CodecSettings

    for s in (CodecSettings(), CodecSettings(tau=3.5, q_bar=4, q_bar_min=3, delta=0.1, entropy=False, n_classes=2)):
        assert codec_from_pb(codec_to_pb(s)) == s
    bad = codec_to_pb(CodecSettings())
    bad.q_bar = 99
    with pytest.raises(SplitLLMError, match="q_bar"):
        codec_from_pb(bad)


def test_decode_frame_checks_the_claimed_shape():
    wire = RawWire("fp32")
    frame = wire.encode(torch.ones(3, 64))
    assert decode_frame(wire, frame, 3, 64).shape == (3, 64)
    with pytest.raises(SplitLLMError, match="shape"):
        decode_frame(wire, frame, 2, 64)
    with pytest.raises(SplitLLMError):
        decode_frame(wire, b"garbage" * 10, 3, 64)
    with pytest.raises(SplitLLMError, match="NaN"):
        decode_frame(wire, wire.encode(torch.full((1, 64), float("nan"))), 1, 64)


def test_chunk_frame_splits_and_joins():
    msgs = chunk_frame(b"x" * 2500, step_id=4, position=0, n_tokens=3, max_chunk=1000)
    assert [len(m.step.payload) for m in msgs] == [1000, 1000, 500]
    assert {m.step.chunk_count for m in msgs} == {3} and [m.step.chunk_index for m in msgs] == [0, 1, 2]
    assert b"".join(m.step.payload for m in msgs) == b"x" * 2500


def test_client_checks_the_clouds_answers():
    from splitcli.runtime.generate import SamplingConfig
    from splitcli.serve.client import _to_token
    from splitcli.serve.proto import split_pb2 as pb

    cfg, g = SamplingConfig(), torch.Generator()
    ok = pb.ServerMessage(token=pb.Token(step_id=0, token_id=5))
    assert _to_token(ok, 0, cfg, 128, g) == 5
    top = pb.ServerMessage(token=pb.Token(step_id=1, top_k=pb.TopK(token_ids=[9, 3], logits=[2.0, 1.0])))
    assert _to_token(top, 1, cfg, 128, g) == 9
    bad = [(pb.ServerMessage(token=pb.Token(step_id=0, token_id=128)), 0, "vocabulary"),
           (ok, 1, "something else"),
           (pb.ServerMessage(token=pb.Token(step_id=0, top_k=pb.TopK(token_ids=[1, 2], logits=[1.0]))), 0, "malformed"),
           (pb.ServerMessage(token=pb.Token(step_id=0, top_k=pb.TopK(token_ids=[500], logits=[1.0]))), 0, "invalid"),
           (pb.ServerMessage(opened=pb.Opened(admitted=True)), 0, "something else")]
    for msg, step, match in bad:
        with pytest.raises(SplitLLMError, match=match):
            _to_token(msg, step, cfg, 128, g)
    # NaN / +inf / nothing finite would crash sampling (torch.multinomial) with a traceback; a
    # masked (-inf) entry beside finite ones is a real answer
    hot = SamplingConfig(temperature=0.8)
    nan, inf = float("nan"), float("inf")
    for vals in ([nan, 0.0], [inf, 0.0], [-inf, -inf]):
        msg = pb.ServerMessage(token=pb.Token(step_id=0, top_k=pb.TopK(token_ids=[1, 2], logits=vals)))
        for c in (cfg, hot):
            with pytest.raises(SplitLLMError, match="not finite"):
                _to_token(msg, 0, c, 128, g)
    masked = pb.ServerMessage(token=pb.Token(step_id=0, top_k=pb.TopK(token_ids=[1, 2], logits=[-inf, 0.0])))
    assert _to_token(masked, 0, hot, 128, g) == 2
