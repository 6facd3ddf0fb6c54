"""The edge side of serving (`serve.client`) runs its half on the fast decode path, as `generate`
does: the hidden states it sends are bit for bit those of the in-process fast edge half, the
greedy tokens over the wire equal the in-process fast split's, and a model the fast path does not
support (or a handoff's own cache) keeps the eager half. Server on 127.0.0.1, port chosen at run
time, stopped by each test."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import _tiny
from splitcli.deploy import SplitSpec, build_split
from splitcli.model.fast import FastEdgeHalf
from splitcli.runtime.fast import fast_edge_half, fast_split_session
from splitcli.runtime.generate import SamplingConfig, generate
from splitcli.serve.client import RemoteCloud, _edge_and_cache, generate_remote
from splitcli.serve.cloud import CloudServer, CloudSettings

SHA, KEY = "0" * 63 + "5", "edge-key"
PROMPT = [3, 14, 15, 92, 65, 35]


@pytest.fixture(scope="module", params=["none", "fp16"])
def split(request):
    lm = SimpleNamespace(model=_tiny("llama"), tokenizer=None, sha256=SHA)
    return build_split(lm, SplitSpec(split_layer=2, wire=request.param))


def test_the_stage_runs_the_fast_edge_half_with_the_reserved_capacity(split):
    edge, cache = _edge_and_cache(split, None, 37)
    assert isinstance(edge, FastEdgeHalf) and edge is fast_edge_half(split.edge)
    assert cache.capacity == 37
    own = split.edge.new_cache()  # a handoff brings its own (eager) cache: the eager half runs it
    assert _edge_and_cache(split, own, 37) == (split.edge, own)


def test_a_model_the_fast_path_does_not_support_keeps_the_eager_half():
    lm = SimpleNamespace(model=_tiny("gemma2"), tokenizer=None, sha256=SHA)  # logit softcapping
    split = build_split(lm, SplitSpec(split_layer=2, wire="none"))
    edge, _ = _edge_and_cache(split, None, 16)
    assert edge is split.edge


def test_sent_hidden_states_and_tokens_equal_the_in_process_fast_split(split, monkeypatch):
    cfg = SamplingConfig(max_new_tokens=6)
    sent: list[torch.Tensor] = []
    wire_type = type(split.wire)
    encode = wire_type.encode

    def recording(self, hidden):
        sent.append(hidden.clone())
        return encode(self, hidden)

    server = CloudServer(split, CloudSettings(model_sha256=SHA, api_key=KEY))
    try:
        cloud = RemoteCloud(target=f"127.0.0.1:{server.port}", api_key=KEY, model_sha256=SHA, timeout_s=60.0)
        with monkeypatch.context() as m:
            m.setattr(wire_type, "encode", recording)
            got = list(generate_remote(split, PROMPT, cfg, cloud))
    finally:
        server.stop(0)
    ref = generate(fast_split_session(split), torch.tensor([PROMPT]), None, cfg).tokens[0].tolist()
    assert got == ref and len(got) == cfg.max_new_tokens

    # The same steps on the in-process fast edge half: prefill, then one token at a time.
    edge = fast_edge_half(split.edge)
    cache = edge.new_cache()
    steps = [torch.tensor([PROMPT])] + [torch.tensor([[t]]) for t in got[:-1]]
    assert len(sent) == len(steps)
    position = 0
    for ids, hidden in zip(steps, sent, strict=True):
        t = ids.shape[1]
        want = edge(ids, torch.arange(position, position + t)[None], None, cache)
        assert torch.equal(hidden, want.reshape(t, -1))
        position += t


def test_an_edge_of_no_layers_has_no_fast_twin(split):
    """The cloud-only baseline's 'edge' (embeddings only, ℓ = 0, no KV bits) keeps its own call."""
    from splitcli.bench.serve_replay import _EmbedOnly

    embed = _EmbedOnly(split.edge.parts)
    assert fast_edge_half(embed) is None
    assert _edge_and_cache(SimpleNamespace(edge=embed), None, 8) == (embed, None)
