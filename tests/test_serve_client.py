"""Edge client <-> cloud server on 127.0.0.1 (ports chosen at run time): outputs equal the
in-process split's, and every kind of bad request gets its own status while a concurrent good
session runs on unaffected. Each test starts its server and stops it in a finally."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from types import SimpleNamespace

import grpc
import pytest
import torch

from conftest import _tiny
from splitcli.deploy import SplitSpec, build_split
from splitcli.plan.codec_settings import CodecSettings
from splitcli.runtime.generate import SamplingConfig, generate
from splitcli.serve.client import RemoteCloud, RemoteError, generate_remote
from splitcli.serve.cloud import CloudServer, CloudSettings
from splitcli.serve.proto import split_pb2 as pb
from splitcli.serve.proto import split_pb2_grpc as pb_grpc
from splitcli.serve.protocol import WIRE_TO_PB, chunk_frame, codec_to_pb

SHA, KEY = "0" * 63 + "1", "test-key"
PROMPTS = [[1, 5, 9, 33, 7], [2, 40, 3], [17, 18, 19, 20, 21, 22, 23], [99]]


@pytest.fixture(scope="module")
def lm():
    return SimpleNamespace(model=_tiny("llama"), tokenizer=None, sha256=SHA)


#: An absolute τ without entropy coding: the TAB-Q wire needs no calibration data.
TABQ = CodecSettings(tau=3.0, entropy=False, q_bar=6)


@pytest.fixture(scope="module", params=["none", "fp16", "bf16", "tabq"])
def split(lm, request):
    return build_split(lm, SplitSpec(split_layer=2, wire=request.param, codec=TABQ))


@contextlib.contextmanager
def serving(split, **settings):
    server = CloudServer(split, CloudSettings(**{"model_sha256": SHA, "api_key": KEY, **settings}))
    try:
        yield server
    finally:
        server.stop(0)
    assert server.servicer.session_count == 0 and server.servicer.kv_used == 0


def remote(server, **kw):
    return RemoteCloud(**{"target": f"127.0.0.1:{server.port}", "api_key": KEY, "model_sha256": SHA,
                          "timeout_s": 60.0, **kw})


def reference(split, prompt, cfg):
    return generate(split.session(), torch.tensor([prompt]), None, cfg).tokens[0].tolist()


def test_greedy_over_the_wire_equals_in_process(split):
    cfg = SamplingConfig(max_new_tokens=6)
    with serving(split) as server:
        for prompt in PROMPTS[:2]:
            assert list(generate_remote(split, prompt, cfg, remote(server))) == reference(split, prompt, cfg)


def test_chunked_prefill_sampling_and_top_k(split):
    prompt = list(range(3, 40))  # 37 positions x 64 floats: a prefill frame of several chunks
    greedy = SamplingConfig(max_new_tokens=4)
    sampled = SamplingConfig(max_new_tokens=5, temperature=0.8, top_p=0.9, seed=7)
    with serving(split, max_message_bytes=2048, max_frame_bytes=1 << 20) as server:
        cloud = remote(server, max_message_bytes=2048)
        assert list(generate_remote(split, prompt, greedy, cloud)) == reference(split, prompt, greedy)
        assert list(generate_remote(split, prompt, sampled, cloud)) == reference(split, prompt, sampled)
        assert list(generate_remote(split, prompt, greedy, cloud, top_k_logits=5)) == reference(split, prompt, greedy)


def test_four_concurrent_clients_each_equal_in_process(split):
    cfg = SamplingConfig(max_new_tokens=8)
    refs = [reference(split, p, cfg) for p in PROMPTS]
    with serving(split, batch_window_ms=50.0) as server:  # the batch closes early once all 4 are in
        cloud = remote(server)
        with cloud.channel() as shared:  # two of the four streams share one channel, as a serving edge does
            outs = _run_concurrently([lambda p=p, i=i: list(generate_remote(split, p, cfg, cloud,
                                                                            channel=shared if i < 2 else None))
                                      for i, p in enumerate(PROMPTS)])
        assert outs == refs
        assert server.servicer.batcher.largest_batch > 1  # decode steps were batched


def _run_concurrently(fns, timeout=60):
    results, errors = [None] * len(fns), []

    def run(i, fn):
        try:
            results[i] = fn()
        except Exception as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    return results


# -- hostile and broken requests -----------------------------------------------------------

def _open(split, **over):
    fields = dict(model_sha256=SHA, split_layer=split.spec.split_layer, wire=WIRE_TO_PB[split.spec.wire],
                  max_tokens=32, kv_mode=pb.KV_HIDDEN, codec=codec_to_pb(split.spec.codec), protocol_version=1)
    fields.update(over)
    return pb.ClientMessage(open=pb.Open(**fields))


def _frames(split, prompt, n):
    """Step messages of a greedy generation, computed here (the edge's part) from the reference."""
    cfg = SamplingConfig(max_new_tokens=n)
    toks = reference(split, prompt, cfg)
    cache, msgs, pos = split.edge.new_cache(), [], 0
    feed = [prompt] + [[t] for t in toks[:-1]]
    for step, ids in enumerate(feed):
        h = split.edge(torch.tensor([ids]), torch.arange(pos, pos + len(ids))[None], None, cache)
        msgs += chunk_frame(split.wire.encode(h[0]), step, pos, len(ids), 1 << 20)
        pos += len(ids)
    return msgs, toks


def _as_kv(msg):
    out = pb.ClientMessage()
    out.CopyFrom(msg)
    out.step.kind = pb.PAYLOAD_KV
    return out


def raw_call(server, msgs, key=KEY, hold: threading.Event | None = None):
    """Send `msgs` on one stream; (replies, status code or None). The stream stays open (its
    request side unfinished) until `hold` is set, at most 20 s."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.SplitCloudStub(channel)

        def requests():
            yield from msgs
            if hold is not None:
                hold.wait(20)

        call = stub.Session(requests(), metadata=[("authorization", f"Bearer {key}")], timeout=30)
        replies = []
        try:
            replies.extend(call)
            return replies, None
        except grpc.RpcError as exc:
            return replies, exc.code()


def _tokens(replies):
    return [r.token.token_id for r in replies if r.WhichOneof("kind") == "token"]


def test_duplicates_are_ignored_and_out_of_order_is_refused(split):
    msgs, toks = _frames(split, PROMPTS[0], 3)
    with serving(split) as server:
        dup = [_open(split), msgs[0], msgs[0], msgs[1], msgs[1], msgs[2], pb.ClientMessage(close=pb.Close())]
        replies, code = raw_call(server, dup)
        assert code is None and _tokens(replies) == toks
        skip = [_open(split), msgs[0], msgs[2]]
        replies, code = raw_call(server, skip)
        assert code == grpc.StatusCode.ABORTED and _tokens(replies) == toks[:1]


def test_each_fault_gets_its_status_and_a_good_session_is_unaffected(split):
    cfg = SamplingConfig(max_new_tokens=12)
    good_ref = reference(split, PROMPTS[2], cfg)
    msgs, _ = _frames(split, PROMPTS[0], 2)
    garbage = pb.ClientMessage(step=pb.Step(step_id=0, position=0, n_tokens=5, payload=b"\xff" * 300))
    wrong_pos = pb.ClientMessage(step=pb.Step(step_id=1, position=99, n_tokens=1, payload=msgs[1].step.payload))
    huge = pb.ClientMessage(step=pb.Step(step_id=0, position=0, n_tokens=1, payload=b"\0" * 5000))
    too_long = pb.ClientMessage(step=pb.Step(step_id=0, position=0, n_tokens=1000, payload=b"\0"))
    faults = [
        ([_open(split), msgs[0]], "bad-key", grpc.StatusCode.UNAUTHENTICATED),
        ([_open(split, model_sha256="f" * 64)], KEY, grpc.StatusCode.FAILED_PRECONDITION),
        ([_open(split, split_layer=3)], KEY, grpc.StatusCode.FAILED_PRECONDITION),
        ([_open(split, protocol_version=2)], KEY, grpc.StatusCode.FAILED_PRECONDITION),
        ([_open(split, kv_mode=7)], KEY, grpc.StatusCode.INVALID_ARGUMENT),
        ([_open(split), _as_kv(msgs[0])], KEY, grpc.StatusCode.FAILED_PRECONDITION),  # KV step, KV_HIDDEN session
        ([_open(split, kv_mode=pb.KV_CACHE), _as_kv(msgs[0])], KEY, grpc.StatusCode.INVALID_ARGUMENT),  # not SKVC
        ([_open(split, max_tokens=10**6)], KEY, grpc.StatusCode.INVALID_ARGUMENT),
        ([_open(split, sampling=pb.Sampling(temperature=-1))], KEY, grpc.StatusCode.INVALID_ARGUMENT),
        ([msgs[0]], KEY, grpc.StatusCode.INVALID_ARGUMENT),  # no Open first
        ([_open(split), garbage], KEY, grpc.StatusCode.INVALID_ARGUMENT),
        ([_open(split), msgs[0], wrong_pos], KEY, grpc.StatusCode.INVALID_ARGUMENT),
        ([_open(split), too_long], KEY, grpc.StatusCode.OUT_OF_RANGE),
        ([_open(split), huge], KEY, grpc.StatusCode.RESOURCE_EXHAUSTED),  # over max_message_bytes
        ([_open(split)] + chunk_frame(b"\0" * 3000, 0, 0, 1, 1000), KEY,
         grpc.StatusCode.RESOURCE_EXHAUSTED),  # chunks together over max_frame_bytes
    ]
    with serving(split, max_message_bytes=2048, max_frame_bytes=2048 + 512) as server:
        cloud = remote(server, max_message_bytes=2048)
        fault_codes = []

        def all_faults():
            for msgs_, key, _ in faults:
                fault_codes.append(raw_call(server, msgs_, key=key)[1])
            return fault_codes

        good, _ = _run_concurrently([lambda: list(generate_remote(split, PROMPTS[2], cfg, cloud)), all_faults])
        assert good == good_ref
        assert fault_codes == [code for _, _, code in faults]
        with pytest.raises(RemoteError) as err:
            list(generate_remote(split, PROMPTS[0], cfg, remote(server, model_sha256="e" * 64)))
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert list(generate_remote(split, PROMPTS[2], cfg, cloud)) == good_ref  # still serving


def test_codec_settings_must_match_the_served_ones(lm):
    split = build_split(lm, SplitSpec(split_layer=2, wire="tabq", codec=TABQ))
    other = codec_to_pb(CodecSettings(tau=2.0, entropy=False, q_bar=6))
    bad = codec_to_pb(TABQ)
    bad.q_bar = 42
    with serving(split) as server:
        replies, code = raw_call(server, [_open(split, codec=other)])
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "codec settings" in replies[0].opened.reason
        assert raw_call(server, [_open(split, codec=bad)])[1] == grpc.StatusCode.INVALID_ARGUMENT
        assert raw_call(server, [_open(split, wire=pb.WIRE_NONE)])[1] == grpc.StatusCode.FAILED_PRECONDITION


def _hold_one_session(server, split, release: threading.Event):
    """A thread holding one admitted session open until `release`; its (replies, code) in the queue."""
    held = queue.Queue()
    holder = threading.Thread(target=lambda: held.put(raw_call(server, [_open(split)], hold=release)))
    holder.start()
    deadline = time.monotonic() + 10
    while server.servicer.session_count == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.servicer.session_count == 1
    return holder, held


def test_admission_limits_and_idle_timeout(split):
    release = threading.Event()
    with serving(split, max_sessions=1) as server:
        holder, held = _hold_one_session(server, split, release)
        replies, code = raw_call(server, [_open(split)])
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and not replies[0].opened.admitted
        assert "session limit" in replies[0].opened.reason
        release.set()  # the holder half-closes: its session ends normally and is freed
        holder.join(timeout=30)
        replies, code = held.get(timeout=1)
        assert replies[0].opened.admitted and code is None
    with serving(split, idle_timeout_s=0.3) as server:
        never = threading.Event()
        holder, held = _hold_one_session(server, split, never)
        holder.join(timeout=30)
        replies, code = held.get(timeout=1)
        assert replies[0].opened.admitted and code == grpc.StatusCode.CANCELLED  # reaped when idle
        assert server.servicer.session_count == 0
        never.set()
    per_token = server.servicer.bytes_per_token
    with serving(split, kv_budget_bytes=per_token * 16) as server:
        replies, code = raw_call(server, [_open(split, max_tokens=17)])
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "KV budget" in replies[0].opened.reason
        cfg = SamplingConfig(max_new_tokens=4)
        assert list(generate_remote(split, PROMPTS[0], cfg, remote(server))) == reference(split, PROMPTS[0], cfg)


def test_nothing_left_running(split):
    with serving(split) as server:
        list(generate_remote(split, PROMPTS[0], SamplingConfig(max_new_tokens=2), remote(server)))
    time.sleep(0.1)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("splitllm-")]


def test_shard_split_with_real_tokenizer_over_the_wire(tiny_model_dir, tmp_path):
    """The deployed shape: edge and cloud from `splitllm quantize` shards (4-bit edge layers,
    8-bit embedding and KV), a real tokenizer's prompt; over the wire = in-process."""
    from splitcli.deploy import build_shard_split
    from splitcli.model.loader import load_model
    from splitcli.model.shards import QuantSpec, write_shards

    lm = load_model(str(tiny_model_dir))
    manifest = write_shards(lm, tiny_model_dir, QuantSpec(split_layer=2, front_bits=4, group_size=32, kv_bits=8),
                            tmp_path / "shards")
    split, tokenizer, _ = build_shard_split(tmp_path / "shards")
    prompt = tokenizer("The river valley was", add_special_tokens=True)["input_ids"]
    cfg = SamplingConfig(max_new_tokens=5)
    ref = generate(split.session(), torch.tensor([prompt]), None, cfg).tokens[0].tolist()
    server = CloudServer(split, CloudSettings(model_sha256=manifest.model_sha256, api_key=KEY))
    try:
        cloud = RemoteCloud(f"127.0.0.1:{server.port}", KEY, manifest.model_sha256, timeout_s=60.0)
        eos = tokenizer.eos_token_id
        until_eos = ref[:ref.index(eos) + 1] if eos in ref else ref  # generate pads after eos; remote stops
        assert list(generate_remote(split, prompt, cfg, cloud, eos_token_ids={eos})) == until_eos
    finally:
        server.stop(0)


def test_many_malformed_streams_leave_the_server_serving(lm):
    """Undecodable protobuf bytes and garbage frames, many times over, beside a good session."""
    split = build_split(lm, SplitSpec(split_layer=2))
    cfg = SamplingConfig(max_new_tokens=10)
    good_ref = reference(split, PROMPTS[0], cfg)
    with serving(split) as server:
        codes = set()

        def hammer():
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                raw = channel.stream_stream("/splitllm.serve.v1.SplitCloud/Session")  # bytes in, bytes out
                for i in range(60):
                    try:
                        list(raw(iter([b"\xff\x07" * (i + 1)]), metadata=[("authorization", f"Bearer {KEY}")],
                                 timeout=10))
                    except grpc.RpcError as exc:
                        codes.add(exc.code())
            for i in range(60):
                payload = bytes((i * 37 + k) % 256 for k in range(64 + i))
                garbage = pb.ClientMessage(step=pb.Step(step_id=0, position=0, n_tokens=1, payload=payload))
                codes.add(raw_call(server, [_open(split), garbage])[1])
            return True

        good, _ = _run_concurrently([lambda: list(generate_remote(split, PROMPTS[0], cfg, remote(server))), hammer])
        # gRPC itself answers bytes that are not a ClientMessage with INTERNAL; bad frames are ours
        assert good == good_ref and codes == {grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT}
        assert server.servicer.session_count == 0
        assert list(generate_remote(split, PROMPTS[0], cfg, remote(server))) == good_ref


def test_counters_and_drain(lm):
    split = build_split(lm, SplitSpec(split_layer=2))
    cfg = SamplingConfig(max_new_tokens=3)
    with serving(split) as server:
        list(generate_remote(split, PROMPTS[0], cfg, remote(server)))
        raw_call(server, [_open(split, model_sha256="0")])
        c = server.servicer.counters()
        assert (c.sessions_admitted, c.sessions_refused, c.prompt_tokens, c.generated_tokens) == (1, 1, 5, 3)
        assert c.frame_bytes_in > 5 * 64 * 4
        assert server.drain(timeout_s=5.0)
        replies, code = raw_call(server, [_open(split)])
        assert code == grpc.StatusCode.UNAVAILABLE and "draining" in replies[0].opened.reason


@pytest.mark.parametrize("w,q_w1,i_kv", [(0, 16, 0), (2, 16, 0), (5, 16, 0), (9, 16, 0), (3, 4, 0),
                                         (2, 16, 1), (3, 4, 1)])
def test_handoff_over_the_wire_equals_in_process(lm, w, q_w1, i_kv):
    """I_kv = 0 handoff after w edge-local tokens (w = 9 > max_new_tokens: the cloud is never
    used); q_w1 = 4: the edge's local model is its 4-bit OPSC model."""
    from splitcli.deploy import handoff_session, opsc_edge_model
    from splitcli.runtime.handoff import handoff_generate
    from splitcli.serve.handoff import generate_remote_handoff

    split = build_split(lm, SplitSpec(split_layer=2, q_w1=q_w1, group_size=32))
    cfg = SamplingConfig(max_new_tokens=7)
    ids = torch.tensor([PROMPTS[2]])
    ref = handoff_generate(handoff_session(lm, split), ids, None, cfg, local_tokens=w, i_kv=i_kv).tokens[0].tolist()
    edge_model = opsc_edge_model(lm.model, split.spec)
    with serving(split) as server:
        got = list(generate_remote_handoff(split, edge_model, PROMPTS[2], cfg, remote(server), local_tokens=w,
                                           i_kv=i_kv))
        assert got == ref
        assert server.servicer.counters().sessions_admitted == (1 if w < cfg.max_new_tokens else 0)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_handoff_over_the_wire_runs_the_local_stage_on_the_in_process_path(family):
    """The networked local stage runs where the in-process one does: the fast path for a model it
    supports (llama), eager otherwise (mistral's sliding window); tokens equal for I_kv = 0 and 1."""
    from splitcli.deploy import handoff_session, opsc_edge_model
    from splitcli.runtime.fast import FastHandoffSession
    from splitcli.runtime.handoff import handoff_generate
    from splitcli.serve.handoff import generate_remote_handoff

    lm_ = SimpleNamespace(model=_tiny(family), tokenizer=None, sha256=SHA)
    split = build_split(lm_, SplitSpec(split_layer=2))
    cfg = SamplingConfig(max_new_tokens=7)
    ids = torch.tensor([PROMPTS[2]])
    for i_kv in (0, 1):
        session = handoff_session(lm_, split)
        assert isinstance(session, FastHandoffSession) == (family == "llama")
        ref = handoff_generate(session, ids, None, cfg, local_tokens=3, i_kv=i_kv).tokens[0].tolist()
        with serving(split) as server:
            got = list(generate_remote_handoff(split, opsc_edge_model(lm_.model, split.spec), PROMPTS[2], cfg,
                                               remote(server), local_tokens=3, i_kv=i_kv))
        assert got == ref, f"I_kv={i_kv}"
