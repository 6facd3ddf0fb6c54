"""Fault soak of a real `splitllm serve-cloud` subprocess (issue 13, acceptance "Faults"): 1,000
malformed frames and 200 bad requests (unauthenticated, oversized, out-of-order, wrong model
hash / ℓ / wire / protocol) against a server on 127.0.0.1 (port chosen at run time), while good
sessions generate. Every fault gets its documented gRPC status; afterwards the server is alive, the
concurrent good sessions' greedy outputs equal the in-process split's, a new session is served
right, and the server's RSS (measured on the child process) is within 5% of what it was after
warm-up. Every loop is bounded in count and time; the server is stopped in a finally."""

from __future__ import annotations

import struct
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import pytest
import torch

from splitcli.deploy import SplitSpec, build_split
from splitcli.runtime.generate import SamplingConfig, generate
from splitcli.serve.client import RemoteCloud, generate_remote
from splitcli.serve.proto import split_pb2 as pb
from splitcli.serve.proto import split_pb2_grpc as pb_grpc
from splitcli.serve.protocol import PROTOCOL_VERSION, WIRE_TO_PB, chunk_frame
from test_serve_cli import KEY, serve_cloud

PROMPT = [1, 5, 9, 33, 7, 12]
GOOD_PROMPT = [17, 18, 19, 20, 21, 22, 23]
SERVER_MAX_MESSAGE = 4 << 20   # serve-cloud's defaults (CloudSettings): one message, one step's chunks
SERVER_MAX_FRAME = 64 << 20
N_MALFORMED, N_BAD = 1000, 200
C = grpc.StatusCode


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from splitcli.model.loader import load_model

    lm = load_model(str(tiny_model_dir))
    return lm, build_split(lm, SplitSpec(split_layer=2, wire="none"))


def _reference(split, prompt, n):
    return generate(split.session(), torch.tensor([prompt]), None,
                    SamplingConfig(max_new_tokens=n)).tokens[0].tolist()


def _open(lm, split, **kw):
    fields = dict(model_sha256=lm.sha256, split_layer=split.spec.split_layer, wire=WIRE_TO_PB[split.spec.wire],
                  max_tokens=64, kv_mode=pb.KV_HIDDEN, protocol_version=PROTOCOL_VERSION)
    return pb.ClientMessage(open=pb.Open(**{**fields, **kw}))


def _step(**kw):
    return pb.ClientMessage(step=pb.Step(**kw))


def _raw_frame(n, h, payload=None, code=0, magic=b"SRAW"):
    body = payload if payload is not None else b"\0" * (n * h * 4)
    return struct.pack("<4sBII", magic, code, n, h) + body


def _malformed(i, lm, split, good_frame, hidden):
    """The i-th malformed stream (opened correctly, then a bad step): (messages, expected status)."""
    n = len(PROMPT)
    op = _open(lm, split)
    kind = i % 12
    r = (i * 7919) % 251 + 1
    if kind == 0:    # garbage bytes of varying length
        return "garbage", [op, _step(step_id=0, position=0, n_tokens=n, payload=bytes((i + k * r) % 256 for k in range(r * 3)))], C.INVALID_ARGUMENT
    if kind == 1:    # a good frame truncated
        return "truncated", [op, _step(step_id=0, position=0, n_tokens=n, payload=good_frame[:len(good_frame) - r])], C.INVALID_ARGUMENT
    if kind == 2:    # a good frame with bytes appended
        return "too long", [op, _step(step_id=0, position=0, n_tokens=n, payload=good_frame + b"\x01" * r)], C.INVALID_ARGUMENT
    if kind == 3:    # a well-formed frame of the wrong shape
        return "wrong shape", [op, _step(step_id=0, position=0, n_tokens=n, payload=_raw_frame(n, hidden + 1 + r % 3))], C.INVALID_ARGUMENT
    if kind == 4:    # a header claiming a huge tensor, a tiny body
        return "huge header", [op, _step(step_id=0, position=0, n_tokens=n, payload=_raw_frame(1 << 20, 1 << 12 + r % 8, b"\0" * r))], C.INVALID_ARGUMENT
    if kind == 5:    # a bad magic / dtype code
        return "bad header", [op, _step(step_id=0, position=0, n_tokens=n, payload=_raw_frame(n, hidden, code=9 if i % 2 else 0, magic=b"SRAW" if i % 2 else b"XRAW"))], C.INVALID_ARGUMENT
    if kind == 6:    # NaN hidden states
        nan = torch.full((n, hidden), float("nan")).numpy().tobytes()
        return "nan", [op, _step(step_id=0, position=0, n_tokens=n, payload=_raw_frame(n, hidden, nan))], C.INVALID_ARGUMENT
    if kind == 7:    # a chunk header: more chunks than allowed
        return "chunk count", [op, _step(step_id=0, position=0, n_tokens=n, payload=good_frame[:64], chunk_count=4097 + r)], C.INVALID_ARGUMENT
    if kind == 8:    # chunks of one step disagreeing on their header
        chunks = chunk_frame(good_frame, 0, 0, n, 1 + len(good_frame) // 3)
        chunks[1].step.n_tokens = n + 1 + r % 5
        return "chunk mismatch", [op, *chunks], C.INVALID_ARGUMENT
    if kind == 9:    # a step at the wrong position
        return "wrong position", [op, _step(step_id=0, position=1 + r, n_tokens=n, payload=good_frame)], C.INVALID_ARGUMENT
    if kind == 10:   # zero tokens, or more than admitted
        return "token count", [op, _step(step_id=0, position=0, n_tokens=0 if i % 2 else 65 + r, payload=good_frame)], C.OUT_OF_RANGE
    return "not protobuf", None, C.INTERNAL  # bytes that are no ClientMessage (gRPC's own answer)


def _bad_request(i, lm, split, good_frame):
    """The i-th bad request: (kind, messages, key or None, expected status)."""
    n = len(PROMPT)
    op = _open(lm, split)
    good = _step(step_id=0, position=0, n_tokens=n, payload=good_frame)
    kind = i % 10
    if kind == 0:
        return "no key", [op, good], None, C.UNAUTHENTICATED
    if kind == 1:
        return "wrong key", [op, good], KEY + "x" * (i % 5) if i % 3 else "", C.UNAUTHENTICATED
    if kind == 2:    # one message over the server's max_message_bytes
        return "oversized message", [op, _step(step_id=0, position=0, n_tokens=n, payload=b"\0" * (SERVER_MAX_MESSAGE + 1 + i))], KEY, C.RESOURCE_EXHAUSTED
    if kind == 3:    # a step claiming far more tokens than the session was admitted for
        return "huge claimed size", [op, _step(step_id=0, position=0, n_tokens=(1 << 31) + i, payload=good_frame)], KEY, C.OUT_OF_RANGE
    if kind == 4:    # skips step 0
        return "out of order", [op, _step(step_id=1 + i % 7, position=0, n_tokens=n, payload=good_frame)], KEY, C.ABORTED
    if kind == 5:    # step 0, then step 2
        return "out of order after a step", [op, good, _step(step_id=2, position=n, n_tokens=1, payload=good_frame)], KEY, C.ABORTED
    if kind == 6:
        return "wrong model hash", [_open(lm, split, model_sha256=f"{i:064x}"), good], KEY, C.FAILED_PRECONDITION
    if kind == 7:
        return "wrong split layer", [_open(lm, split, split_layer=1 if i % 2 else 3), good], KEY, C.FAILED_PRECONDITION
    if kind == 8:
        return "wrong wire", [_open(lm, split, wire=pb.WIRE_FP16 if i % 2 else pb.WIRE_TABQ), good], KEY, C.FAILED_PRECONDITION
    return "wrong protocol version", [_open(lm, split, protocol_version=PROTOCOL_VERSION + 1 + i % 3), good], KEY, C.FAILED_PRECONDITION


def _call(channel, msgs, key, raw=None):
    """One stream: (replies, status code or None for OK)."""
    metadata = [("authorization", f"Bearer {key}")] if key is not None else []
    try:
        if raw is not None:
            replies = list(channel.stream_stream("/splitllm.serve.v1.SplitCloud/Session")(
                iter([raw]), metadata=metadata, timeout=30))
        else:
            replies = list(pb_grpc.SplitCloudStub(channel).Session(iter(msgs), metadata=metadata, timeout=30))
        return replies, None
    except grpc.RpcError as exc:
        return [], exc.code()


def _rss(proc):
    return psutil.Process(proc.pid).memory_info().rss


def test_thousand_malformed_frames_and_200_bad_requests(tiny, tiny_model_dir, tmp_path):
    lm, split = tiny
    hidden = split.cloud.parts.config.hidden_size
    n_good = 24
    ref = _reference(split, GOOD_PROMPT, n_good)
    ids = torch.tensor([PROMPT])
    edge_hidden = split.edge(ids, torch.arange(len(PROMPT))[None], None, split.edge.new_cache())
    good_frame = split.wire.encode(edge_hidden.reshape(len(PROMPT), -1))
    t0 = time.monotonic()
    deadline = t0 + 240  # every loop below stops here whatever its count

    # the server subprocess of test_serve_cli: started, its address read, SIGTERM'd on exit
    with serve_cloud(tiny_model_dir, tmp_path=tmp_path) as (proc, target, _metrics):
        cloud = RemoteCloud(target=target, api_key=KEY, model_sha256=lm.sha256, timeout_s=60.0, retries=0)
        cfg = SamplingConfig(max_new_tokens=n_good)
        opts = [("grpc.max_send_message_length", 2 * SERVER_MAX_MESSAGE),
                ("grpc.max_receive_message_length", 2 * SERVER_MAX_MESSAGE)]
        with grpc.insecure_channel(target, options=opts) as channel:
            for _ in range(3):  # warm-up: good sessions
                assert list(generate_remote(split, GOOD_PROMPT, cfg, cloud)) == ref
            time.sleep(1.0)
            rss_before = _rss(proc)

            stop = threading.Event()
            good_outputs: list[list[int]] = []

            def good_sessions():  # good sessions, one after the other, while the faults run
                while not stop.is_set() and len(good_outputs) < 500 and time.monotonic() < deadline:
                    good_outputs.append(list(generate_remote(split, GOOD_PROMPT, cfg, cloud)))

            jobs = [("malformed",) + _malformed(i, lm, split, good_frame, hidden) for i in range(N_MALFORMED)]
            jobs += [("bad",) + _bad_request(i, lm, split, good_frame) for i in range(N_BAD)]
            jobs = [jobs[(i * 613) % len(jobs)] for i in range(len(jobs))]  # interleave the kinds (613 ⊥ 1200)
            assert len({id(j) for j in jobs}) == N_MALFORMED + N_BAD

            def run(job):
                if time.monotonic() > deadline:
                    return job, "skipped (deadline)", 0.0
                started = time.monotonic()
                if job[0] == "malformed":
                    _, kind, msgs, expected = job
                    raw = b"\xff\x07" * (1 + len(kind)) if msgs is None else None
                    _, code = _call(channel, msgs, KEY, raw=raw)
                else:
                    _, kind, msgs, key, expected = job
                    _, code = _call(channel, msgs, key)
                return job, code, time.monotonic() - started

            good_thread = threading.Thread(target=good_sessions, name="soak-good-sessions")
            good_thread.start()
            try:
                with ThreadPoolExecutor(max_workers=3, thread_name_prefix="soak-faults") as pool:
                    results = list(pool.map(run, jobs))
            finally:
                stop.set()
                good_thread.join(timeout=max(1.0, deadline - time.monotonic() + 60))
            fault_s = time.monotonic() - t0

            seen: dict[tuple[str, str], Counter] = {}
            wrong = []
            for job, code, _ in results:
                kind, expected = job[1], job[-1]
                seen.setdefault((job[0], kind), Counter())[getattr(code, "name", str(code))] += 1
                if code != expected:
                    wrong.append((job[0], kind, expected.name, getattr(code, "name", str(code))))
            report = "\n".join(f"  {group:9s} {kind:26s} {dict(c)}" for (group, kind), c in sorted(seen.items()))
            print(f"\nfault statuses ({len(results)} streams, {fault_s:.1f} s):\n{report}")
            assert not wrong, f"{len(wrong)} faults got another status, e.g. {wrong[:5]}\n{report}"
            assert sum(1 for j in jobs if j[0] == "malformed") == N_MALFORMED
            assert sum(1 for j in jobs if j[0] == "bad") == N_BAD

            assert proc.poll() is None, "serve-cloud died under the faults"
            assert not good_thread.is_alive()
            assert good_outputs and all(out == ref for out in good_outputs), \
                f"{sum(out != ref for out in good_outputs)} of {len(good_outputs)} concurrent good sessions differ"
            assert list(generate_remote(split, PROMPT, cfg, cloud)) == _reference(split, PROMPT, n_good)

            time.sleep(2.0)  # let the server's freed sessions and gRPC buffers settle
            rss_after = _rss(proc)
        growth = rss_after / rss_before - 1
        print(f"serve-cloud RSS: before {rss_before / 2**20:.1f} MiB, after {rss_after / 2**20:.1f} MiB "
              f"({growth:+.2%}); {len(good_outputs)} concurrent good sessions")
        assert abs(growth) <= 0.05, f"RSS before {rss_before} B, after {rss_after} B ({growth:+.2%})"
    assert proc.returncode == 0, f"serve-cloud exited {proc.returncode} after SIGTERM"
