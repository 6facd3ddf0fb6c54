"""`bench serve`: the cloud server under N concurrent edge sessions, cloud-only vs split (Fig. 5).

Setup, all on 127.0.0.1 with ports chosen at run time:

- **One server process.** A child process (multiprocessing, spawn) loads the model and serves two
  `CloudServer`s: `cloud-only`, whose cloud half runs every decoder layer [0, L) behind the
  embedding (the edge only looks token embeddings up: a documented ℓ = 0 path that lives here,
  since a split needs 1 <= ℓ <= L-1), and `split`, the cloud half [ℓ, L) of the split at ℓ. Only
  one of them is driven at a time. Cloud CPU is the child's own process CPU time
  (`time.process_time()` in the child, read over a pipe before and after each run), so nothing
  the clients do is counted, and the clients do not hold the server's GIL.
- **Replay clients.** On a 2-core machine real edge processes would steal the server's CPU, so
  each client's frames are recorded once, offline, in this process: the edge half runs on a
  prompt and its greedy continuation, each step's frame is encoded with the session's wire, and
  the in-process cloud half gives the token the server must answer. During a run, N threads each
  open a real gRPC session (the same protocol as `splitcli.serve.client`), send the recorded
  frames at an edge's pace (after each token they wait the edge's measured per-step time before
  sending the next frame) and check every token the server returns against the recording.
- **One real edge** (`generate_remote`) checks end to end that the served split gives the
  recording's tokens, and `generate_remote_handoff` gives the Fig. 5b curve: tokens the cloud
  computed vs W̄ (the tokens the edge generates alone before handing the session over).

Per run: cloud CPU-seconds per generated token, aggregate tokens/s (all clients' tokens over the
wall time from the common start to the last token), p50 / p99 per-token latency (client side,
from sending a decode step's frame to its token; the prefill step is reported as TTFT), and frame
bytes sent per generated token. Medians over repeats; the two modes alternate within each repeat.
"""

from __future__ import annotations

import math
import os
import platform
import queue
import secrets
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import SplitLLMError

MODES = ("cloud-only", "split")
PROMPTS = [
    "The history of the city begins with a small settlement on the river, where",
    "In the early morning the fishermen of the village",
    "The theory of evolution by natural selection explains",
    "A good recipe for bread needs only four ingredients:",
    "The first computers filled entire rooms and",
    "When the storm finally passed, the valley",
    "Mathematics is sometimes called the language of",
    "The museum's new exhibition presents",
]
PROTOCOL = ("replay clients: each client's codec frames were recorded once offline (edge half on a prompt "
            "and its greedy continuation, frames encoded with the session's wire) and are sent over real "
            "gRPC sessions (splitcli/serve/proto/split.proto) to an in-process-started CloudServer in a child "
            "process on 127.0.0.1, one thread and one channel per client, at an edge's pace (the edge's "
            "measured per-step time between receiving a token and sending the next frame); every returned "
            "token is checked against the recording. cloud-only: the cloud runs all L decoder layers (ℓ = 0: "
            "the edge only embeds, frames are token embeddings on the same wire).")
CPU_MEASURE = ("cloud CPU = process CPU time (user+system, all threads) of the child process that runs only "
               "the servers, read with time.process_time() in the child before and after each run; the replay "
               "clients run in the parent and are not counted")
_END = object()


@dataclass
class Recording:
    """One client's session: frames (one per step), their token counts and the expected tokens."""

    prompt_len: int
    frames: list[bytes]
    n_tokens: list[int]
    tokens: list[int]
    edge_step_s: float  # median edge time of one decode step (forward + encode)

    @property
    def max_tokens(self) -> int:
        return self.prompt_len + len(self.tokens)


@dataclass
class _ClientResult:
    tokens: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # decode steps, seconds
    ttft: float = math.nan
    bytes_sent: int = 0
    error: str | None = None


# -- the two modes' splits -------------------------------------------------------------------

def cloud_only_split(lm, wire: str = "fp16"):
    """A Split whose cloud half runs all decoder layers [0, L) and whose edge only embeds: the
    cloud-only baseline served by the same CloudServer (spec.split_layer = 0)."""
    from ..deploy import SplitSpec
    from ..deploy.split import Split
    from ..model.split import CloudHalf, LayerRange, decoder_parts
    from ..runtime.wire import RawWire

    if wire not in ("none", "fp16"):
        raise SplitLLMError(f"the cloud-only baseline sends embeddings raw: wire none or fp16, got {wire!r}")
    parts = decoder_parts(lm.model)

    class _AllLayers(CloudHalf):
        def __init__(self):  # CloudHalf checks 1 <= ℓ: here ℓ = 0 on purpose
            self.parts, self.split_layer = parts, 0
            self.layers = LayerRange(parts, 0, parts.num_layers)

    spec = SplitSpec(split_layer=0, wire=wire)  # not resolve()d: ℓ = 0 is outside a split's range
    return Split(spec, _EmbedOnly(parts), _AllLayers(), RawWire("fp32" if wire == "none" else wire),
                 {"wire": f"raw-{'fp32' if wire == 'none' else wire}", "mode": "cloud-only"})


class _EmbedOnly:
    """The cloud-only 'edge': token ids -> embeddings (what crosses at ℓ = 0)."""

    def __init__(self, parts):
        self.parts, self.split_layer = parts, 0

    def new_cache(self):
        return None

    def __call__(self, input_ids, position_ids, attention_mask, cache):
        import torch

        with torch.inference_mode():
            return self.parts.embed_tokens(input_ids)


def build_mode_split(lm, mode: str, split_layer: int, wire: str, data_dir=None):
    from ..deploy import SplitSpec, build_split

    if mode == "cloud-only":
        return cloud_only_split(lm, "fp16" if wire == "tabq" else wire)
    return build_split(lm, SplitSpec(split_layer=split_layer, wire=wire), data_dir=data_dir)


# -- recording -------------------------------------------------------------------------------

def record(split, prompt_ids, n_tokens: int) -> Recording:
    """Run the edge half on the prompt and its greedy continuation, keep every step's frame, and
    the token the cloud half answers in process (what the server must answer)."""
    import torch

    from ..runtime.generate import SamplingConfig, sample_next
    from ..serve.protocol import decode_frame

    cfg = SamplingConfig(max_new_tokens=n_tokens)
    hidden_size = split.cloud.parts.config.hidden_size
    edge_cache, cloud_cache = split.edge.new_cache(), split.cloud.new_cache()
    new, position = prompt_ids, 0
    frames, counts, tokens, edge_times = [], [], [], []
    for _ in range(n_tokens):
        t = new.shape[1]
        positions = torch.arange(position, position + t)[None]
        t0 = time.perf_counter()
        hidden = split.edge(new, positions, None, edge_cache)
        frame = split.wire.encode(hidden.reshape(t, -1))
        edge_times.append(time.perf_counter() - t0)
        received = decode_frame(split.wire, frame, t, hidden_size)
        logits = split.cloud(received[None], positions, None, cloud_cache, logits_to_keep=1)
        token = int(sample_next(logits[:, -1], cfg, None)[0])
        frames.append(frame)
        counts.append(t)
        tokens.append(token)
        new, position = torch.tensor([[token]]), position + t
    decode_times = edge_times[1:] or edge_times
    return Recording(int(prompt_ids.shape[1]), frames, counts, tokens, statistics.median(decode_times))


# -- the server child ------------------------------------------------------------------------

def _server_main(conn, model_ref: str, split_layer: int, wire: str, data_dir, settings: dict, threads: int) -> None:
    """Child process: both modes' CloudServers; answers 'cpu', 'stats MODE', 'stop' on `conn`."""
    servers = {}
    try:
        import torch

        from ..model.loader import load_model
        from ..serve.cloud import CloudServer, CloudSettings

        if threads:
            torch.set_num_threads(threads)
        lm = load_model(model_ref)
        for mode in MODES:
            split = build_mode_split(lm, mode, split_layer, wire, data_dir)
            servers[mode] = CloudServer(split, CloudSettings(model_sha256=lm.sha256, **settings))
        conn.send(("ready", {m: s.port for m, s in servers.items()}, torch.get_num_threads()))
        parent = os.getppid()
        while True:
            if not conn.poll(1.0):
                if os.getppid() != parent:  # the parent died: do not outlive it
                    return
                continue
            cmd, arg = conn.recv()
            if cmd == "cpu":
                conn.send(time.process_time())
            elif cmd == "stats":
                srv = servers[arg].servicer
                c = srv.counters()
                conn.send({"generated_tokens": c.generated_tokens, "prompt_tokens": c.prompt_tokens,
                           "frame_bytes_in": c.frame_bytes_in, "forwards": srv.batcher.forwards, "batched_steps": srv.batcher.batched_steps,
                           "sessions": srv.session_count})
            else:
                return
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as one line
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except Exception:  # noqa: BLE001
            pass
    finally:
        for srv in servers.values():
            srv.stop(0)
        conn.close()


class ServerProcess:
    """The child process that runs the servers; a context manager that always ends it."""

    def __init__(self, model_ref: str, split_layer: int, wire: str, data_dir, max_sessions: int, threads: int = 0,
                 start_timeout_s: float = 600.0):
        import multiprocessing as mp

        self.api_key = secrets.token_hex(16)
        settings = {"api_key": self.api_key, "max_sessions": max_sessions, "max_batch": max(1, max_sessions),
                    "idle_timeout_s": 120.0}
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._lock = threading.Lock()
        self.process = ctx.Process(target=_server_main, name="splitllm-bench-cloud", daemon=True,
                                   args=(child, model_ref, split_layer, wire, data_dir, settings, threads))
        self.process.start()
        child.close()
        try:
            if not self._conn.poll(start_timeout_s):
                raise SplitLLMError(f"the cloud server process did not start within {start_timeout_s:g} s")
            msg = self._conn.recv()
        except (EOFError, OSError):
            self.close()
            raise SplitLLMError("the cloud server process died while starting") from None
        except BaseException:
            self.close()
            raise
        if msg[0] != "ready":
            self.close()
            raise SplitLLMError(f"the cloud server process failed: {msg[1]}")
        self.ports, self.threads = msg[1], msg[2]

    def ask(self, cmd: str, arg=None, timeout_s: float = 30.0):
        with self._lock:
            self._conn.send((cmd, arg))
            if not self._conn.poll(timeout_s):
                raise SplitLLMError(f"the cloud server process did not answer {cmd!r} within {timeout_s:g} s")
            return self._conn.recv()

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self._conn.send(("stop", None))
            except (OSError, ValueError):
                pass
            self.process.join(15)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# -- replay clients --------------------------------------------------------------------------

def _open_message(sha: str, split_layer: int, wire: str, max_tokens: int):
    from ..serve.proto import split_pb2 as pb
    from ..serve.protocol import PROTOCOL_VERSION, WIRE_TO_PB

    return pb.ClientMessage(open=pb.Open(model_sha256=sha, split_layer=split_layer, wire=WIRE_TO_PB[wire],
                                         max_tokens=max_tokens, kv_mode=pb.KV_HIDDEN,
                                         protocol_version=PROTOCOL_VERSION, sampling=pb.Sampling()))


def _replay(target: str, api_key: str, open_msg, rec: Recording, pace_s: float, ready: threading.Barrier,
            out: _ClientResult, timeout_s: float) -> None:
    import grpc

    from ..serve.proto import split_pb2 as pb
    from ..serve.proto import split_pb2_grpc as pb_grpc
    from ..serve.protocol import CHUNK_HEADROOM, chunk_frame

    limit = 4 << 20
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", limit),
                                                     ("grpc.max_receive_message_length", limit)])
    sends: queue.Queue = queue.Queue()
    call = None
    try:
        call = pb_grpc.SplitCloudStub(channel).Session(iter(sends.get, _END), timeout=timeout_s,
                                                       metadata=[("authorization", f"Bearer {api_key}")])
        sends.put(open_msg)
        opened = next(call)
        if not opened.opened.admitted:
            raise SplitLLMError(f"not admitted: {opened.opened.reason}")
        chunk = min(limit, opened.opened.max_message_bytes or limit) - CHUNK_HEADROOM
        ready.wait(timeout_s)
        position = 0
        for step, (frame, n) in enumerate(zip(rec.frames, rec.n_tokens)):
            if step:
                time.sleep(pace_s)  # the edge computing the next frame
            t0 = time.perf_counter()
            for msg in chunk_frame(frame, step, position, n, chunk):
                sends.put(msg)
            reply = next(call)
            dt = time.perf_counter() - t0
            if reply.WhichOneof("kind") != "token" or reply.token.step_id != step:
                raise SplitLLMError(f"step {step} was answered with something else")
            out.tokens.append(int(reply.token.token_id))
            out.bytes_sent += len(frame)
            if step == 0:
                out.ttft = dt
            else:
                out.latencies.append(dt)
            position += n
        sends.put(pb.ClientMessage(close=pb.Close()))
    except grpc.RpcError as exc:
        out.error = f"{exc.code().name}: {exc.details()}"
    except (SplitLLMError, StopIteration, threading.BrokenBarrierError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    finally:
        if out.error is not None:
            ready.abort()  # nobody waits out the timeout for a session that failed before the start
        sends.put(_END)
        if call is not None:
            call.cancel()
        channel.close()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def run_once(server: ServerProcess, mode: str, sha: str, split_layer: int, wire: str, recordings: list[Recording],
             clients: int, pace_s: float, timeout_s: float = 300.0) -> dict:
    """One run: `clients` replay sessions at once against `mode`'s server; the measurements."""
    target = f"127.0.0.1:{server.ports[mode]}"
    recs = [recordings[i % len(recordings)] for i in range(clients)]
    results = [_ClientResult() for _ in range(clients)]
    ready = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=_replay, name=f"bench-replay-{i}", daemon=True,
                                args=(target, server.api_key, _open_message(sha, split_layer, wire, r.max_tokens),
                                      r, pace_s, ready, results[i], timeout_s))
               for i, r in enumerate(recs)]
    for t in threads:
        t.start()
    before_stats = server.ask("stats", mode)
    try:
        ready.wait(timeout_s)  # every session is open and admitted
    except threading.BrokenBarrierError:
        pass
    cpu0 = server.ask("cpu")
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    wall = time.perf_counter() - t0
    cpu1 = server.ask("cpu")
    after_stats = server.ask("stats", mode)
    if any(t.is_alive() for t in threads):
        raise SplitLLMError(f"{mode} with {clients} clients did not finish within {timeout_s:g} s")
    errors = [r.error for r in results if r.error]
    if errors:
        raise SplitLLMError(f"{mode} with {clients} clients: a replay session failed: {errors[0]}")
    tokens = sum(len(r.tokens) for r in results)
    mismatched = sum(r.tokens != rec.tokens for r, rec in zip(results, recs))
    forwards = after_stats["forwards"] - before_stats["forwards"]
    latencies = [x for r in results for x in r.latencies]
    return {
        "tokens": tokens,
        "wall_s": wall,
        "cloud_cpu_s": cpu1 - cpu0,
        "cloud_cpu_s_per_token": (cpu1 - cpu0) / tokens,
        "tokens_per_s": tokens / wall,
        "p50_ms": 1e3 * _percentile(latencies, 0.5),
        "p99_ms": 1e3 * _percentile(latencies, 0.99),
        "ttft_ms": 1e3 * statistics.median(r.ttft for r in results),
        "bytes_per_token": sum(r.bytes_sent for r in results) / tokens,
        "decode_bytes_per_token": statistics.median(len(f) for rec in recs for f in rec.frames[1:])
        if any(len(rec.frames) > 1 for rec in recs) else math.nan,
        "mean_batch": (after_stats["batched_steps"] - before_stats["batched_steps"]) / forwards if forwards else math.nan,
        "server_tokens": after_stats["generated_tokens"] - before_stats["generated_tokens"],
        "replay_tokens_match": mismatched == 0,
        "mismatched_sessions": mismatched,
    }


# -- the whole benchmark ---------------------------------------------------------------------

def _handoff_curve(lm, split, server: ServerProcess, prompt_ids, n_tokens: int, reference: list[int],
                   windows: list[int]) -> list[dict]:
    """Fig. 5b: for each W̄ the edge generates W̄ tokens alone (full model here), then hands over."""
    from ..deploy.split import opsc_edge_model
    from ..runtime.generate import SamplingConfig
    from ..serve.client import RemoteCloud, generate_remote_handoff

    cloud = RemoteCloud(target=f"127.0.0.1:{server.ports['split']}", api_key=server.api_key,
                        model_sha256=lm.sha256, timeout_s=300.0)
    edge_model = opsc_edge_model(lm.model, split.spec)
    cfg = SamplingConfig(max_new_tokens=n_tokens)
    out = []
    for i_kv in (0, 1):
        for w in windows:
            s0, c0 = server.ask("stats", "split"), server.ask("cpu")
            tokens = list(generate_remote_handoff(split, edge_model, prompt_ids, cfg, cloud, local_tokens=w, i_kv=i_kv))
            s1, c1 = server.ask("stats", "split"), server.ask("cpu")
            out.append({
                "w_bar": w, "i_kv": i_kv, "tokens": len(tokens),
                "edge_tokens": min(w, len(tokens)),
                "cloud_tokens": s1["generated_tokens"] - s0["generated_tokens"],  # forwards the cloud answered
                "cloud_generated_tokens": len(tokens) - min(w, len(tokens)),  # tokens the edge got from the cloud
                "cloud_prefill_positions": s1["prompt_tokens"] - s0["prompt_tokens"],
                "cloud_cpu_s": c1 - c0,
                "frame_bytes": s1["frame_bytes_in"] - s0["frame_bytes_in"],
                "matches_split_greedy": tokens == reference,
            })
    return out


def _machine() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "parent_threads": torch.get_num_threads()}


def bench_serve(lm, model_ref: str, split_layer: int, clients: list[int], n_tokens: int = 32, repeats: int = 3,
                wire: str = "fp16", data_dir=None, threads: int = 0, handoff_windows: list[int] | None = None,
                progress: Callable[[str, int, int], None] | None = None,
                log: Callable[[str], None] | None = None) -> dict:
    """The whole benchmark (see the module doc). `lm` is the loaded model (for recording, the
    real edge and the handoff curve); `model_ref` what the server process loads (the same model)."""
    from ..runtime.generate import SamplingConfig, encode_prompts, generate
    from ..serve.client import RemoteCloud, generate_remote

    progress = progress or (lambda *_: None)
    log = log or (lambda _: None)
    if not clients or any(c < 1 for c in clients):
        raise SplitLLMError("clients must be integers >= 1")
    clients = sorted(set(clients))
    load_before = os.getloadavg()
    splits = {m: build_mode_split(lm, m, split_layer, wire, data_dir) for m in MODES}
    n_prompts = min(len(PROMPTS), max(clients))
    prompt_ids = [encode_prompts(lm.tokenizer, [p])[0] for p in PROMPTS[:n_prompts]]
    recordings: dict[str, list[Recording]] = {m: [] for m in MODES}
    total = len(MODES) * n_prompts
    for m in MODES:
        for ids in prompt_ids:
            progress("recording edge frames", sum(map(len, recordings.values())), total)
            recordings[m].append(record(splits[m], ids, n_tokens))
    progress("recording edge frames", total, total)
    # The replay is honest only if the recording is what the split computes in process.
    cfg = SamplingConfig(max_new_tokens=n_tokens)
    ref0 = generate(splits["split"].session(), prompt_ids[0], None, cfg).tokens[0].tolist()
    recorded_equals_generate = ref0 == recordings["split"][0].tokens
    pace = {m: statistics.median(r.edge_step_s for r in recordings[m]) for m in MODES}
    wires = {m: ("fp16" if wire == "tabq" else wire) if m == "cloud-only" else wire for m in MODES}
    layers = {"cloud-only": 0, "split": splits["split"].spec.split_layer}

    progress("starting the cloud server process", 0, 1)
    runs_raw: dict[tuple[str, int], list[dict]] = {}
    with ServerProcess(model_ref, split_layer, wire, data_dir, max_sessions=max(clients), threads=threads) as server:
        progress("starting the cloud server process", 1, 1)
        # A warm-up session per mode (first-call costs of the server and gRPC are not measured).
        for m in MODES:
            run_once(server, m, lm.sha256, layers[m], wires[m], recordings[m], 1, 0.0)
        total = repeats * len(clients) * len(MODES)
        done = 0
        for r in range(repeats):
            for c in clients:
                order = MODES if (r + c) % 2 == 0 else MODES[::-1]  # alternate: drifting load hits both
                for m in order:
                    progress(f"{m}, {c} client{'s' if c > 1 else ''} (repeat {r + 1}/{repeats})", done, total)
                    runs_raw.setdefault((m, c), []).append(
                        run_once(server, m, lm.sha256, layers[m], wires[m], recordings[m], c, pace[m]))
                    done += 1
        progress("runs", total, total)
        # One real edge end to end, and the handoff curve (Fig. 5a/b).
        progress("real edge + handoff curve", 0, 1)
        remote = RemoteCloud(target=f"127.0.0.1:{server.ports['split']}", api_key=server.api_key,
                             model_sha256=lm.sha256, timeout_s=300.0)
        real = list(generate_remote(splits["split"], prompt_ids[0], cfg, remote))
        windows = handoff_windows if handoff_windows is not None else sorted(
            {0, n_tokens // 4, n_tokens // 2, (3 * n_tokens) // 4, n_tokens})
        handoff = _handoff_curve(lm, splits["split"], server, prompt_ids[0], n_tokens,
                                 recordings["split"][0].tokens, windows)
        progress("real edge + handoff curve", 1, 1)
        server_threads = server.threads

    keys = ("cloud_cpu_s_per_token", "tokens_per_s", "p50_ms", "p99_ms", "ttft_ms", "bytes_per_token",
            "decode_bytes_per_token", "mean_batch", "wall_s")
    runs = []
    for (m, c), rs in sorted(runs_raw.items(), key=lambda kv: (MODES.index(kv[0][0]), kv[0][1])):
        rec = {"mode": m, "clients": c, "split_layer": layers[m], "wire": wires[m], "repeats": len(rs),
               "tokens": rs[0]["tokens"], "edge_pace_ms": 1e3 * pace[m],
               "replay_tokens_match": all(x["replay_tokens_match"] for x in rs)}
        rec.update({k: statistics.median(x[k] for x in rs) for k in keys})
        rec["per_repeat"] = {k: [x[k] for x in rs] for k in ("cloud_cpu_s_per_token", "tokens_per_s", "p50_ms", "p99_ms")}
        runs.append(rec)
    result = {
        "model": lm.model_id, "model_sha256": lm.sha256, "split_layer": layers["split"],
        "num_layers": splits["split"].cloud.parts.num_layers, "wire": wire, "tokens_per_client": n_tokens,
        "clients": clients, "repeats": repeats, "protocol": PROTOCOL, "cpu_measure": CPU_MEASURE,
        "cloud_only_note": "cloud-only is ℓ = 0: the cloud runs every decoder layer and the LM head; the edge sends "
                           "token embeddings (raw fp16 unless --wire none), so its bytes_per_token is that of "
                           "embeddings, not of token ids",
        "latency_note": "p50/p99 over every decode step of every client (send of the frame -> its token); "
                        "the prefill step is ttft_ms (median over clients)",
        "machine": {**_machine(), "server_threads": server_threads, "load_average_before": list(load_before),
                    "load_average_after": list(os.getloadavg())},
        "recorded_equals_generate": recorded_equals_generate,
        "real_edge_check": {"tokens_equal_replay": real == recordings["split"][0].tokens, "tokens": len(real)},
        "reference": {"prompt": PROMPTS[0], **{f"{m}_tokens": recordings[m][0].tokens for m in MODES}},
        "runs": runs,
        "handoff": handoff,
        "acceptance": acceptance(runs),
    }
    log(f"load average {load_before[0]:.2f} -> {result['machine']['load_average_after'][0]:.2f}")
    return result


def acceptance(runs: list[dict], at: int = 8) -> dict:
    """Issue 13's two numbers: split/cloud-only cloud CPU per token with `at` clients (else the
    most measured), and tokens/s with `at` clients over one client, per mode."""
    by = {(r["mode"], r["clients"]): r for r in runs}
    counts = sorted({r["clients"] for r in runs})
    n = at if at in counts else counts[-1]
    out: dict = {"clients": n}
    if ("split", n) in by and ("cloud-only", n) in by:
        out["cpu_per_token_split_over_cloud_only"] = (by["split", n]["cloud_cpu_s_per_token"]
                                                      / by["cloud-only", n]["cloud_cpu_s_per_token"])
        out["cpu_target"] = 0.70
    for m in MODES:
        if (m, 1) in by and (m, n) in by:
            out[f"{m}_speedup_vs_1_client"] = by[m, n]["tokens_per_s"] / by[m, 1]["tokens_per_s"]
    out["speedup_target"] = 3.0
    return out


def plot_serve(result: dict, path) -> None:
    """tokens/s and cloud CPU-s per token vs clients, both modes; and the handoff curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for m, style in zip(MODES, ("o-", "s-")):
        rs = sorted((r for r in result["runs"] if r["mode"] == m), key=lambda r: r["clients"])
        xs = [r["clients"] for r in rs]
        label = f"{m} (ℓ={rs[0]['split_layer']})" if rs else m
        axes[0].plot(xs, [r["tokens_per_s"] for r in rs], style, label=label)
        axes[1].plot(xs, [1e3 * r["cloud_cpu_s_per_token"] for r in rs], style, label=label)
    axes[0].set(xlabel="concurrent clients", ylabel="aggregate tokens/s", title="throughput")
    axes[1].set(xlabel="concurrent clients", ylabel="cloud CPU ms / token", title="cloud cost")
    for i_kv, style in ((0, "o-"), (1, "s--")):
        hs = [h for h in result.get("handoff", []) if h["i_kv"] == i_kv]
        axes[2].plot([h["w_bar"] for h in hs], [h["cloud_tokens"] for h in hs], style, label=f"I_kv = {i_kv}")
    axes[2].set(xlabel="W̄ (tokens generated on the edge before the handoff)", ylabel="tokens computed by the cloud",
                title="handoff (Fig. 5b)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
        if ax is not axes[2]:
            ax.set_xscale("log", base=2)
    fig.suptitle(f"bench serve: {result['model']}, {result['tokens_per_client']} tokens per client, "
                 f"wire {result['wire']}, medians of {result['repeats']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
