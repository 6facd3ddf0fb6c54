"""The Ray replica's session code without Ray: `SplitReplica` drives `CloudServicer.Session`
through in-process streams, so a replica answers exactly as a local serve-cloud does (tiny model,
no network). Ray itself is tested in test_serve_ray.py."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import _tiny
from splitcli.deploy import SplitSpec, build_split
from splitcli.runtime.generate import SamplingConfig, generate
from splitcli.serve.client import RemoteCloud, open_message
from splitcli.serve.cloud import CloudSettings
from splitcli.serve.proto import split_pb2 as pb
from splitcli.serve.protocol import chunk_frame
from splitcli.serve.ray_replica import SplitReplica

SHA = "0" * 63 + "2"


@pytest.fixture(scope="module")
def split():
    lm = SimpleNamespace(model=_tiny("llama"), tokenizer=None, sha256=SHA)
    return build_split(lm, SplitSpec(split_layer=2, wire="fp16"))


def replica(split, **settings):
    cfg = CloudSettings(**{"model_sha256": "-", "api_key": "internal", **settings})
    return SplitReplica(lambda: (split, SHA), cfg)


def _open(split, max_tokens=32, sha=SHA):
    cloud = RemoteCloud(target="-", api_key="-", model_sha256=sha)
    return open_message(split, cloud, max_tokens, SamplingConfig()).SerializeToString()


def _drive(rep, split, key, prompt, n):
    """A session through the replica's API as the front drives it: the edge half here, each
    step's frame fed to the replica; returns the tokens."""
    opened = rep.open(key, _open(split))
    assert opened["status"] is None, opened
    assert pb.ServerMessage.FromString(opened["replies"][0]).opened.admitted
    cache, pos, out = split.edge.new_cache(), 0, []
    ids = torch.tensor([prompt])
    for step in range(n):
        hidden = split.edge(ids, torch.arange(pos, pos + ids.shape[1])[None], None, cache)
        frame = split.wire.encode(hidden.reshape(ids.shape[1], -1))
        replies = []
        for msg in chunk_frame(frame, step, pos, ids.shape[1], 1 << 20):
            answer = rep.feed(key, msg.SerializeToString(), replica=rep.replica_id)
            assert answer["status"] is None, answer
            replies += answer["replies"]
        pos += ids.shape[1]
        token = pb.ServerMessage.FromString(replies[0]).token.token_id
        out.append(token)
        ids = torch.tensor([[token]])
    done = rep.feed(key, pb.ClientMessage(close=pb.Close()).SerializeToString(), replica=rep.replica_id)
    assert done["status"] == ("OK", "")
    return out


def test_replica_sessions_equal_in_process_and_are_counted(split):
    rep = replica(split, batch_window_ms=20.0)
    try:
        prompts = [[1, 5, 9, 33, 7], [2, 40, 3], [17, 18, 19]]
        cfg = SamplingConfig(max_new_tokens=6)
        refs = [generate(split.session(), torch.tensor([p]), None, cfg).tokens[0].tolist() for p in prompts]
        outs = [None] * len(prompts)
        threads = [threading.Thread(target=lambda i=i: outs.__setitem__(i, _drive(rep, split, f"k{i}", prompts[i], 6)))
                   for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert outs == refs
        stats = rep.stats()
        assert stats["streams"] == {"k0": 6, "k1": 6, "k2": 6}  # every step of each session, here
        assert stats["sessions"] == 0 and stats["kv_used"] == 0
        assert stats["counters"]["sessions_admitted"] == 3 and stats["counters"]["generated_tokens"] == 18
        assert stats["largest_batch"] > 1  # the replica's own batcher batched concurrent sessions
    finally:
        rep.servicer.close()


def test_replica_refusals_carry_the_local_servers_status(split):
    rep = replica(split, max_sessions=1)
    try:
        wrong = rep.open("w", _open(split, sha="f" * 64))
        assert wrong["status"][0] == "FAILED_PRECONDITION" and "sha256" in wrong["status"][1]
        assert not pb.ServerMessage.FromString(wrong["replies"][0]).opened.admitted
        assert rep.open("a", _open(split))["status"] is None
        full = rep.open("b", _open(split))
        assert full["status"][0] == "RESOURCE_EXHAUSTED" and "session limit" in full["status"][1]
        # a step pinned to another replica, or for a session this replica does not hold
        for key, pin in (("a", "elsewhere"), ("zz", rep.replica_id)):
            lost = rep.feed(key, pb.ClientMessage(close=pb.Close()).SerializeToString(), replica=pin)
            assert lost["status"][0] == "UNAVAILABLE" and lost["replies"] == []
        # an out-of-order step ends that stream with ABORTED, as a local server does
        bad = pb.ClientMessage(step=pb.Step(step_id=5, position=0, n_tokens=1, payload=b"x"))
        assert rep.feed("a", bad.SerializeToString(), replica=rep.replica_id)["status"][0] == "ABORTED"
        assert rep.stats()["sessions"] == 0 and rep.servicer.kv_used == 0
    finally:
        rep.servicer.close()


def test_close_and_idle_timeout_free_the_session(split):
    rep = replica(split, idle_timeout_s=0.3)
    try:
        assert rep.open("a", _open(split))["status"] is None
        assert rep.servicer.kv_used > 0
        rep.close("a", replica=rep.replica_id)  # the front's stream ended without a Close
        assert rep.servicer.session_count == 0 and rep.servicer.kv_used == 0
        assert rep.open("b", _open(split))["status"] is None
        deadline = time.monotonic() + 10
        while rep.servicer.session_count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rep.servicer.session_count == 0  # reaped while idle
        step = pb.ClientMessage(step=pb.Step(step_id=0, position=0, n_tokens=1, payload=b""))
        gone = rep.feed("b", step.SerializeToString(), replica=rep.replica_id)
        assert gone["status"][0] in ("DEADLINE_EXCEEDED", "UNAVAILABLE")
        assert "b" in rep.stats()["streams"] and rep.stats()["sessions"] == 0
    finally:
        rep.servicer.close()
    alive = [t.name for t in threading.enumerate() if t.name.startswith("splitllm-replica-")]
    assert not alive  # every stream's thread ended with its session
