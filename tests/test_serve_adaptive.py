"""Algorithm 2 on the measured network link (serve.adaptive): a real CloudServer on 127.0.0.1
(port chosen at run time), the edge measuring its own gRPC exchanges. A fast loopback keeps the
plan (greedy output equal to in process), an uplink slowed on the edge side (an emulated link in
real time before the socket) makes the policy compress (the cloud decodes the lower q̄ frames),
drop the KV rows at a handoff, or stop; the trace records every decision. Plus the link fit, the
cloud's checks on Step.q_bar and Probe, and `generate --cloud --deadline --trace` end to end."""

from __future__ import annotations

import contextlib
import json
import math
from types import SimpleNamespace

import grpc
import pytest
import torch
from typer.testing import CliRunner

from conftest import _tiny
from splitcli.cli import app
from splitcli.deploy import SplitSpec, build_split
from splitcli.deploy.split import opsc_edge_model
from splitcli.errors import SplitLLMError
from splitcli.plan.codec_settings import CodecSettings
from splitcli.plan.early_exit import ExitPolicy
from splitcli.runtime.adaptive import measured_link_model
from splitcli.runtime.generate import SamplingConfig, generate
from splitcli.runtime.link import MeasuredLink, parse_link
from splitcli.serve.adaptive import LiveRun, RemotePolicy
from splitcli.serve.client import RemoteCloud, generate_remote, open_message
from splitcli.serve.handoff import generate_remote_handoff
from splitcli.serve.cloud import CloudServer, CloudSettings
from splitcli.serve.proto import split_pb2 as pb
from splitcli.serve.proto import split_pb2_grpc as pb_grpc
from splitcli.serve.protocol import chunk_frame

SHA, KEY = "0" * 63 + "2", "adaptive-key"
PROMPT = [1, 5, 9, 33, 7]
TABQ = CodecSettings(tau=3.0, entropy=False, q_bar=6, q_bar_min=2)
CFG = SamplingConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def lm():
    return SimpleNamespace(model=_tiny("llama"), tokenizer=None, sha256=SHA)


@pytest.fixture(scope="module")
def tabq(lm):
    return build_split(lm, SplitSpec(split_layer=2, wire="tabq", codec=TABQ))


@contextlib.contextmanager
def serving(split):
    server = CloudServer(split, CloudSettings(model_sha256=SHA, api_key=KEY))
    try:
        yield RemoteCloud(target=f"127.0.0.1:{server.port}", api_key=KEY, model_sha256=SHA, timeout_s=60.0)
    finally:
        server.stop(0)
    assert server.servicer.session_count == 0


def live(deadline_s, link=None, i_kv=1, split=None):
    policy = ExitPolicy(deadline_s, TABQ.q_bar, TABQ.q_bar_min, i_kv, measured_link_model(1e-3))
    return LiveRun(RemotePolicy(policy, parse_link(link) if link else None), split)


def decisions(run):
    return [r.decision for r in run.rows[1:]]


# -- the link fit ------------------------------------------------------------------------------

def test_measured_link_separates_latency_and_rate():
    link = MeasuredLink(window=8)
    assert link.rate_estimate() is None and link.latency_s == 0.0
    for n in (100, 5000, 100, 2000):  # seconds = 20 ms + 8 n / 1 Mbit/s, exactly
        link.add(n, 0.02 + 8 * n / 1e6)
    assert link.latency_s == pytest.approx(0.02, rel=1e-6)
    assert link.rate_estimate() == pytest.approx(1e6, rel=1e-6)
    # The link slows down under frames of one size, which cannot separate the terms: the last
    # fitted latency is kept, and the rate is what remains, so a frame of that size is predicted
    # exactly (other sizes are extrapolated on the held latency).
    for _ in range(8):
        link.add(100, 0.02 + 8 * 100 / 0.5e6)
    held = link.latency_s
    assert 0 <= held <= 0.02 + 8 * 100 / 0.5e6
    assert held + 8 * 100 / link.rate_estimate() == pytest.approx(0.02 + 8 * 100 / 0.5e6, rel=1e-6)
    link.add(100, 0.02 + 8 * 100 / 0.5e6)
    assert link.latency_s == held  # nothing to fit: held
    # A fit never puts the latency above the fastest sample, nor below 0.
    noisy = MeasuredLink()
    noisy.add(100, 0.001)
    noisy.add(1000, 0.0005)  # the larger frame was faster: no positive slope, nothing fitted
    assert noisy.latency_s == 0.0 and noisy.rate_estimate() == pytest.approx(8 * 1100 / 0.0015)
    zero = MeasuredLink()
    zero.add(0, 0.0)
    assert zero.rate_estimate() is None
    for bad in ((-1, 0.1), (10, math.nan), (1.5, 0.1)):
        with pytest.raises(SplitLLMError):
            MeasuredLink().add(*bad)
    with pytest.raises(SplitLLMError):
        MeasuredLink(window=1)
    with pytest.raises(SplitLLMError):
        RemotePolicy(ExitPolicy(0.1, 6, 2, 0, measured_link_model(1e-3)), probe_bytes=0)


# -- the policy on a real server -------------------------------------------------------------

def test_fast_loopback_keeps_the_plan_and_equals_in_process(tabq):
    reference = generate(tabq.session(), torch.tensor([PROMPT]), None, CFG).tokens[0].tolist()
    with serving(tabq) as cloud:
        run = live(5.0, split=tabq)
        tokens = list(generate_remote(tabq, PROMPT, CFG, cloud, live=run))
    assert tokens == reference
    assert decisions(run) == ["keep"] * (len(tokens) - 1)
    assert run.rows[0].stage == "prefill" and all(r.q_bar == TABQ.q_bar for r in run.rows)
    for r in run.rows[1:]:
        assert r.rate_bps > 0 and r.measured_ms > 0 and r.cloud_ms is not None and r.wire_bytes > 0
        assert not r.outage
    assert run.adaptive_server


def test_slow_uplink_makes_the_policy_compress_and_the_cloud_decodes_it(tabq):
    # At 2 kbit/s a one-token frame at the plan's q̄ 6 takes ~0.4 s or more: D = 0.4 s forces a lower q̄.
    with serving(tabq) as cloud:
        run = live(0.4, "2kbit/s", split=tabq)
        tokens = list(generate_remote(tabq, PROMPT, CFG, cloud, live=run))
    assert len(tokens) == CFG.max_new_tokens  # every step ran: the cloud decoded each lower-q̄ frame
    steps = run.rows[1:]
    assert {r.decision for r in steps} == {"compress"}, [(r.decision, r.reason) for r in steps]
    assert all(TABQ.q_bar_min <= r.q_bar < TABQ.q_bar for r in steps)
    # the frames really shrank with q̄ and the measured rate is the shaped one (within a factor 2)
    assert max(r.wire_bytes for r in steps) < run.rows[0].wire_bytes
    assert all(1e3 < r.rate_bps < 4e3 for r in steps)
    assert run.result(tokens).summary.decisions == {"compress": len(steps)}


def test_hopeless_link_stops_with_the_tokens_so_far(tabq):
    reference = generate(tabq.session(), torch.tensor([PROMPT]), None, CFG).tokens[0].tolist()
    with serving(tabq) as cloud:
        run = live(0.1, "500bit/s", split=tabq)
        tokens = list(generate_remote(tabq, PROMPT, CFG, cloud, live=run))
    assert tokens == reference[:1]  # the prefill's token, then stop: a prefix of the in-process output
    assert decisions(run) == ["stop"] and run.stopped
    summary = run.result(tokens).summary
    assert summary.stopped_early and "q_bar 2" in summary.stop_reason


def test_handoff_drops_kv_on_a_slow_link_and_keeps_it_on_a_fast_one(lm, tabq):
    edge_model = opsc_edge_model(lm.model, tabq.spec)
    with serving(tabq) as cloud:
        by_kv = {i: list(generate_remote_handoff(tabq, edge_model, PROMPT, CFG, cloud, local_tokens=2, i_kv=i))
                 for i in (0, 1)}
        fast = live(5.0, split=tabq)
        tokens = list(generate_remote_handoff(tabq, edge_model, PROMPT, CFG, cloud, local_tokens=2, i_kv=1, live=fast))
        assert tokens == by_kv[1]
        assert [r.stage for r in fast.rows] == ["local", "local", "handoff", "split", "split", "split"]
        handoff = fast.rows[2]
        assert (handoff.decision, handoff.i_kv) == ("keep", 1) and handoff.kv_bytes > 0
        # 20 kbit/s: the KV rows of layers [2, 4) for 7 positions miss D = 1 s, their hidden states fit.
        slow = live(1.0, "20kbit/s", split=tabq)
        tokens = list(generate_remote_handoff(tabq, edge_model, PROMPT, CFG, cloud, local_tokens=2, i_kv=1, live=slow))
        assert tokens == by_kv[0]  # the hidden-state handoff at the plan's q̄: as I_kv = 0 without the policy
        handoff = slow.rows[2]
        assert (handoff.decision, handoff.i_kv, handoff.kv_bytes, handoff.q_bar) == ("drop_kv", 0, 0, TABQ.q_bar)
        hopeless = live(0.05, "500bit/s", split=tabq)
        tokens = list(generate_remote_handoff(tabq, edge_model, PROMPT, CFG, cloud, local_tokens=2, i_kv=1,
                                              live=hopeless))
        assert tokens == by_kv[1][:2] and hopeless.rows[-1].decision == "stop"  # the local tokens only


def test_cloud_checks_step_q_bar_and_answers_probes(lm, tabq):
    raw = build_split(lm, SplitSpec(split_layer=2, wire="none"))
    for split, q_bar, ok in ((tabq, 4, True), (tabq, 7, False), (tabq, 1, False), (raw, 4, False)):
        with serving(split) as cloud:
            channel = cloud.channel()
            try:
                replies = _session(channel, split, cloud, q_bar)
                assert ok, replies
                assert replies[0].opened.adaptive_steps and replies[1].probe.received == 1500
                assert replies[2].token.cloud_us > 0
            except grpc.RpcError as exc:
                assert not ok
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "q̄" in exc.details()
            finally:
                channel.close()


def _session(channel, split, cloud, q_bar):
    """Open, a probe, one prefill step coded at q_bar (named in the Step); the replies."""
    from splitcli.runtime.adaptive import with_q_bar

    hidden = split.edge(torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None], None, split.edge.new_cache())[0]
    if hasattr(split.wire, "cfg") and q_bar <= split.wire.cfg.q_bar and q_bar >= 2:
        from splitcli.codec import encode

        frame = encode(hidden, with_q_bar(split.wire.cfg, q_bar))
    else:
        frame = split.wire.encode(hidden)
    msgs = [open_message(split, cloud, 16, CFG), pb.ClientMessage(probe=pb.Probe(padding=bytes(1500))),
            *chunk_frame(frame, 0, 0, len(PROMPT), 1 << 20, q_bar=q_bar), pb.ClientMessage(close=pb.Close())]
    call = pb_grpc.SplitCloudStub(channel).Session(iter(msgs), timeout=30, metadata=[("authorization", f"Bearer {KEY}")])
    return list(call)


def test_a_server_without_the_extension_gets_the_plans_q_bar(tabq):
    run = live(0.4, split=tabq)
    run.opened(pb.Opened(admitted=True), 100, 0.001)  # an older server: adaptive_steps reads false
    decision = SimpleNamespace(q_bar=3)
    assert run.q_bar_for(decision)[0] == TABQ.q_bar and "cannot decode" in run.q_bar_for(decision)[1]
    assert any("adaptive_steps" in n for n in run.notes)


# -- from the command line ---------------------------------------------------------------------

def test_generate_cloud_deadline_writes_the_trace(tiny_model_dir, tmp_path):
    from splitcli.model.loader import load_model

    tiny = load_model(str(tiny_model_dir))
    split = build_split(tiny, SplitSpec(split_layer=2, wire="tabq", codec=TABQ))
    server = CloudServer(split, CloudSettings(model_sha256=tiny.sha256, api_key=KEY))
    runner = CliRunner()
    base = ["generate", "-m", str(tiny_model_dir), "-l", "2", "-p", "Hello there", "-n", "5", "--codec", "tabq",
            "--tau", "3", "--no-entropy", "--max-bits", "6", "--cloud", f"127.0.0.1:{server.port}",
            "--cloud-api-key", KEY]
    try:
        plain = runner.invoke(app, base)
        assert plain.exit_code == 0, plain.output
        r = runner.invoke(app, [*base, "--deadline", "2s", "--trace", str(tmp_path / "t.jsonl")])
        assert r.exit_code == 0, r.output
        assert "measured link" in r.output and "keep" in r.output
        rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
        assert [x["kind"] for x in rows] == ["step"] * 5 + ["summary"]
        assert [x["decision"] for x in rows[1:5]] == ["keep"] * 4 and rows[-1]["tokens"] == 5
        assert all(x["rate_bps"] > 0 and x["cloud_ms"] is not None for x in rows[1:5])
        assert plain.output.strip().splitlines()[-1] in r.output  # same greedy text as without the policy
        slow = runner.invoke(app, [*base, "--deadline", "100ms", "--link", "500bit/s", "--trace",
                                   str(tmp_path / "s.jsonl")])
        assert slow.exit_code == 0, slow.output
        last = json.loads((tmp_path / "s.jsonl").read_text().splitlines()[-1])
        assert last["stopped_early"] and last["tokens"] == 1
    finally:
        server.stop(0)

