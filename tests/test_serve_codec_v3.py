"""Codec format v3 over serve (127.0.0.1, ports chosen at run time): the edge's calibrated codec
(channel scale, classes, symbol model, the τ / q̄ a target chose) crosses in the Open, so the cloud
decodes with exactly the edge's state even where its own calibration differs (the edge calibrates
on its quantized layers, the cloud on the full model). Hostile calibrated state is refused with
INVALID_ARGUMENT before the session exists, and an Open without it (an older edge) still works."""

from __future__ import annotations

import contextlib
import dataclasses
from types import SimpleNamespace

import grpc
import pytest
import torch

from conftest import _tiny
from splitcli.codec.calibrate import calibrate_settings
from splitcli.deploy import SplitSpec, build_split
from splitcli.errors import SplitLLMError
from splitcli.plan.codec_settings import CodecSettings
from splitcli.runtime.codec_wire import CodecWire
from splitcli.runtime.generate import SamplingConfig, generate
from splitcli.serve.client import RemoteCloud, generate_remote, open_message
from splitcli.serve.cloud import CloudServer, CloudServicer, CloudSettings
from splitcli.serve.proto import split_pb2 as pb
from splitcli.serve.protocol import chunk_frame
from test_serve_client import KEY, SHA, raw_call

PROMPT = [1, 5, 9, 33, 7, 12, 40]
ROT_ALPHA = CodecSettings(rotation="hadamard", rotation_seed=7, channel_alpha=0.5, q_bar=4)
TARGET = CodecSettings(rotation="hadamard", rotation_seed=7, channel_alpha=0.5, target_rel_error=0.1)


@pytest.fixture(scope="module")
def lm():
    return SimpleNamespace(model=_tiny("llama"), tokenizer=None, sha256=SHA)


def calibrated_split(lm, codec: CodecSettings, q_w1: int, seed: int):
    """A tabq split whose codec is calibrated on its own edge half's hidden states for random
    token ids (the tiny model has no tokenizer for the WikiText slice), as deployment does."""
    base = build_split(lm, SplitSpec(split_layer=2, q_w1=q_w1, group_size=32, wire="none"))
    ids = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(seed))
    hidden = base.edge(ids[None], torch.arange(200)[None], None, base.edge.new_cache())[0].float()
    cfg, _ = calibrate_settings(hidden, codec)
    spec = dataclasses.replace(base.spec, wire="tabq", codec=codec)
    return dataclasses.replace(base, spec=spec, wire=CodecWire(cfg, keep_stats=False))


@contextlib.contextmanager
def serving(split, servicer_cls=CloudServicer, **settings):
    cloud_settings = CloudSettings(**{"model_sha256": SHA, "api_key": KEY, **settings})
    server = CloudServer(split, cloud_settings, servicer=servicer_cls(split, cloud_settings))
    try:
        yield server
    finally:
        server.stop(0)
    assert server.servicer.session_count == 0 and server.servicer.kv_used == 0


def remote(server):
    return RemoteCloud(f"127.0.0.1:{server.port}", KEY, SHA, timeout_s=60.0)


def reference(split, prompt, n):
    return generate(split.session(), torch.tensor([prompt]), None, SamplingConfig(max_new_tokens=n)).tokens[0].tolist()


@pytest.mark.parametrize("codec", [ROT_ALPHA, TARGET, dataclasses.replace(ROT_ALPHA, entropy=False), CodecSettings()],
                         ids=["rotation+alpha", "target", "no-entropy", "v2-defaults"])
def test_v3_codec_over_the_wire_equals_in_process(lm, codec):
    """The edge (4-bit layers, calibrated on them) and a cloud whose own calibration (full model,
    other text) differs: greedy tokens over serve equal the in-process split with the edge's codec.
    (v2 defaults: the channel classes and symbol model differ likewise.)"""
    edge = calibrated_split(lm, codec, q_w1=4, seed=1)
    cloud = calibrated_split(lm, codec, q_w1=16, seed=2)
    # the Open's state must be used: the cloud's own differs
    assert (edge.wire.cfg.channel_scale, edge.wire.cfg.channel_class) != \
        (cloud.wire.cfg.channel_scale, cloud.wire.cfg.channel_class)
    if codec.channel_alpha:
        assert edge.wire.cfg.rotation_seed == 7 and edge.wire.cfg.channel_scale is not None
    if codec.target_rel_error is not None:
        assert edge.wire.cfg.tau is not None and edge.wire.cfg.q_bar in range(3, 9)  # calibration chose them
    want = reference(edge, PROMPT, 8)
    with serving(cloud) as server:
        assert list(generate_remote(edge, PROMPT, SamplingConfig(max_new_tokens=8), remote(server))) == want
        # Algorithm 2 compressing harder: a step at q̄ 3 decodes with the edge's codec cut to it
        replies, code = raw_call(server, [open_message(edge, remote(server), 32, SamplingConfig()),
                                          *_step_at(edge, PROMPT, q_bar=3), pb.ClientMessage(close=pb.Close())])
        assert code is None and replies[1].token.token_id == _in_process_at(edge, PROMPT, q_bar=3)


def _step_at(split, prompt, q_bar):
    from splitcli.runtime.adaptive import with_q_bar

    h = split.edge(torch.tensor([prompt]), torch.arange(len(prompt))[None], None, split.edge.new_cache())[0]
    wire = CodecWire(with_q_bar(split.wire.cfg, q_bar), keep_stats=False)
    return chunk_frame(wire.encode(h), 0, 0, len(prompt), 1 << 20, q_bar=q_bar)


def _in_process_at(split, prompt, q_bar):
    from splitcli.runtime.adaptive import with_q_bar

    session = split.session(wire=CodecWire(with_q_bar(split.wire.cfg, q_bar), keep_stats=False))
    return generate(session, torch.tensor([prompt]), None, SamplingConfig(max_new_tokens=1)).tokens[0].tolist()[0]


def _hostile(edge, server, change):
    msg = open_message(edge, remote(server), 32, SamplingConfig())
    change(msg.open)
    return msg


def _set_scale(values):
    def change(o):
        del o.codec_config.channel_scale[:]
        o.codec_config.channel_scale.extend(values)
    return change


def test_hostile_codec_config_is_refused_and_the_server_keeps_serving(lm):
    edge = calibrated_split(lm, ROT_ALPHA, q_w1=4, seed=1)
    cloud = calibrated_split(lm, ROT_ALPHA, q_w1=16, seed=2)
    ok = list(edge.wire.cfg.channel_scale)
    cases = {
        "short scale": (_set_scale(ok[:-1]), "channel_scale has 63 entries; the model's hidden size is 64"),
        "long scale": (_set_scale(ok * 1000), "channel_scale has 64000 entries"),
        "NaN scale": (_set_scale([float("nan")] + ok[1:]), "must be finite"),
        "negative scale": (_set_scale([-1.0] + ok[1:]), "must be finite"),
        "zero scale": (_set_scale([0.0] + ok[1:]), "must be finite"),
        "huge scale": (_set_scale([1e30] + ok[1:]), "must be finite"),
        "no scale": (_set_scale([]), "channel_scale must be given with channel_alpha 0.5"),
        "class out of range": (lambda o: setattr(o.codec_config, "channel_class", b"\x20" * 64),
                               "channel_class entries must lie in [0, 16)"),
        "class length": (lambda o: setattr(o.codec_config, "channel_class", b"\x00" * 65), "channel_class has 65"),
        "symbol model": (lambda o: o.codec_config.symbol_model.add(counts=[1, 2]), "symbol_model needs"),
        "q bar": (lambda o: setattr(o.codec_config, "q_bar", 42), "q_bar = 42"),
        "rotation seed": (lambda o: setattr(o.codec_config, "rotation_seed", 8), "rotation_seed 8 does not match"),
        "no rotation": (lambda o: o.codec_config.ClearField("rotation_seed"), "rotation_seed None does not match"),
        "rotation kind": (lambda o: setattr(o.codec, "rotation", 7), "codec rotation 7 is unknown"),
        "version": (lambda o: setattr(o.codec_config, "version", 9), "version 9 is not supported"),
    }
    want = reference(edge, PROMPT, 6)
    with serving(cloud, max_message_bytes=1 << 20) as server:
        for name, (change, reason) in cases.items():
            replies, code = raw_call(server, [_hostile(edge, server, change)])
            assert code == grpc.StatusCode.INVALID_ARGUMENT, name
            assert not replies[0].opened.admitted and reason in replies[0].opened.reason, (name, replies[0].opened.reason)
            assert server.servicer.session_count == 0
        assert server.servicer.counters().sessions_refused == len(cases)
        assert list(generate_remote(edge, PROMPT, SamplingConfig(max_new_tokens=6), remote(server))) == want


def test_settings_that_differ_from_the_served_ones_are_named(lm):
    edge = calibrated_split(lm, ROT_ALPHA, q_w1=4, seed=1)
    plain = build_split(lm, SplitSpec(split_layer=2, wire="tabq", codec=CodecSettings(tau=3.0, entropy=False, q_bar=4)))
    with serving(plain) as server:
        replies, code = raw_call(server, [open_message(edge, remote(server), 32, SamplingConfig())])
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        reason = replies[0].opened.reason
        assert "channel_alpha 0.5 (served 0.0)" in reason and "rotation 'hadamard' (served 'none')" in reason


def test_an_old_style_open_still_works(lm):
    """An Open without the v3 fields and without codec_config (an edge before this change): the
    server decodes with its own calibration, as before."""
    split = build_split(lm, SplitSpec(split_layer=2, wire="tabq", codec=CodecSettings(tau=3.0, entropy=False, q_bar=6)))
    prompt = PROMPT[:5]
    want = reference(split, prompt, 3)
    with serving(split) as server:
        msg = open_message(split, remote(server), 32, SamplingConfig())
        old = pb.CodecSettings()
        old.ParseFromString(_v2_codec_bytes(msg.open.codec))
        msg.open.codec.CopyFrom(old)
        msg.open.ClearField("codec_config")
        assert not msg.open.HasField("codec_config") and not msg.open.codec.HasField("target_rel_error")
        cache, steps, pos = split.edge.new_cache(), [], 0
        for i, ids in enumerate([prompt] + [[t] for t in want[:-1]]):
            h = split.edge(torch.tensor([ids]), torch.arange(pos, pos + len(ids))[None], None, cache)[0]
            steps += chunk_frame(split.wire.encode(h), i, pos, len(ids), 1 << 20)
            pos += len(ids)
        replies, code = raw_call(server, [msg, *steps, pb.ClientMessage(close=pb.Close())])
        assert code is None and replies[0].opened.admitted and replies[0].opened.codec_config
        assert [r.token.token_id for r in replies[1:]] == want


def _v2_codec_bytes(codec: pb.CodecSettings) -> bytes:
    """`codec` as an edge before v3 serialized it: fields 1-7 only."""
    keep = pb.CodecSettings(q_bar=codec.q_bar, q_bar_min=codec.q_bar_min, delta=codec.delta, entropy=codec.entropy,
                            n_classes=codec.n_classes)
    for f in ("tau", "tau_quantile"):
        if codec.HasField(f):
            setattr(keep, f, getattr(codec, f))
    return keep.SerializeToString()


class _OldServicer(CloudServicer):
    """A server from before Opened.codec_config: it never says it decodes with the edge's state."""

    def Session(self, request_iterator, context):
        for reply in super().Session(request_iterator, context):
            if reply.WhichOneof("kind") == "opened":
                reply.opened.ClearField("codec_config")
            yield reply


def test_the_edge_refuses_a_server_that_cannot_take_its_calibration(lm):
    edge = calibrated_split(lm, ROT_ALPHA, q_w1=4, seed=1)
    with serving(edge, servicer_cls=_OldServicer) as server:
        with pytest.raises(SplitLLMError, match="predates codec v3 calibration"):
            list(generate_remote(edge, PROMPT, SamplingConfig(max_new_tokens=2), remote(server)))
    rotation_only = calibrated_split(lm, CodecSettings(rotation="hadamard", rotation_seed=7, entropy=False, tau=3.0),
                                     q_w1=16, seed=1)
    with serving(rotation_only, servicer_cls=_OldServicer) as server:  # its seed is in every frame: fine
        assert list(generate_remote(rotation_only, PROMPT, SamplingConfig(max_new_tokens=3), remote(server))) == \
            reference(rotation_only, PROMPT, 3)
