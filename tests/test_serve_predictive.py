"""The token-predictive wire (frame format 4) across gRPC: edge client <-> cloud server on 127.0.0.1
(ports chosen at run time, every server stopped in a finally). Outputs equal the in-process split's
over the same wire; an edge holding another codec is refused at Open; a broken stream is rebuilt
from the edge's history (hidden states and their token ids); serve-cloud / serve-edge run it from
the command line with the cloud's codec file."""

from __future__ import annotations

import re
import signal
from types import SimpleNamespace

import pytest
import torch

from conftest import _tiny
from splitcli.deploy import SplitSpec, build_split
from splitcli.deploy.predictive import fitted_predictive, predictive_from_file
from splitcli.errors import SplitLLMError
from splitcli.runtime.generate import SamplingConfig, generate
from splitcli.serve.client import RemoteError, generate_remote
from test_deploy_calibrate import CharTokenizer, write_wikitext
from test_serve_client import KEY, SHA, remote, serving

PROMPTS = [[1, 5, 9, 33, 7, 12, 40, 41], [2, 40, 3]]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """(lm, data dir, cache dir) with the codec for ℓ = 2 fitted once into the module's cache."""
    root = tmp_path_factory.mktemp("predictive-serve")
    lm = SimpleNamespace(model=_tiny("llama"), tokenizer=CharTokenizer(), sha256=SHA)
    data = write_wikitext(root / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPLITLLM_CACHE", str(root / "cache"))
        fitted_predictive(lm, 2, data)
    return lm, data, root / "cache"


@pytest.fixture()
def split(fitted, monkeypatch):
    lm, data, cache = fitted
    monkeypatch.setenv("SPLITLLM_CACHE", str(cache))
    return build_split(lm, SplitSpec(split_layer=2, wire="predictive"), data, keep_stats=False)


def reference(split, prompt, cfg):
    return generate(split.session(), torch.tensor([prompt]), None, cfg).tokens[0].tolist()


def test_over_the_wire_equals_in_process(split):
    greedy = SamplingConfig(max_new_tokens=6)
    sampled = SamplingConfig(max_new_tokens=5, temperature=0.8, top_p=0.9, seed=7)
    long_prompt = [3 + i % 120 for i in range(150)]   # a prefill frame of several 1 KiB chunks
    with serving(split, max_message_bytes=2048, max_frame_bytes=1 << 20) as server:
        cloud = remote(server, max_message_bytes=2048)
        for prompt in (*PROMPTS, long_prompt):
            assert list(generate_remote(split, prompt, greedy, cloud)) == reference(split, prompt, greedy)
        assert list(generate_remote(split, long_prompt, sampled, cloud)) == reference(split, long_prompt, sampled)


def test_an_edge_with_another_codec_is_refused_at_open(fitted, split, tmp_path, monkeypatch):
    lm, data, _ = fitted
    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "other-cache"))
    from splitcli.deploy.predictive import fit_from_ids

    ids = CharTokenizer()((data / "wikitext2" / "wiki.test.raw").read_text())["input_ids"]
    other_pc, _ = fit_from_ids(lm, 2, ids, windows=2, seqlen=256, step=0.5)   # another step: another crc
    other_pc.save(tmp_path / "other.npz")
    other = build_split(lm, SplitSpec(split_layer=2, wire="predictive", predictive_file=str(tmp_path / "other.npz")))
    assert other.wire.pc.crc != split.wire.pc.crc
    with serving(split) as server:
        with pytest.raises(RemoteError, match="predictive codec .* is not the served one"):
            list(generate_remote(other, PROMPTS[0], SamplingConfig(max_new_tokens=2), remote(server, retries=0)))
        # and the served codec still serves
        assert list(generate_remote(split, PROMPTS[1], SamplingConfig(max_new_tokens=3), remote(server))) == \
            reference(split, PROMPTS[1], SamplingConfig(max_new_tokens=3))


def test_a_broken_stream_is_rebuilt_from_hidden_states_and_their_ids(split):
    from test_serve_cli import tokens_across_a_restart

    out = tokens_across_a_restart(split, SHA, PROMPTS[0], 9)
    # the replay is one frame of every position: each row codes alone (its token and the one before),
    # so the cloud rebuilds the cache the steps had built
    assert out == reference(split, PROMPTS[0], SamplingConfig(max_new_tokens=9))


def test_codec_files_are_checked(fitted, split, tmp_path):
    lm, _, _ = fitted
    path = split.info["codec"]["path"]
    pc, _, info = predictive_from_file(path, lm, 2)
    assert pc.crc == split.wire.pc.crc and info["cache"] == "file"
    with pytest.raises(SplitLLMError, match="fitted at split layer 2, not 3"):
        predictive_from_file(path, lm, 3)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(SplitLLMError, match="cannot read predictive codec file"):
        predictive_from_file(tmp_path / "junk.npz", lm, 2)
    with pytest.raises(SplitLLMError, match="needs the predictive wire"):
        SplitSpec(split_layer=2, wire="tabq", predictive_file=path)
    by_file = build_split(lm, SplitSpec(split_layer=2, wire="predictive", predictive_file=path))
    assert by_file.wire.pc.crc == split.wire.pc.crc and by_file.info["codec"]["path"] == path


def test_serve_cloud_and_serve_edge_with_the_clouds_codec_file(tiny_model_dir, tmp_path, monkeypatch):
    """The user's path: serve-cloud fits (and prints) the codec; serve-edge takes that file."""
    import openai

    from splitcli.model.loader import load_model
    from test_serve_cli import KEY as CLI_KEY
    from test_serve_cli import launch, serve_cloud

    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    data = write_wikitext(tmp_path / "data", n_chars=12000)
    with serve_cloud(tiny_model_dir, "--codec", "predictive", "--data-dir", str(data), tmp_path=tmp_path) as (_, addr, _):
        log = next(tmp_path.glob("server-*.log")).read_text()
        m = re.search(r"predictive codec (\S+\.npz) \(crc ([0-9a-f]{8})\)", log)
        assert m is not None, log
        lm = load_model(str(tiny_model_dir))
        split = build_split(lm, SplitSpec(split_layer=2, wire="predictive", predictive_file=m.group(1)))
        assert f"{split.wire.pc.crc:08x}" == m.group(2)
        prompt = "Hello there"
        want_ids = reference(split, lm.tokenizer(prompt, add_special_tokens=True)["input_ids"], SamplingConfig(max_new_tokens=6))
        want = lm.tokenizer.decode(want_ids, skip_special_tokens=True)
        edge = ["serve-edge", "-m", str(tiny_model_dir), "-l", "2", "--cloud", addr, "--port", "0",
                "--predictive-codec", m.group(1)]
        with launch(edge, r" on (http://127\.0\.0\.1:\d+/v1)$", tmp_path) as (proc, em):
            client = openai.OpenAI(base_url=em.group(1), api_key=CLI_KEY, max_retries=0, timeout=60)
            name = client.models.list().data[0].id
            done = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0)
            assert done.choices[0].text == want
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0


def test_hostile_frames_get_invalid_argument_and_a_good_session_runs_on(fitted, split, tmp_path):
    import grpc

    from splitcli.deploy.predictive import fit_from_ids
    from splitcli.serve.proto import split_pb2 as pb
    from splitcli.serve.protocol import WIRE_TO_PB
    from test_serve_client import _run_concurrently, raw_call

    lm, data, _ = fitted
    ids = CharTokenizer()((data / "wikitext2" / "wiki.test.raw").read_text())["input_ids"]
    other_pc, emb = fit_from_ids(lm, 2, ids, windows=2, seqlen=256, step=0.5)
    hidden = split.edge(torch.tensor([PROMPTS[0]]), torch.arange(8)[None], None, split.edge.new_cache())[0]
    good = split.wire.encode(hidden, ids=torch.tensor(PROMPTS[0]))
    from splitcli.codec import predictive
    foreign = predictive.encode(hidden, torch.tensor(PROMPTS[0]), other_pc, emb)      # another codec's frame
    opened = pb.ClientMessage(open=pb.Open(model_sha256=SHA, split_layer=2, wire=WIRE_TO_PB["predictive"],
                                           max_tokens=32, kv_mode=pb.KV_HIDDEN, protocol_version=1,
                                           predictive_crc=split.wire.pc.crc))

    def step(payload, n=8):
        return pb.ClientMessage(step=pb.Step(step_id=0, position=0, n_tokens=n, payload=payload))

    faults = [step(b"\xff" * 300), step(foreign), step(good[:-9]), step(good, n=3), step(good[:4] + b"\x03" + good[5:])]
    cfg = SamplingConfig(max_new_tokens=8)
    ref = reference(split, PROMPTS[1], cfg)
    with serving(split) as server:
        assert raw_call(server, [opened, step(good), pb.ClientMessage(close=pb.Close())], key=KEY)[1] is None   # control
        codes = []
        good_out, _ = _run_concurrently([
            lambda: list(generate_remote(split, PROMPTS[1], cfg, remote(server))),
            lambda: codes.extend(raw_call(server, [opened, f], key=KEY)[1] for f in faults)])
        assert good_out == ref
        assert codes == [grpc.StatusCode.INVALID_ARGUMENT] * len(faults)


@pytest.mark.parametrize("w,i_kv", [(2, 0), (4, 1)])
def test_handoff_codes_the_history_against_its_tokens_and_over_the_wire_equals_in_process(fitted, split, w, i_kv):
    """Fig. 5b with the predictive wire: the edge generates w tokens alone, then the history (I_kv 0:
    the hidden states of every position, coded against the prompt and local tokens) or the KV rows
    cross, and the split steps code against the last local token; the networked edge gives the
    in-process tokens."""
    from splitcli.deploy import handoff_session, opsc_edge_model
    from splitcli.runtime.handoff import handoff_generate
    from splitcli.serve.handoff import generate_remote_handoff

    lm = fitted[0]
    cfg = SamplingConfig(max_new_tokens=7)
    session = handoff_session(lm, split)
    got = handoff_generate(session, torch.tensor([PROMPTS[0]]), None, cfg, local_tokens=w, i_kv=i_kv)
    assert got.local_tokens == w and got.report.i_kv == i_kv
    if i_kv:
        assert got.report.hidden_bytes == 0 and got.report.kv_bytes > 0
    else:  # one format-4 frame of every position so far: prompt and the local tokens fed
        positions = len(PROMPTS[0]) + w - 1
        assert 0 < got.report.hidden_bytes < positions * lm.model.config.hidden_size
    with serving(split) as server:
        remote_tokens = list(generate_remote_handoff(split, opsc_edge_model(lm.model, split.spec), PROMPTS[0], cfg,
                                                     remote(server), local_tokens=w, i_kv=i_kv))
    assert remote_tokens == got.tokens[0].tolist()


def test_algorithm_2_runs_the_predictive_wire_in_process_and_over_the_network(fitted, split):
    """--deadline with the predictive wire. It has one rate: the policy's byte model is the codec's
    mean frame whatever q̄, so a step that misses D stops rather than compresses, and a byte model
    that believes q̄ helps gets a note saying the frame went as coded. A generous deadline keeps
    every step and gives the plain split's tokens, in process and over the network, handoff included."""
    from splitcli.deploy import handoff_session, opsc_edge_model
    from splitcli.plan.early_exit import ExitPolicy
    from splitcli.runtime.adaptive import adaptive_generate, link_model_for, measured_link_model, session_wire_bytes
    from splitcli.runtime.handoff import handoff_generate
    from splitcli.runtime.link import EmulatedLink, parse_link
    from splitcli.serve.adaptive import LiveRun, RemotePolicy
    from splitcli.serve.handoff import generate_remote_handoff

    lm = fitted[0]
    cfg = SamplingConfig(max_new_tokens=6)
    ids = torch.tensor([PROMPTS[0]])
    want = reference(split, PROMPTS[0], cfg)
    session = split.session()
    model = session_wire_bytes(session, 1)
    assert model(6, 0, 1) == model(2, 0, 1) == split.wire.expected_frame_bytes(1) > 0

    def run(link, deadline, i_kv=0, session=None, local_tokens=0, **kw):
        spec = parse_link(link)
        policy = ExitPolicy(deadline, 6, 2, i_kv, link_model_for(spec, 0.01))
        return adaptive_generate(session or split.session(), ids, None, cfg, policy, EmulatedLink(spec),
                                 fixed_compute_s=0.001, local_tokens=local_tokens, **kw)

    fast = run("100Mbit/s,1ms", 1.0)
    assert fast.tokens[0].tolist() == want and {r.decision for r in fast.rows[1:]} == {"keep"}
    hopeless = run("500bit/s,20ms", 0.1)
    assert [r.decision for r in hopeless.rows[1:]] == ["stop"] and hopeless.summary.stopped_early
    believer = run("0.5Mbit/s,20ms", 0.1, wire_bytes=lambda q_bar, i_kv, w: 900.0 * q_bar)  # q̄ 6 misses D
    compress = [r for r in believer.rows if r.decision == "compress"]
    assert compress and all("predictive wire has one rate" in r.note and r.q_bar is None for r in compress)
    plain_handoff = handoff_generate(handoff_session(lm, split), ids, None, cfg, local_tokens=2, i_kv=1)
    local = run("100Mbit/s,1ms", 1.0, i_kv=1, session=handoff_session(lm, split), local_tokens=2)
    assert local.tokens.tolist() == plain_handoff.tokens.tolist() and local.handoff.i_kv == 1

    def live(deadline):
        return LiveRun(RemotePolicy(ExitPolicy(deadline, 6, 2, 1, measured_link_model(1e-3))), split)

    with serving(split) as server:
        on_time = live(5.0)
        assert list(generate_remote(split, PROMPTS[0], cfg, remote(server), live=on_time)) == want
        assert {r.decision for r in on_time.rows[1:]} == {"keep"}
        handed = live(5.0)
        got = list(generate_remote_handoff(split, opsc_edge_model(lm.model, split.spec), PROMPTS[0], cfg,
                                           remote(server), local_tokens=2, i_kv=1, live=handed))
        assert got == plain_handoff.tokens[0].tolist()
        assert [r.stage for r in handed.rows[:3]] == ["local", "local", "handoff"]


def test_a_ray_front_pins_one_codec_file_for_its_replicas(fitted, split, tmp_path):
    """serve-cloud --backend ray: the front resolves the codec once and names its file in the spec the
    replicas build from (no calibration text needed there), so their crc is the front's."""
    from splitcli.deploy import pin_predictive_codec

    lm, data, _ = fitted
    spec, codec = pin_predictive_codec(lm, SplitSpec(split_layer=2, wire="predictive"), data)
    assert spec.predictive_file == split.wire.path
    assert codec == {"path": split.wire.path, "crc": f"{split.wire.pc.crc:08x}"}
    assert build_split(lm, spec).wire.pc.crc == split.wire.pc.crc
    assert pin_predictive_codec(lm, SplitSpec(split_layer=2), data) == (SplitSpec(split_layer=2), None)
    text = tmp_path / "mine.txt"                          # a fit text: the replicas get its fitted file instead
    text.write_text((data / "wikitext2" / "wiki.test.raw").read_text()[::-1])
    own, codec = pin_predictive_codec(lm, SplitSpec(split_layer=2, wire="predictive", predictive_fit_text=str(text)))
    assert own.predictive_fit_text is None and own.predictive_file == codec["path"] != split.wire.path


def test_shards_run_the_clouds_codec(tiny_model_dir, tmp_path, monkeypatch):
    """The codec predicts from 8-bit rows of the input embeddings, which an edge from shards holds
    (--embed-bits 8, the default) or makes from its float table (16): either runs the cloud's codec
    file (fitted on the full model), and over the network its tokens equal the in-process split of the
    same shards. A codec file fitted on the exact table (before 8-bit rows) is refused by an 8-bit
    edge, saying what to do."""
    import dataclasses

    from typer.testing import CliRunner

    from splitcli.cli import app
    from splitcli.deploy import build_shard_split
    from splitcli.model.loader import load_model

    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    data = write_wikitext(tmp_path / "data", n_chars=12000)
    lm = load_model(str(tiny_model_dir))
    cloud = build_split(lm, SplitSpec(split_layer=2, wire="predictive"), data, keep_stats=False)
    shards = {}
    for bits in (16, 8):
        shards[bits] = tmp_path / f"q{bits}"
        r = CliRunner().invoke(app, ["quantize", "-m", str(tiny_model_dir), "-l", "2", "--front-bits", "4",
                                     "--back-bits", "none", "--group-size", "32", "--embed-bits", str(bits),
                                     "--out", str(shards[bits])])
        assert r.exit_code == 0, r.output
    assert cloud.wire.pc.info["table"] == "rows8"
    edges = {bits: build_shard_split(shards[bits], wire="predictive", predictive_file=cloud.wire.path)[0]
             for bits in (16, 8)}
    assert edges[16].wire.pc.crc == edges[8].wire.pc.crc == cloud.wire.pc.crc
    assert not isinstance(edges[8].wire.emb, torch.Tensor)                 # the shard's own rows, no float copy
    alone, _, _ = build_shard_split(shards[8], wire="predictive", data_dir=data)   # fitted on the 4-bit edge
    assert alone.wire.pc.crc != cloud.wire.pc.crc and alone.wire.pc.info["split_layer"] == 2
    assert cloud.wire.pc.shape is not None and alone.wire.pc.shape is None   # an edge has no cloud's Fisher
    assert len(reference(alone, PROMPTS[0], SamplingConfig(max_new_tokens=3))) == 3
    old = tmp_path / "exact.npz"
    dataclasses.replace(cloud.wire.pc, info=dict(cloud.wire.pc.info, table="exact")).save(old)
    with pytest.raises(SplitLLMError, match="exact table .*refit it"):
        build_shard_split(shards[8], wire="predictive", predictive_file=str(old))
    cfg = SamplingConfig(max_new_tokens=6)
    for edge in edges.values():
        for prompt in PROMPTS:
            want = reference(edge, prompt, cfg)
            with serving(cloud) as server:
                assert list(generate_remote(edge, prompt, cfg, remote(server))) == want
