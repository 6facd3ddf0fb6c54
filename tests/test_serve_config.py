"""The serve config (serve.config.ServeConfig, configs/serve.yaml): validation and clear errors,
a bare plan still accepted, and real `serve-cloud` / `serve-edge` subprocesses started from a
file that includes the example take its settings (ports chosen at run time and written into the
file), with explicit flags winning."""

from __future__ import annotations

import dataclasses

import socket
import urllib.request
from pathlib import Path

import pytest
import yaml

from splitcli.errors import SplitLLMError
from splitcli.plan.schema import Plan
from splitcli.serve.config import CloudConfig, EdgeConfig, ServeConfig
from test_serve_cli import KEY, get, launch, nothing_left_running, remote, tiny  # noqa: F401 - fixtures

EXAMPLE = Path(__file__).resolve().parents[1] / "configs" / "serve.yaml"
BASE = EXAMPLE.with_name("base.yaml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_example_writes_out_the_defaults_but_the_marked_choices():
    """configs/serve.yaml says its values are the defaults except those marked as its choices."""
    example = ServeConfig.load(EXAMPLE)
    differ = {f.name for got, default in ((example.cloud, CloudConfig()), (example.edge, EdgeConfig()))
              for f in dataclasses.fields(default) if getattr(got, f.name) != getattr(default, f.name)}
    assert differ == {"metrics_port", "deadline_s"}
    marked = [line.split(":")[0].strip() for line in EXAMPLE.read_text(encoding="utf-8").splitlines()
              if "this example's choice" in line and not line.lstrip().startswith("#")]
    assert marked == ["metrics_port", "deadline"]


def test_the_config_limits_are_the_servers_own_defaults():
    """CloudConfig's limits default to CloudSettings' (one place for each number), and settings()
    carries every one of them across; a frame may always be as large as one message."""
    from splitcli.serve.config import CloudSettings

    assert CloudConfig().settings("sha", "key") == CloudSettings(model_sha256="sha", api_key="key")
    custom = CloudConfig(max_sessions=3, kv_budget_bytes=5 << 20, idle_timeout_s=7.0, batch_window_ms=0.0,
                         max_batch=2, max_message_bytes=128 << 20).settings("sha", "key")
    assert (custom.max_sessions, custom.kv_budget_bytes, custom.idle_timeout_s, custom.batch_window_ms,
            custom.max_batch, custom.max_message_bytes, custom.max_frame_bytes) == \
        (3, 5 << 20, 7.0, 0.0, 2, 128 << 20, 128 << 20)


def test_validation_and_errors(tmp_path):
    assert ServeConfig.load(BASE).plan == Plan.load(BASE)  # a bare plan: every serve default
    assert ServeConfig.load(BASE).cloud == CloudConfig() and ServeConfig.load(BASE).edge == EdgeConfig()
    only = ServeConfig.load(_write(tmp_path / "only.yaml", {"serve": {"format_version": 1, "edge": {"port": 0}}}))
    assert only.plan is None and only.edge.port == 0
    cases = [
        ({"serve": {"format_version": 1, "cloud": {"prot": 1}}}, "no setting 'prot'"),
        ({"serve": {"format_version": 1, "gpu": {}}}, "no section 'gpu'"),
        ({"serve": {"cloud": {}}}, "needs format_version"),
        ({"serve": {"format_version": 2}}, "format_version 2"),
        ({"serve": {"format_version": 1, "cloud": {"port": 70000}}}, "serve.cloud.port"),
        ({"serve": {"format_version": 1, "cloud": {"kv_budget": "lots"}}}, "serve.cloud.kv_budget"),
        ({"serve": {"format_version": 1, "cloud": {"max_sessions": 0}}}, "max_sessions"),
        ({"serve": {"format_version": 1, "cloud": {"tls_cert": "c.pem"}}}, "both tls_cert and tls_key"),
        ({"serve": {"format_version": 1, "edge": {"cloud": "nohost"}}}, "HOST:PORT"),
        ({"serve": {"format_version": 1, "edge": {"deadline": "-5ms"}}}, "serve.edge.deadline"),
        ({"serve": {"format_version": 1, "edge": {"api_key_env": "1 bad"}}}, "environment variable"),
        ({"serve": {"format_version": 1, "edge": []}}, "must be a mapping"),
        ({"serve": "on"}, "must be a mapping"),
        ({}, "neither a plan nor a serve"),
    ]
    for data, message in cases:
        with pytest.raises(SplitLLMError, match=message):
            ServeConfig.load(_write(tmp_path / "bad.yaml", data))
    rel = ServeConfig.load(_write(tmp_path / "tls.yaml", {"serve": {"format_version": 1, "cloud": {
        "tls_cert": "certs/c.pem", "tls_key": "/abs/k.pem"}}}))
    assert rel.cloud.tls_cert == tmp_path / "certs" / "c.pem" and rel.cloud.tls_key == Path("/abs/k.pem")


def _tiny_config(tmp_path, tiny_model_dir, cloud_port, metrics_port, edge_port) -> Path:
    """A file that includes the example and overrides what a test must: the plan for the tiny
    model, run-time ports, and limits small enough to see."""
    plan = {"model_id": str(tiny_model_dir), "n_layers": 4, "split_layer": 2, "l_w": 2,
            "codec": {"tau": 3.0, "tau_quantile": None, "entropy": False, "q_bar": 6},
            "budgets": {"deadline_s": None}}
    serve = {"cloud": {"port": cloud_port, "metrics_port": metrics_port, "max_sessions": 1, "kv_budget": "3MiB",
                       "idle_timeout": "40s"},
             "edge": {"port": edge_port, "cloud": f"127.0.0.1:{cloud_port}", "model_name": "tiny-from-config",
                      "deadline": "5s"}}
    return _write(tmp_path / "serve-tiny.yaml", {"include": str(EXAMPLE), **plan, "serve": serve})


def test_servers_started_from_the_example_take_its_settings(tiny, tiny_model_dir, tmp_path):
    lm, _ = tiny
    cloud_port, metrics_port, edge_port = _free_port(), _free_port(), _free_port()
    path = _tiny_config(tmp_path, tiny_model_dir, cloud_port, metrics_port, edge_port)
    config = ServeConfig.load(path)
    assert config.cloud.drain_timeout_s == 30.0 and config.edge.eps == 0.001  # from the example itself
    pattern = r" on (127\.0\.0\.1:\d+) .*?metrics on (http://\S+)/metrics$"
    with launch(["serve-cloud", "-m", str(tiny_model_dir), "--config", str(path), "--max-batch", "3"], pattern,
                tmp_path) as (_, m):
        target, metrics = m.group(1), m.group(2)
        assert target == f"127.0.0.1:{cloud_port}" and metrics == f"http://127.0.0.1:{metrics_port}"
        status, text = get(metrics + "/metrics")
        budget = [ln.split()[1] for ln in text.splitlines() if ln.startswith("splitllm_cloud:kv_cache_budget_bytes ")]
        assert status == 200 and [float(b) for b in budget] == [3 << 20]
        # max_sessions: 1 from the file: a second session is refused while the first is open
        from splitcli.deploy import SplitSpec, build_split
        from splitcli.plan.codec_settings import CodecSettings
        from splitcli.serve.client import _open_stream
        from splitcli.runtime.generate import SamplingConfig

        split = build_split(lm, SplitSpec(split_layer=2, wire="tabq",
                                          codec=CodecSettings(tau=3.0, entropy=False, q_bar=6)))
        cloud = remote(lm, target)
        channel = cloud.channel()
        first = None
        try:
            first, _ = _open_stream(split, cloud, channel, 16, SamplingConfig(max_new_tokens=2), 0)
            with pytest.raises(Exception, match="session limit reached \\(1 running\\)"):
                _open_stream(split, cloud, channel, 16, SamplingConfig(max_new_tokens=2), 0)
        finally:
            if first is not None:
                first.close()
            channel.close()
        edge_pattern = r"Algorithm 2 at D = 5000 ms\) on (http://\S+)/v1$"
        with launch(["serve-edge", "-m", str(tiny_model_dir), "--config", str(path)], edge_pattern, tmp_path) as (_, e):
            assert e.group(1) == f"http://127.0.0.1:{edge_port}"
            req = urllib.request.Request(e.group(1) + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
            with urllib.request.urlopen(req, timeout=10) as r:
                assert b"tiny-from-config" in r.read()
    # what the cloud enforces, as it printed it: the file's limits, the flag's batch size
    logs = " ".join(" ".join(p.read_text().split()) for p in tmp_path.glob("server-*.log"))
    assert "sessions <= 1, KV budget 3145728 bytes, idle timeout 40 s, batch window 2 ms, max batch 3" in logs
