"""`splitllm serve-cloud` and `generate --cloud` with real servers on 127.0.0.1 (ports chosen at
run time): subprocess servers read their address from the printed line and are stopped with
SIGTERM (kill as the fallback); the module checks that none is left running. Covers auth, TLS
with a self-signed certificate made here, /metrics and /health, the SIGTERM drain, and recovery
after the cloud is killed (SIGKILL) or stopped mid-generation and restarted on the same port."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from typer.testing import CliRunner

from splitcli.cli import app
from splitcli.cli.serve import tls_credentials
from splitcli.deploy import SplitSpec, build_split
from splitcli.plan.codec_settings import CodecSettings
from splitcli.runtime.generate import SamplingConfig, generate
from splitcli.serve.client import RemoteCloud, RemoteError, generate_remote, open_message
from splitcli.serve.cloud import CloudServer, CloudSettings
from splitcli.serve.proto import split_pb2_grpc as pb_grpc

KEY = "serve-cli-test-key"
SPLITLLM = str(Path(sys.executable).with_name("splitllm"))
PROMPT = [1, 5, 9, 33, 7, 12]
_started: list[subprocess.Popen] = []


@pytest.fixture(scope="module", autouse=True)
def nothing_left_running():
    yield
    alive = [p.pid for p in _started if p.poll() is None]
    for p in _started:  # never leave a server behind, even when the check below fails
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert not alive, f"servers still running after the tests: {alive}"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from splitcli.model.loader import load_model

    lm = load_model(str(tiny_model_dir))
    return lm, build_split(lm, SplitSpec(split_layer=2, wire="none"))


def reference(split, prompt, n):
    cfg = SamplingConfig(max_new_tokens=n)
    return generate(split.session(), torch.tensor([prompt]), None, cfg).tokens[0].tolist()


@contextlib.contextmanager
def launch(args, pattern, tmp_path):
    """A `splitllm` server subprocess: yields (process, match of `pattern` on its first stdout line).
    Stopped with SIGTERM on exit (kill after 30 s)."""
    env = {**os.environ, "SPLITLLM_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / f"server-{len(_started)}.log", "w+")  # a file: a full stderr pipe would block it
    proc = subprocess.Popen([SPLITLLM, *args], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    _started.append(proc)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        try:
            line = lines.get(timeout=120)
        except queue.Empty:
            line = ""
        m = re.search(pattern, line.strip())
        if m is None:
            log.seek(0)
            pytest.fail(f"{args[0]} printed no address: {line!r}; stderr: {log.read()[-2000:]}")
        yield proc, m
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        proc.stdout.close()
        log.close()


@contextlib.contextmanager
def serve_cloud(model_dir, *args, port=0, tmp_path=None):
    """`splitllm serve-cloud`: yields (process, gRPC address, metrics URL or None)."""
    with launch(["serve-cloud", "-m", str(model_dir), "-l", "2", "--port", str(port), *args],
                r" on (127\.0\.0\.1:\d+) .*?(?:metrics on (http://\S+)/metrics)?$", tmp_path) as (proc, m):
        yield proc, m.group(1), m.group(2)


def remote(lm, target, **kw):
    return RemoteCloud(**{"target": target, "api_key": KEY, "model_sha256": lm.sha256, "timeout_s": 60.0, **kw})


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_serve_cloud_auth_metrics_cli_and_sigterm_drain(tiny, tiny_model_dir, tmp_path):
    lm, split = tiny
    with serve_cloud(tiny_model_dir, "--metrics-port", "0", tmp_path=tmp_path) as (proc, addr, metrics):
        assert list(generate_remote(split, PROMPT, SamplingConfig(max_new_tokens=6), remote(lm, addr))) == \
            reference(split, PROMPT, 6)
        for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", KEY)]):
            with grpc.insecure_channel(addr) as ch:
                call = pb_grpc.SplitCloudStub(ch).Session(
                    iter([open_message(split, remote(lm, addr), 16, SamplingConfig())]), metadata=metadata, timeout=10)
                with pytest.raises(grpc.RpcError) as err:
                    list(call)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # `generate --cloud` prints what in-process `generate` prints, and its tokens are equal
        runner = CliRunner()
        base = ["generate", "-m", str(tiny_model_dir), "-l", "2", "-p", "Hello there", "-n", "5", "--json"]
        local = runner.invoke(app, [*base, str(tmp_path / "local.json")])
        over = runner.invoke(app, [*base, str(tmp_path / "cloud.json"), "--cloud", addr, "--cloud-api-key", KEY])
        assert local.exit_code == 0 and over.exit_code == 0, over.output
        got, want = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("cloud", "local"))
        assert (got["tokens"], got["text"]) == (want["tokens"], want["text"])
        assert over.output.strip() == want["text"].strip()
        wrong = runner.invoke(app, [*base, str(tmp_path / "x.json"), "--cloud", addr, "--cloud-api-key", "nope"])
        assert wrong.exit_code == 2 and "UNAUTHENTICATED" in wrong.output and "Traceback" not in wrong.output

        assert get(metrics.replace("/metrics", "") + "/health") == (200, "ok\n")
        status, text = get(metrics + "/metrics")
        assert status == 200
        values = dict(re.findall(r"^(splitllm_cloud:\S+) (\S+)$", text, re.M))
        assert float(values["splitllm_cloud:generation_tokens_total"]) >= 11
        assert float(values["splitllm_cloud:prompt_tokens_total"]) >= len(PROMPT)
        assert float(values["splitllm_cloud:reply_bytes_out_total"]) > 0
        assert values["splitllm_cloud:num_requests_running"] == "0.0"
        assert float(values["splitllm_cloud:batch_size_count"]) >= 11
        assert float(values["splitllm_cloud:step_seconds_count"]) >= 11
        assert float(values["splitllm_cloud:time_to_first_token_seconds_count"]) >= 2  # both sessions so far
        assert float(values["splitllm_cloud:inter_token_latency_seconds_count"]) >= 9

        # SIGTERM with a session open: new sessions are refused, the open one runs to its end, exit 0
        running = generate_remote(split, PROMPT, SamplingConfig(max_new_tokens=8), remote(lm, addr))
        first = [next(running)]
        proc.send_signal(signal.SIGTERM)
        for _ in range(200):
            if get(metrics.replace("/metrics", "") + "/health")[0] == 503:
                break
            threading.Event().wait(0.05)
        with pytest.raises(RemoteError) as refused:
            list(generate_remote(split, PROMPT, SamplingConfig(max_new_tokens=2), remote(lm, addr)))
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        assert first + list(running) == reference(split, PROMPT, 8)
        assert proc.wait(30) == 0


def test_recovery_after_sigkill_and_restart_on_the_same_port(tiny, tiny_model_dir, tmp_path):
    lm, split = tiny
    with serve_cloud(tiny_model_dir, tmp_path=tmp_path) as (proc, addr, _):
        cloud = remote(lm, addr)  # the default backoff (about 22 s) covers a restart of the process
        tokens = generate_remote(split, PROMPT, SamplingConfig(max_new_tokens=10), cloud)
        out = [next(tokens) for _ in range(4)]
        proc.kill()
        assert proc.wait(10) == -signal.SIGKILL
        with serve_cloud(tiny_model_dir, port=int(addr.rsplit(":", 1)[1]), tmp_path=tmp_path):
            out += list(tokens)  # the edge reconnects and replays its hidden states into the new cloud
    assert out == reference(split, PROMPT, 10)


def test_serve_edge_openai_client_over_serve_cloud(tiny, tiny_model_dir, tmp_path):
    import openai

    lm, split = tiny
    prompt = "Hello there"
    want_ids = reference(split, lm.tokenizer(prompt, add_special_tokens=True)["input_ids"], 6)
    want = lm.tokenizer.decode(want_ids, skip_special_tokens=True)
    with serve_cloud(tiny_model_dir, tmp_path=tmp_path) as (_, addr, _):
        edge = ["serve-edge", "-m", str(tiny_model_dir), "-l", "2", "--cloud", addr, "--port", "0"]
        with launch(edge, r" on (http://127\.0\.0\.1:\d+/v1)$", tmp_path) as (proc, m):
            client = openai.OpenAI(base_url=m.group(1), api_key=KEY, max_retries=0, timeout=60)
            name = client.models.list().data[0].id
            done = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0)
            assert done.choices[0].text == want
            stream = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0, stream=True)
            assert "".join(c.choices[0].text for c in stream) == want
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=m.group(1), api_key="wrong", max_retries=0).models.list()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0


def _shards(model_dir, tmp_path):
    """`splitllm quantize` shards (4-bit edge layers) and a copy holding the edge shard alone, as an
    edge device does."""
    full = tmp_path / "shards"
    r = CliRunner().invoke(app, ["quantize", "-m", str(model_dir), "-l", "2", "--front-bits", "4", "--back-bits",
                                 "none", "--group-size", "32", "--out", str(full)])
    assert r.exit_code == 0, r.output
    edge_only = shutil.copytree(full, tmp_path / "edge-only")
    (edge_only / "cloud.safetensors").unlink()
    return full, edge_only


def test_serve_edge_from_the_edge_shard_alone(tiny, tiny_model_dir, tmp_path):
    import openai

    runner = CliRunner()
    full, edge_only = _shards(tiny_model_dir, tmp_path)
    with serve_cloud(tiny_model_dir, tmp_path=tmp_path) as (_, addr, _):
        out = tmp_path / "want.json"
        r = runner.invoke(app, ["generate", "--shards", str(full), "-p", "Hello there", "-n", "5", "--cloud", addr,
                                "--cloud-api-key", KEY, "--json", str(out)])
        assert r.exit_code == 0, r.output
        edge = ["serve-edge", "--shards", str(edge_only), "--cloud", addr, "--port", "0", "--model-name", "tiny"]
        with launch(edge, r" on (http://127\.0\.0\.1:\d+/v1)$", tmp_path) as (proc, m):
            client = openai.OpenAI(base_url=m.group(1), api_key=KEY, max_retries=0, timeout=60)
            done = client.completions.create(model="tiny", prompt="Hello there", max_tokens=5, temperature=0)
            assert done.choices[0].text == json.loads(out.read_text())["text"]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0


V3 = ["--codec", "tabq", "--rotation", "hadamard", "--channel-alpha", "0.5"]


@pytest.mark.parametrize("extra", [[], ["--target-error", "0.1"]], ids=["alpha", "target"])
def test_v3_codec_from_a_quantized_edge_shard_over_serve_cloud(tiny_model_dir, tmp_path, extra):
    """The edge calibrates codec v3 (rotation, channel alpha, a target) on its 4-bit shard, the
    cloud on the full model: `generate --cloud` and `serve-edge` send the edge's calibration in the
    Open, so their tokens equal the in-process shard split's (the cloud's own would not decode)."""
    import openai

    runner = CliRunner()
    full, edge_only = _shards(tiny_model_dir, tmp_path)
    base = ["generate", "--shards", str(full), "-p", "Hello there", "-n", "5", *V3, *extra, "--json"]
    local = runner.invoke(app, [*base, str(tmp_path / "local.json")])
    assert local.exit_code == 0, local.output
    want = json.loads((tmp_path / "local.json").read_text())
    with serve_cloud(tiny_model_dir, *V3, *extra, tmp_path=tmp_path) as (_, addr, _):
        over = runner.invoke(app, [*base, str(tmp_path / "cloud.json"), "--cloud", addr, "--cloud-api-key", KEY])
        assert over.exit_code == 0, over.output
        assert json.loads((tmp_path / "cloud.json").read_text())["tokens"] == want["tokens"]
        plain = runner.invoke(app, ["generate", "--shards", str(full), "-p", "Hello there", "-n", "2", "--codec", "tabq",
                                    "--cloud", addr, "--cloud-api-key", KEY])
        assert plain.exit_code == 2 and "FAILED_PRECONDITION" in plain.output and "channel_alpha" in plain.output
        edge = ["serve-edge", "--shards", str(edge_only), "--cloud", addr, "--port", "0", "--model-name", "tiny", *V3,
                *extra]
        with launch(edge, r" on (http://127\.0\.0\.1:\d+/v1)$", tmp_path) as (proc, m):
            client = openai.OpenAI(base_url=m.group(1), api_key=KEY, max_retries=0, timeout=60)
            done = client.completions.create(model="tiny", prompt="Hello there", max_tokens=5, temperature=0)
            assert done.choices[0].text == want["text"]
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0


@pytest.fixture(scope="module")
def tiny_llama():
    from types import SimpleNamespace

    from conftest import _tiny

    return SimpleNamespace(model=_tiny("llama"), tokenizer=None, sha256="0" * 63 + "1")


def tokens_across_a_restart(split, sha: str, prompt, n: int) -> list[int]:
    """Greedy tokens of `prompt` from a cloud server that is stopped after 3 of them and started
    again on the same port: the client rebuilds its session from its own history."""
    settings = CloudSettings(model_sha256=sha, api_key=KEY)
    server = CloudServer(split, settings)
    port = server.port
    try:
        tokens = generate_remote(split, prompt, SamplingConfig(max_new_tokens=n),
                                 RemoteCloud(target=f"127.0.0.1:{port}", api_key=KEY, model_sha256=sha, timeout_s=60.0))
        out = [next(tokens) for _ in range(3)]
        server.stop(0)
        server = CloudServer(split, settings, address=f"127.0.0.1:{port}")
        out += list(tokens)
        for _ in range(250):  # the server frees the session once it has read the client's close
            if server.servicer.session_count == 0:
                break
            threading.Event().wait(0.02)
        assert server.servicer.session_count == 0
    finally:
        server.stop(0)
    return out


@pytest.mark.parametrize("wire", ["fp16", "tabq"])
def test_recovery_in_process_restart_every_wire(tiny_llama, wire):
    split = build_split(tiny_llama, SplitSpec(split_layer=2, wire=wire, codec=CodecSettings(tau=3.0, entropy=False)))
    out = tokens_across_a_restart(split, tiny_llama.sha256, PROMPT, 9)
    assert out == reference(split, PROMPT, 9)


@pytest.mark.parametrize("w", [0, 3])
def test_recovery_after_an_i_kv_0_handoff(tiny_llama, w):
    from splitcli.serve.handoff import generate_remote_handoff

    split = build_split(tiny_llama, SplitSpec(split_layer=2, wire="fp16"))
    settings = CloudSettings(model_sha256=tiny_llama.sha256, api_key=KEY)
    cfg = SamplingConfig(max_new_tokens=9)
    server = CloudServer(split, settings)
    port = server.port
    try:
        cloud = remote(tiny_llama, f"127.0.0.1:{port}")
        want = list(generate_remote_handoff(split, tiny_llama.model, PROMPT, cfg, cloud, local_tokens=w))
        tokens = generate_remote_handoff(split, tiny_llama.model, PROMPT, cfg, cloud, local_tokens=w)
        out = [next(tokens) for _ in range(w + 2)]  # two tokens past the handoff: the cloud holds state
        server.stop(0)
        server = CloudServer(split, settings, address=f"127.0.0.1:{port}")
        out += list(tokens)
    finally:
        server.stop(0)
    assert out == want


def test_a_busy_port_is_an_error(tiny_llama):
    from splitcli.errors import SplitLLMError

    split = build_split(tiny_llama, SplitSpec(split_layer=2, wire="none"))
    settings = CloudSettings(model_sha256=tiny_llama.sha256, api_key=KEY)
    server = CloudServer(split, settings)
    try:
        with pytest.raises(SplitLLMError, match="could not bind"):
            CloudServer(split, settings, address=f"127.0.0.1:{server.port}")
    finally:
        server.stop(0)


def test_an_unusable_certificate_is_a_one_line_error(tiny_llama, tmp_path):
    from splitcli.errors import SplitLLMError

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    key.write_text("-----BEGIN PRIVATE KEY-----\nnor this\n-----END PRIVATE KEY-----\n")
    split = build_split(tiny_llama, SplitSpec(split_layer=2, wire="none"))
    with pytest.raises(SplitLLMError, match="TLS certificate/key"):
        CloudServer(split, CloudSettings(model_sha256=tiny_llama.sha256, api_key=KEY),
                    credentials=tls_credentials(cert, key))


def test_no_retries_means_the_break_is_an_error(tiny_llama):
    split = build_split(tiny_llama, SplitSpec(split_layer=2, wire="none"))
    server = CloudServer(split, CloudSettings(model_sha256=tiny_llama.sha256, api_key=KEY))
    try:
        tokens = generate_remote(split, PROMPT, SamplingConfig(max_new_tokens=5),
                                 remote(tiny_llama, f"127.0.0.1:{server.port}", retries=0))
        next(tokens)
    finally:
        server.stop(0)
    with pytest.raises(RemoteError) as err:
        list(tokens)
    assert err.value.code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


def _self_signed(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("neither the cryptography package nor openssl is available to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True, timeout=30)
    return cert, key


def test_tls_with_a_self_signed_certificate(tiny, tiny_model_dir, tmp_path):
    from splitcli.runtime.generate import encode_prompts

    lm, split = tiny
    cert, key = _self_signed(tmp_path)
    server = CloudServer(split, CloudSettings(model_sha256=lm.sha256, api_key=KEY), credentials=tls_credentials(cert, key))
    target = f"127.0.0.1:{server.port}"
    try:
        cfg = SamplingConfig(max_new_tokens=5)
        tls = remote(lm, target, root_certificates=cert.read_bytes())
        assert list(generate_remote(split, PROMPT, cfg, tls)) == reference(split, PROMPT, 5)
        with pytest.raises(RemoteError) as plain:  # a plaintext client gets no session from a TLS server
            list(generate_remote(split, PROMPT, cfg, remote(lm, target, retries=0, timeout_s=5)))
        assert plain.value.code == grpc.StatusCode.UNAVAILABLE
        # the terminal path: generate --cloud --cloud-ca
        out = tmp_path / "tls.json"
        r = CliRunner().invoke(app, ["generate", "-m", str(tiny_model_dir), "-l", "2", "-p", "Hello there", "-n", "4",
                                     "--cloud", target, "--cloud-api-key", KEY, "--cloud-ca", str(cert), "--json", str(out)])
        assert r.exit_code == 0, r.output
        ids, _ = encode_prompts(lm.tokenizer, ["Hello there"], chat=False, context_length=None)
        assert json.loads(out.read_text())["tokens"] == reference(split, ids[0].tolist(), 4)
    finally:
        server.stop(0)


@pytest.mark.parametrize("args, env, message", [
    ([], {}, "no API key"),
    (["--tls-cert", "cert.pem"], {"SPLITLLM_API_KEY": "k"}, "both --tls-cert and --tls-key"),
    (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.pem"], {"SPLITLLM_API_KEY": "k"}, "--tls-cert"),
    (["--port", "70000"], {"SPLITLLM_API_KEY": "k"}, "--port must lie in"),
    (["--kv-budget", "lots"], {"SPLITLLM_API_KEY": "k"}, "--kv-budget"),
    (["--max-sessions", "0"], {"SPLITLLM_API_KEY": "k"}, "max_sessions"),
    (["--predictive-codec", "/nonexistent/codec.npz", "--backend", "ray"], {"SPLITLLM_API_KEY": "k"}, "no such file"),
])
def test_serve_cloud_bad_input(monkeypatch, args, env, message):
    monkeypatch.delenv("SPLITLLM_API_KEY", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = CliRunner().invoke(app, ["serve-cloud", "-m", "/nonexistent-model", *args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_generate_cloud_bad_input(monkeypatch):
    monkeypatch.delenv("SPLITLLM_API_KEY", raising=False)
    runner = CliRunner()
    for args, message in ((["--cloud", "nohost"], "HOST:PORT"), (["--cloud", "h:1"], "no API key"),
                          (["--cloud", "h:1", "--cloud-api-key", "k", "--prefill-chunk", "4"], "--prefill-chunk"),
                          (["--cloud", "h:1", "--cloud-api-key", "k", "--deadline", "-1ms"], "--deadline"),
                          (["--cloud", "h:1", "--cloud-api-key", "k", "--link", "1Mbit/s"], "give --deadline too")):
        r = runner.invoke(app, ["generate", "-p", "Hi", *args])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
