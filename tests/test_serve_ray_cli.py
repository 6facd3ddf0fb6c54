"""`splitllm serve-cloud --backend ray` as a user runs it: a subprocess that starts its own local Ray
instance, serves on a port chosen at run time, and on SIGTERM drains and exits 0 with every Ray
process it started gone. And the flags' errors, with and without the ray extra installed."""

from __future__ import annotations

import signal
import sys
import time

import psutil
import pytest
from typer.testing import CliRunner

from splitcli.cli import app
from splitcli.runtime.generate import SamplingConfig
from splitcli.serve.client import generate_remote
from test_serve_cli import get, launch, reference, remote, tiny  # noqa: F401 - the fixture too
from test_serve_cli import nothing_left_running  # noqa: F401 - autouse: no server left behind


@pytest.mark.slow
def test_serve_cloud_backend_ray_serves_drains_and_stops_ray(tiny, tiny_model_dir, tmp_path):
    pytest.importorskip("ray.serve", reason="the ray extra is not installed: pip install 'splitllm[ray]'")
    lm, split = tiny
    # --autoscale: the Serve autoscaling path (starts at its minimum, 1 replica); 2 fixed replicas
    # are covered by test_serve_ray.py
    args = ["serve-cloud", "-m", str(tiny_model_dir), "-l", "2", "--port", "0", "--metrics-port", "0",
            "--backend", "ray", "--autoscale", "1:2"]
    with launch(args, r" on (127\.0\.0\.1:\d+) .*?metrics on (http://\S+)/metrics$", tmp_path) as (proc, m):
        addr, metrics = m.group(1), m.group(2)
        ray_procs = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in ray_procs)
        assert any(" ".join(p.cmdline()).startswith("ray::ServeReplica") for p in ray_procs)
        for prompt in ([1, 5, 9, 33, 7, 12], [3, 4]):
            assert list(generate_remote(split, prompt, SamplingConfig(max_new_tokens=5), remote(lm, addr))) == \
                reference(split, prompt, 5)
        assert get(metrics + "/health") == (200, "ok\n")
        status, text = get(metrics + "/metrics")
        assert status == 200 and "splitllm_cloud:generation_tokens_total 10.0" in text
        assert "splitllm_cloud:sessions_admitted_total 2.0" in text
        budget = next(line for line in text.splitlines() if line.startswith("splitllm_cloud:kv_cache_budget_bytes "))
        assert float(budget.split()[1]) == 2 * 2 ** 30  # the default 1 GiB per replica x up to 2 replicas
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ray_procs):
        time.sleep(0.5)
    left = [p.pid for p in ray_procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"Ray processes left after serve-cloud exited: {left}"


def test_ray_flags_need_the_ray_backend(tiny_model_dir):
    out = CliRunner().invoke(app, ["serve-cloud", "-m", str(tiny_model_dir), "--api-key", "k", "--replicas", "2"])
    assert out.exit_code == 2 and "--replicas need --backend ray" in out.output and "Traceback" not in out.output
    out = CliRunner().invoke(app, ["serve-cloud", "-m", str(tiny_model_dir), "--api-key", "k", "--backend", "gpu"])
    assert out.exit_code == 2 and "--backend must be local or ray" in out.output


def test_backend_ray_without_the_extra_says_what_to_install(tiny_model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, as without the extra
    out = CliRunner().invoke(app, ["serve-cloud", "-m", str(tiny_model_dir), "--api-key", "k", "--backend", "ray"])
    assert out.exit_code == 2, out.output
    assert "pip install 'splitllm[ray]'" in out.output and "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) == 1


def test_autoscale_bounds_are_checked(tiny_model_dir):
    pytest.importorskip("ray.serve", reason="the ray extra is not installed: pip install 'splitllm[ray]'")
    for bad in ("3", "0:2", "3:2", "a:b"):
        out = CliRunner().invoke(app, ["serve-cloud", "-m", str(tiny_model_dir), "--api-key", "k",
                                       "--backend", "ray", "--autoscale", bad])
        assert out.exit_code == 2 and "--autoscale must be MIN:MAX" in out.output, (bad, out.output)


def test_replicas_and_an_empty_autoscale_are_checked_by_the_options(tiny_model_dir):
    """RayOptions checks the values (once); the error names the flag. An empty --autoscale was
    taken as no autoscaling."""
    pytest.importorskip("ray.serve", reason="the ray extra is not installed: pip install 'splitllm[ray]'")
    for flags, message in ((["--replicas", "0"], "--replicas must be an integer >= 1, got 0"),
                           (["--autoscale", ""], "--autoscale must be MIN:MAX with 1 <= MIN <= MAX, got ''")):
        out = CliRunner().invoke(app, ["serve-cloud", "-m", str(tiny_model_dir), "--api-key", "k",
                                       "--backend", "ray", *flags])
        assert out.exit_code == 2 and message in out.output and "Traceback" not in out.output, out.output


def test_bench_serve_ray_flags_are_checked(tmp_path):
    out = CliRunner().invoke(app, ["bench", "serve", "--json", str(tmp_path / "a.json"), "--replicas", "2"])
    assert out.exit_code == 2 and "--replicas needs --backend ray" in out.output
    out = CliRunner().invoke(app, ["bench", "serve", "--json", str(tmp_path / "b.json"), "--backend", "gpu"])
    assert out.exit_code == 2 and "--backend must be local or ray" in out.output


@pytest.mark.slow
@pytest.mark.parametrize("wire", ["fp16", "predictive"])
def test_bench_serve_backend_ray_end_to_end(tiny_model_dir, tmp_path, monkeypatch, wire):
    """The smallest real run: one replica beside the local backend, one client; the JSON has the
    local backend's columns for each, every replayed token checked, and Ray's overhead ratio. The
    predictive wire: fitted once by the bench, its cached file read by every server (crc checked at Open)."""
    import json

    pytest.importorskip("ray.serve", reason="the ray extra is not installed: pip install 'splitllm[ray]'")
    extra = []
    if wire == "predictive":
        from test_deploy_calibrate import write_wikitext

        monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
        extra = ["--data-dir", str(write_wikitext(tmp_path / "data", n_chars=12000))]
    out = tmp_path / "ray.json"
    r = CliRunner().invoke(app, ["bench", "serve", "-m", str(tiny_model_dir), "-l", "2", "--backend", "ray",
                                 "--replicas", "1", "--clients", "1", "--tokens", "4", "--repeats", "1",
                                 "--wire", wire, "--json", str(out), *extra])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert {x["mode"] for x in data["runs"]} == {"local", "ray x1"}
    for x in data["runs"]:
        assert x["replay_tokens_match"] and x["tokens"] == 4 and x["tokens_per_s"] > 0 and x["p50_ms"] > 0
        assert {"cloud_cpu_s_per_token", "p99_ms", "bytes_per_token", "split_layer", "clients"} <= set(x)
    ray = next(x for x in data["runs"] if x["mode"] == "ray x1")
    assert ray["route_ms_per_message"] > 0 and ray["cpu_ms_per_token_replicas"] > 0
    assert data["overhead_at_1_replica"][0]["p50_ratio_ray_over_local"] > 0
    assert "Ray at 1 replica vs local" in r.output


def test_the_ray_front_keeps_no_copy_of_the_model(tiny_model_dir, monkeypatch):
    """The front reads what it needs of the model (sha256, L, the resolved spec) and lets the weights
    go before the replicas start: each replica loads its own copy."""
    import gc
    import signal as signals
    import weakref

    pytest.importorskip("ray.serve", reason="the ray extra is not installed: pip install 'splitllm[ray]'")
    from splitcli.cli import serve as serve_cli
    from splitcli.errors import SplitLLMError
    from splitcli.serve import ray_backend

    loaded = []
    real_load = serve_cli.load_model_with_status

    def load(spec):
        lm = real_load(spec)
        loaded.append(weakref.ref(lm.model))
        return lm

    class Replicas:  # stands in for RayCloudServer: where the replicas would load their copies
        def __init__(self, *args, **kwargs):
            gc.collect()
            raise SplitLLMError(f"front model alive: {loaded[0]() is not None}")

    monkeypatch.setattr(serve_cli, "load_model_with_status", load)
    monkeypatch.setattr(ray_backend, "RayCloudServer", Replicas)
    monkeypatch.setattr(signals, "signal", lambda *args: None)  # the command's handlers stay out of pytest
    out = CliRunner().invoke(app, ["serve-cloud", "-m", str(tiny_model_dir), "-l", "2", "--api-key", "k",
                                   "--port", "0", "--backend", "ray"])
    assert out.exit_code == 2 and "front model alive: False" in out.output, out.output


@pytest.mark.slow
def test_serve_cloud_backend_ray_serves_the_predictive_wire_from_one_codec_file(tiny_model_dir, tmp_path, monkeypatch):
    """The front fits the predictive codec once and names its file to the replicas (each checks an
    edge's codec crc at Open): an edge holding the printed file gets the in-process split's tokens."""
    import re

    pytest.importorskip("ray.serve", reason="the ray extra is not installed: pip install 'splitllm[ray]'")
    from splitcli.deploy import SplitSpec, build_split
    from splitcli.model.loader import load_model
    from test_deploy_calibrate import write_wikitext

    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    data = write_wikitext(tmp_path / "data", n_chars=12000)
    args = ["serve-cloud", "-m", str(tiny_model_dir), "-l", "2", "--port", "0", "--backend", "ray", "--replicas", "1",
            "--codec", "predictive", "--data-dir", str(data)]
    with launch(args, r" on (127\.0\.0\.1:\d+) ", tmp_path) as (proc, m):
        log = next(tmp_path.glob("server-*.log")).read_text()
        found = re.search(r"predictive codec (\S+\.npz) \(crc ([0-9a-f]{8})\)", log)
        assert found is not None
        lm = load_model(str(tiny_model_dir))
        split = build_split(lm, SplitSpec(split_layer=2, wire="predictive", predictive_file=found.group(1)))
        assert f"{split.wire.pc.crc:08x}" == found.group(2)
        prompt = [1, 5, 9, 33, 7, 12]
        got = list(generate_remote(split, prompt, SamplingConfig(max_new_tokens=5), remote(lm, m.group(1))))
        assert got == reference(split, prompt, 5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
