"""`splitllm serve-cloud`: the cloud half of a split behind the gRPC service, with auth, optional
TLS, Prometheus /metrics and /health, and a graceful drain on SIGTERM / SIGINT.
`splitllm serve-edge`: the edge half here, the OpenAI-compatible HTTP API (serve.openai_api) in
front of it, the cloud half on a serve-cloud."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from pathlib import Path

import typer

from ..errors import SplitLLMError
from .common import (DATA_DIR_OPTION, EDGE_ACT_BITS_OPTION, PREDICTIVE_CODEC_OPTION, PREDICTIVE_FIT_TEXT_OPTION,
                     check_plan_fits, cli_errors,
                     codec_options, err_console, load_model_with_status, split_spec)

from ..serve.config import API_KEY_ENV, api_key_from  # noqa: F401 - generate --cloud reads the key the same way

# The cloud's counters exported under names in the style of vLLM (`vllm:num_requests_running`,
# `..._tokens_total`) and llama.cpp, with their own prefix so an edge's and a cloud's series never mix.
PREFIX = "splitllm_cloud:"
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def tls_credentials(cert: Path | None, key: Path | None):
    """grpc server credentials from PEM files, or None for plaintext."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise SplitLLMError("TLS needs both --tls-cert and --tls-key")
    import grpc

    pems = []
    for flag, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            pems.append(path.read_bytes())
        except OSError as exc:
            raise SplitLLMError(f"{flag} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in pems[0] or b"-----BEGIN" not in pems[1]:
        raise SplitLLMError("--tls-cert and --tls-key must be PEM files")
    return grpc.ssl_server_credentials([(pems[1], pems[0])])


class CloudCollector:
    """Prometheus collector over a running CloudServer: gauges and counters read from the
    servicer at scrape time, histograms fed by its step, token and batch hooks."""

    def __init__(self, server, settings, registry):
        from prometheus_client import Histogram

        self.server, self.settings = server, settings
        registry.register(self)
        self.batch_size = Histogram(PREFIX + "batch_size", "Sessions per cloud forward.", buckets=_BATCH_BUCKETS,
                                    registry=registry)
        self.step_time = Histogram(PREFIX + "step_seconds", "Time per cloud step (forward incl. batching wait).",
                                   buckets=_STEP_BUCKETS, registry=registry)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds",
                              "Session admitted to its first token (edge prefill and upload included).",
                              buckets=_TTFT_BUCKETS, registry=registry)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Between a session's consecutive tokens.",
                             buckets=_STEP_BUCKETS, registry=registry)
        server.servicer.on_step = lambda seconds, _tokens: self.step_time.observe(seconds)
        batcher = getattr(server.servicer, "batcher", None)  # the Ray front has none: replicas batch
        if batcher is not None:
            batcher.on_batch = self.batch_size.observe
        server.servicer.on_token = lambda first, seconds: (self.ttft if first else self.itl).observe(seconds)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.server.servicer
        c = s.counters()
        yield GaugeMetricFamily(PREFIX + "num_requests_running", "Sessions admitted and open.", value=s.session_count)
        yield GaugeMetricFamily(PREFIX + "num_requests_waiting", "Streams connected, not yet past their Open.",
                                value=s.waiting_count)
        yield GaugeMetricFamily(PREFIX + "kv_cache_used_bytes", "KV memory reserved by open sessions.", value=s.kv_used)
        yield GaugeMetricFamily(PREFIX + "kv_cache_budget_bytes", "The server's KV memory budget.",
                                value=self.settings.kv_budget_bytes)
        for name, doc, value in (
            ("prompt_tokens", "Prompt positions processed.", c.prompt_tokens),
            ("generation_tokens", "Tokens (or top-k answers) generated.", c.generated_tokens),
            ("sessions_admitted", "Sessions admitted.", c.sessions_admitted),
            ("sessions_refused", "Sessions refused (limit, budget, draining, mismatch).", c.sessions_refused),
            ("frame_bytes_in", "Payload bytes received in complete steps.", c.frame_bytes_in),
            ("reply_bytes_out", "Serialized reply bytes sent.", c.reply_bytes_out),
        ):
            yield CounterMetricFamily(PREFIX + name, doc, value=value)


def start_metrics_http(host: str, port: int, server, settings):
    """/metrics (Prometheus text) and /health on a thread; returns the started HTTP server."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    CloudCollector(server, settings, registry)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server name
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/health":
                draining = server.servicer.draining
                self._reply(503 if draining else 200, b"draining\n" if draining else b"ok\n", "text/plain")
            else:
                self._reply(404, b"not found\n", "text/plain")

        def _reply(self, code, body, ctype):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # scrapes every few seconds would flood stderr
            pass

    try:
        httpd = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise SplitLLMError(f"could not bind --metrics-port {port} on {host}: {exc.strerror or exc}") from None
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="splitllm-metrics",
                     daemon=True).start()
    return httpd


CONFIG_HELP = ("Serve config (configs/serve.yaml: a serve: section with cloud and edge settings, and the plan it "
               "includes) or a bare plan.yaml: ℓ, the codec and the defaults; explicit flags win.")


def load_serve_config(path: Path | None):
    """(ServeConfig, plan or None): the file's settings, or every default without one."""
    from ..serve.config import ServeConfig

    config = ServeConfig.load(path) if path is not None else ServeConfig()
    return config, config.plan


@cli_errors
@codec_options(("none", "fp16", "bf16", "tabq", "predictive"), "Hidden-state wire the edges use: none (raw fp32), fp16, bf16, tabq or predictive (token-predictive, frame format 4: fitted once, its file's path printed for the edges) (default: the plan's wire with --config, else none).")
def serve_cloud_cmd(
    model: str = typer.Option(None, "--model", "-m", help="Built-in name, model directory or .gguf file (default: the plan's, else smollm2-135m)."),
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    split_layer: int = typer.Option(None, "--split-layer", "-l", help="ℓ: the cloud runs layers [ℓ, L) (default: the plan's, else L // 2)."),
    predictive_codec: Path = PREDICTIVE_CODEC_OPTION,
    fit_text: Path = PREDICTIVE_FIT_TEXT_OPTION,
    host: str = typer.Option(None, "--host", help="Address to listen on (default 127.0.0.1; 0.0.0.0 for all interfaces)."),
    port: int = typer.Option(None, "--port", help="gRPC port (default 50051; 0 = pick a free one; the address is printed)."),
    api_key: str = typer.Option(None, "--api-key", help=f"Bearer token every call must carry (default: ${API_KEY_ENV}, or the config's api_key_env; required)."),
    tls_cert: Path = typer.Option(None, "--tls-cert", help="PEM certificate chain: serve over TLS (with --tls-key)."),
    tls_key: Path = typer.Option(None, "--tls-key", help="PEM private key for --tls-cert."),
    max_sessions: int = typer.Option(None, "--max-sessions", help="Concurrent generation sessions admitted (default 8)."),
    kv_budget: str = typer.Option(None, "--kv-budget", help="KV memory the sessions may reserve (each: its max tokens x cloud layers), e.g. 512MiB (default 1GiB)."),
    idle_timeout: float = typer.Option(None, "--idle-timeout", help="Seconds a silent session is kept before it is freed (default 60)."),
    batch_window: str = typer.Option(None, "--batch-window", help="How long the batcher waits for more sessions' decode steps, e.g. 2ms (default 2ms)."),
    max_batch: int = typer.Option(None, "--max-batch", help="Most sessions in one batched forward (default 16)."),
    metrics_port: int = typer.Option(None, "--metrics-port", help="Serve /metrics (Prometheus) and /health over HTTP on this port (0 = pick one)."),
    drain_timeout: float = typer.Option(None, "--drain-timeout", help="On SIGTERM/SIGINT: seconds to let running sessions finish (default 30)."),
    backend: str = typer.Option("local", "--backend", help="local: this process runs the cloud half; ray: Ray Serve replicas run it behind this process's gRPC front (needs the ray extra)."),
    replicas: int = typer.Option(None, "--replicas", help="--backend ray: replicas of the cloud half (default 1); --max-sessions and --kv-budget hold per replica."),
    autoscale: str = typer.Option(None, "--autoscale", help="--backend ray: MIN:MAX replicas, scaled by Ray Serve with the load (instead of --replicas)."),
    ray_address: str = typer.Option(None, "--ray-address", help="--backend ray: address of a running Ray cluster (default: start a local one on 127.0.0.1, stopped on exit)."),
    data_dir: Path = DATA_DIR_OPTION,
    codec_flags: dict = None,
    wire: str | None = None,
):
    """Serve the cloud half of the split (layers [ℓ, L)) to edge clients over gRPC."""
    from ..configio import overlay
    from ..deploy import build_split, pin_predictive_codec
    from ..model.loader import DEFAULT_MODEL
    from ..model.split import decoder_parts
    from ..serve.cloud import CloudServer
    from ..units import parse_size, parse_time

    # Everything that can be wrong with the input fails before the model loads; a flag's error names the flag.
    _check_ports(port=port, metrics_port=metrics_port)
    ray_options = _ray_options(backend, replicas, autoscale, ray_address)
    if (tls_cert is None) != (tls_key is None):
        raise SplitLLMError("TLS needs both --tls-cert and --tls-key")
    serve_config, plan = load_serve_config(config)
    try:
        budget = parse_size(kv_budget) if kv_budget is not None else None
    except SplitLLMError as exc:
        raise SplitLLMError(f"--kv-budget: {exc}") from None
    try:
        window_ms = parse_time(batch_window) * 1e3 if batch_window is not None else None
    except SplitLLMError as exc:
        raise SplitLLMError(f"--batch-window: {exc}") from None
    c = overlay(serve_config.cloud, host=host, port=port, max_sessions=max_sessions, kv_budget_bytes=budget,
                idle_timeout_s=idle_timeout, batch_window_ms=window_ms, max_batch=max_batch,
                metrics_port=metrics_port, drain_timeout_s=drain_timeout, tls_cert=tls_cert, tls_key=tls_key)
    key = api_key_from(api_key, c.api_key_env)
    credentials = tls_credentials(c.tls_cert, c.tls_key)
    spec = split_spec(plan, wire, codec_flags, data_dir, split_layer=split_layer, predictive_file=predictive_codec,
                      predictive_fit_text=fit_text)
    progress = lambda m: err_console.print(m, highlight=False)  # noqa: E731
    model_ref = model or (plan.model_id if plan else DEFAULT_MODEL)
    lm = load_model_with_status(model_ref)
    check_plan_fits(plan, lm)
    settings = c.settings(lm.sha256, key)
    model_id = lm.model_id
    if ray_options is None:
        # keep_stats=False: a server's wire must not keep one record per frame for its lifetime
        split = build_split(lm, spec, data_dir, progress, keep_stats=False)
        layers = (split.spec.split_layer, split.cloud.parts.num_layers)
        codec = split.info.get("codec")
    else:  # each replica loads the model and builds the split itself, the predictive codec from one file
        spec, codec = pin_predictive_codec(lm, spec.resolve(lm.model), data_dir, progress)
        layers = (spec.split_layer, decoder_parts(lm.model).num_layers)
        del lm  # the front needs none of the weights: no copy beside the replicas' for the server's life
    stop = threading.Event()
    # Installed before the server starts, so a SIGTERM from the moment it serves drains (during the
    # model load it still ends the process at once: there is nothing to drain yet).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if ray_options is None:
        server = CloudServer(split, settings, address=_join(c.host, c.port), credentials=credentials)
    else:
        from ..serve.ray_backend import RayCloudServer, model_split_factory

        with err_console.status(f"starting the cloud half on Ray Serve ({ray_options.describe()}) ..."):
            server = RayCloudServer(model_split_factory(model_ref, spec, data_dir), settings, ray_options,
                                    address=_join(c.host, c.port), credentials=credentials)
        for sig in (signal.SIGTERM, signal.SIGINT):  # ray.init installed its own (they abort the process)
            signal.signal(sig, lambda *_: stop.set())
    httpd = None
    try:
        if c.metrics_port is not None:
            # with Ray the budget gauge is the cluster's (per replica x the most replicas), as kv_used is
            scope = settings if ray_options is None else dataclasses.replace(
                settings, kv_budget_bytes=settings.kv_budget_bytes * ray_options.max_replicas)
            httpd = start_metrics_http(c.host, c.metrics_port, server, scope)
        if spec.wire == "predictive":   # before the address line: a script reading it has this too
            err_console.print(f"predictive codec {codec['path']} (crc {codec['crc']}): edges on other machines "
                              "need this file (--predictive-codec)", highlight=False, soft_wrap=True)
        metrics = f"; metrics on http://{_join(c.host, httpd.server_address[1])}/metrics" if httpd else ""
        # One line on stdout, flushed: scripts and tests read the bound address from it.
        print(f"serving {model_id} cloud layers [{layers[0]}, {layers[1]}) "
              f"on {_join(c.host, server.port)} ({'TLS' if credentials else 'plaintext'}){metrics}", flush=True)
        if ray_options is not None:
            err_console.print(f"cloud half on Ray Serve: {ray_options.describe()}; the limits below hold per replica",
                              highlight=False)
        err_console.print(f"sessions <= {settings.max_sessions}, KV budget {settings.kv_budget_bytes} bytes, "
                          f"idle timeout {settings.idle_timeout_s:g} s, batch window {settings.batch_window_ms:g} ms, "
                          f"max batch {settings.max_batch}", highlight=False, soft_wrap=True)
        while not stop.wait(0.5):
            pass
        err_console.print(f"draining: no new sessions; waiting up to {c.drain_timeout_s:g} s for "
                          f"{server.servicer.session_count} running", highlight=False)
        drained = server.drain(c.drain_timeout_s)
        if not drained:
            err_console.print(f"{server.servicer.session_count} sessions still running: ending them", highlight=False)
    finally:
        server.stop(0)
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
    err_console.print("stopped", highlight=False)


def _ray_options(backend: str, replicas, autoscale, address):
    """RayOptions for --backend ray (Ray Serve must be installed), None for local."""
    if backend not in ("local", "ray"):
        raise SplitLLMError(f"--backend must be local or ray, got {backend!r}")
    if backend == "local":
        given = [flag for flag, v in (("--replicas", replicas), ("--autoscale", autoscale),
                                      ("--ray-address", address)) if v is not None]
        if given:
            raise SplitLLMError(f"{', '.join(given)} need --backend ray")
        return None
    from ..serve.ray_backend import RayOptions, parse_autoscale, require_ray

    require_ray()
    if replicas is not None and autoscale is not None:
        raise SplitLLMError("give --replicas or --autoscale, not both")
    try:
        return RayOptions(replicas=1 if replicas is None else replicas,
                          autoscale=parse_autoscale(autoscale) if autoscale is not None else None,
                          address=address, num_cpus=os.cpu_count() or 1)
    except SplitLLMError as exc:  # "ray option replicas ..." -> "--replicas ...": the flag the user gave
        raise SplitLLMError(str(exc).replace("ray option ", "--", 1)) from None


def _check_ports(**flags) -> None:
    from ..serve.config import check_port

    for name, value in flags.items():
        check_port(f"--{name.replace('_', '-')}", value, optional=True)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@cli_errors
@codec_options(("none", "fp16", "bf16", "tabq", "predictive"), "Hidden-state wire (must match the cloud's): none (raw fp32), fp16, bf16, tabq or predictive (frame format 4; the cloud's codec file: --predictive-codec) (default: the plan's wire with --config, else none).")
def serve_edge_cmd(
    cloud: str = typer.Option(None, "--cloud", help="HOST:PORT of the `splitllm serve-cloud` running the cloud half (default: the config's, else 127.0.0.1:50051)."),
    model: str = typer.Option(None, "--model", "-m", help="Built-in name, model directory or .gguf file (default: the plan's, else smollm2-135m)."),
    config: Path = typer.Option(None, "--config", help=CONFIG_HELP),
    shards: Path = typer.Option(None, "--shards", help="Run the edge half from a directory written by `splitllm quantize` (instead of --model)."),
    split_layer: int = typer.Option(None, "--split-layer", "-l", help="ℓ: the edge runs layers [0, ℓ) (default: the plan's or the shards', else L // 2)."),
    edge_act_bits: int = EDGE_ACT_BITS_OPTION,
    predictive_codec: Path = PREDICTIVE_CODEC_OPTION,
    fit_text: Path = PREDICTIVE_FIT_TEXT_OPTION,
    host: str = typer.Option(None, "--host", help="Address the HTTP API listens on (default 127.0.0.1; 0.0.0.0 for all interfaces)."),
    port: int = typer.Option(None, "--port", help="HTTP port (default 8000; 0 = pick a free one; the address is printed)."),
    api_key: str = typer.Option(None, "--api-key", help=f"Bearer token for the /v1 API, also sent to the cloud unless --cloud-api-key (default: ${API_KEY_ENV}, or the config's api_key_env; required)."),
    cloud_api_key: str = typer.Option(None, "--cloud-api-key", help="Bearer token for the cloud (default: the config's cloud_api_key_env, else the --api-key)."),
    cloud_ca: Path = typer.Option(None, "--cloud-ca", help="PEM certificate (CA or self-signed) to trust: talk to --cloud over TLS."),
    model_name: str = typer.Option(None, "--model-name", help="The model id /v1/models reports and requests name (default: the model's)."),
    max_running: int = typer.Option(None, "--max-running", help="Requests generating at once (more get 429; default 8)."),
    deadline: str = typer.Option(None, "--deadline", help="Per-token deadline D, e.g. 200ms: Algorithm 2 runs per request on the measured link to the cloud (compress harder or stop early)."),
    eps: float = typer.Option(None, "--eps", help="Outage target ε of eq. (9) for --deadline (default 0.001)."),
    data_dir: Path = DATA_DIR_OPTION,
    codec_flags: dict = None,
    wire: str | None = None,
):
    """Serve an OpenAI-compatible HTTP API: the edge half here, the cloud half on a serve-cloud."""
    from ..configio import overlay
    from ..model.loader import DEFAULT_MODEL
    from ..serve.backends import RemoteBackend
    from ..serve.client import RemoteCloud
    from ..serve.openai_api import create_app
    from ..units import parse_time
    from .generate import _remote_options

    _check_ports(port=port)
    serve_config, plan = load_serve_config(config)
    try:
        deadline_s = parse_time(deadline) if deadline is not None else None
    except SplitLLMError as exc:
        raise SplitLLMError(f"--deadline: {exc}") from None
    e = overlay(serve_config.edge, cloud=cloud, host=host, port=port, cloud_ca=cloud_ca, model_name=model_name,
                max_running=max_running, deadline_s=deadline_s, eps=eps)
    key = api_key_from(api_key, e.api_key_env)
    if cloud_api_key is None and e.cloud_api_key_env is not None:
        cloud_api_key = api_key_from(None, e.cloud_api_key_env)
    remote = _remote_options(e.cloud, cloud_api_key or key, e.cloud_ca, {})
    if shards is not None and model is not None:
        raise SplitLLMError("give --shards or --model, not both")
    spec = split_spec(plan, wire, codec_flags, data_dir, split_layer=split_layer, edge_act_bits=edge_act_bits,
                      predictive_file=predictive_codec, predictive_fit_text=fit_text)
    progress = lambda m: err_console.print(m, highlight=False)  # noqa: E731
    if shards is not None:
        with err_console.status(f"loading the edge shard from {shards} ..."):
            split, tokenizer, manifest = _edge_shard_split(shards, spec, data_dir, progress)
        sha, name = manifest.model_sha256, manifest.model_id
    else:
        from ..deploy import build_split

        lm = load_model_with_status(model or (plan.model_id if plan else DEFAULT_MODEL))
        check_plan_fits(plan, lm)
        split = build_split(lm, spec, data_dir, progress, keep_stats=False)
        tokenizer, sha, name = lm.tokenizer, lm.sha256, lm.model_id
    backend = RemoteBackend(split, RemoteCloud(model_sha256=sha, **remote), live=_edge_policy(e, split.spec))
    try:
        app = create_app(backend, model_name=e.model_name or name, api_key=key, tokenizer=tokenizer,
                         max_running=e.max_running)
        live = f", Algorithm 2 at D = {e.deadline_s * 1e3:g} ms" if e.deadline_s is not None else ""
        _run_uvicorn(app, e.host, e.port, f"serving {e.model_name or name} (edge layers [0, {split.spec.split_layer}), "
                                          f"cloud at {e.cloud}{live}) on")
    finally:
        backend.close()
    err_console.print("stopped", highlight=False)


def _edge_policy(edge, spec):
    """Algorithm 2 for every request (serve.adaptive), or None without a deadline. Split steps
    carry hidden states only, so the policy starts at I_kv = 0."""
    if edge.deadline_s is None:
        return None
    from ..plan.early_exit import ExitPolicy
    from ..runtime.adaptive import measured_link_model
    from ..serve.adaptive import RemotePolicy

    return RemotePolicy(ExitPolicy(edge.deadline_s, spec.codec.q_bar, spec.codec.q_bar_min, 0,
                                   measured_link_model(edge.eps)))


def _edge_shard_split(shards: Path, spec, data_dir, progress):
    """(split, tokenizer, manifest) with only the edge half, from edge.safetensors alone: an edge
    device holds its own shard (`deploy.build_shard_split` would open cloud.safetensors too). The
    codec is calibrated on this edge, as build_shard_split does."""
    from types import SimpleNamespace

    from ..deploy import Split, SplitSpec, build_wire
    from ..model.shard_loader import load_edge, load_tokenizer
    from ..quant import use_int4_act_bits_

    edge = load_edge(shards, spec.split_layer)
    use_int4_act_bits_(edge.model, spec.edge_act_bits)
    tokenizer = load_tokenizer(shards)
    m = edge.manifest
    edge_spec = SplitSpec(split_layer=m.split_layer, q_w1=m.front_bits, q_w2=m.back_bits, l_w=m.l_w, method=m.method,
                          group_size=m.group_size, qa=m.kv_bits, embed_bits=m.embed_bits, wire=spec.wire,
                          codec=spec.codec, edge_act_bits=spec.edge_act_bits, predictive_file=spec.predictive_file,
                          predictive_fit_text=spec.predictive_fit_text)
    edge_lm = SimpleNamespace(model=edge.model, tokenizer=tokenizer, sha256=m.files["edge.safetensors"]["sha256"])
    wire = build_wire(edge_spec, edge_lm, data_dir, progress, keep_stats=False)
    return Split(edge_spec, edge.half, None, wire, {"wire": wire.name, "shards": str(shards)}), tokenizer, m


def _run_uvicorn(app, host: str, port: int, banner: str) -> None:
    """uvicorn on a socket bound here, so port 0 works and the bound address is printed first;
    uvicorn handles SIGTERM / SIGINT itself (finishes open requests, then returns)."""
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections from the moment the address is printed wait in the backlog
    except OSError as exc:
        sock.close()
        raise SplitLLMError(f"could not bind the HTTP API to {_join(host, port)}: {exc.strerror or exc}") from None
    try:
        print(f"{banner} http://{_join(host, sock.getsockname()[1])}/v1", flush=True)
        # uvicorn shuts down gracefully on SIGTERM / SIGINT, then re-raises the signal to the handler
        # it found; a no-op one here makes that a clean exit 0 instead of death by the signal.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off")).run(sockets=[sock])
    finally:
        sock.close()
