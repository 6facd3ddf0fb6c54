"""`bench serve`'s machinery: the two modes' splits, recorded edge sessions, the server child
process and the replay clients that drive it (see `splitcli.bench.serve` for the protocol).

Kept apart from the benchmark's driver and report so each file stays one concern: everything
here runs one measurement; `bench.serve` decides which ones, takes medians and plots.
"""

from __future__ import annotations

import math
import os
import queue
import secrets
import statistics
import threading
import time
from dataclasses import dataclass, field

from ..errors import SplitLLMError

MODES = ("cloud-only", "split")
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
        return cloud_only_split(lm, "fp16" if wire in ("tabq", "predictive") else wire)
    return build_split(lm, SplitSpec(split_layer=split_layer, wire=wire), data_dir=data_dir)


# -- recording -------------------------------------------------------------------------------

def record(split, prompt_ids, n_tokens: int) -> Recording:
    """Run the edge half on the prompt and its greedy continuation, keep every step's frame, and
    the token the cloud half answers in process (what the server must answer)."""
    import torch

    from ..runtime.generate import SamplingConfig, sample_next
    from ..runtime.wire import encode_step
    from ..serve.protocol import decode_frame

    cfg = SamplingConfig(max_new_tokens=n_tokens)
    hidden_size = split.cloud.parts.config.hidden_size
    edge_cache, cloud_cache = split.edge.new_cache(), split.cloud.new_cache()
    new, position, prev = prompt_ids, 0, None
    frames, counts, tokens, edge_times = [], [], [], []
    for _ in range(n_tokens):
        t = new.shape[1]
        positions = torch.arange(position, position + t)[None]
        t0 = time.perf_counter()
        hidden = split.edge(new, positions, None, edge_cache)
        frame, prev = encode_step(split.wire, hidden.reshape(t, -1), new, prev)
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

        def answer(cmd, arg):
            if cmd == "cpu":
                return time.process_time()
            if cmd == "stats":
                srv = servers[arg].servicer
                c = srv.counters()
                return {"generated_tokens": c.generated_tokens, "prompt_tokens": c.prompt_tokens,
                        "frame_bytes_in": c.frame_bytes_in, "forwards": srv.batcher.forwards,
                        "batched_steps": srv.batcher.batched_steps, "sessions": srv.session_count}
            raise StopIteration

        serve_commands(conn, answer)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as one line
        report_child_error(conn, exc)
    finally:
        for srv in servers.values():
            srv.stop(0)
        conn.close()


def report_child_error(conn, exc: BaseException) -> None:
    """A server child's failure, sent to the parent as one line (the pipe may already be gone)."""
    try:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    except (OSError, ValueError):
        pass


def serve_commands(conn, answer) -> None:
    """A server child's command loop: each (cmd, arg) from the parent is answered with
    `answer(cmd, arg)` until it raises StopIteration ('stop') or the parent dies."""
    parent = os.getppid()
    while True:
        if not conn.poll(1.0):
            if os.getppid() != parent:  # the parent died: do not outlive it
                return
            continue
        cmd, arg = conn.recv()
        try:
            conn.send(answer(cmd, arg))
        except StopIteration:
            return


class ServerProcess:
    """The child process that runs the servers; a context manager that always ends it."""

    def __init__(self, model_ref: str, split_layer: int, wire: str, data_dir, max_sessions: int, threads: int = 0,
                 start_timeout_s: float = 600.0, main=None, main_args: tuple = ()):
        """`main` (default: the local servers' `_server_main`) runs in the child with the same
        arguments, then `main_args`; it answers the same commands on the pipe."""
        import multiprocessing as mp

        self.api_key = secrets.token_hex(16)
        settings = {"api_key": self.api_key, "max_sessions": max_sessions, "max_batch": max(1, max_sessions),
                    "idle_timeout_s": 120.0}
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._lock = threading.Lock()
        self.process = ctx.Process(target=main or _server_main, name="splitllm-bench-cloud", daemon=True,
                                   args=(child, model_ref, split_layer, wire, data_dir, settings, threads, *main_args))
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

def open_fields(split) -> dict:
    """What an Open must carry besides ℓ and the wire for `split`'s frames to decode on the server:
    a codec wire's settings and calibrated config, a predictive wire's codec crc."""
    from ..serve.protocol import codec_config_to_pb, codec_to_pb

    if split.spec.wire == "tabq":
        return dict(codec=codec_to_pb(split.spec.codec), codec_config=codec_config_to_pb(split.wire.cfg))
    if split.spec.wire == "predictive":
        return dict(predictive_crc=split.wire.pc.crc)
    return {}


def _open_message(sha: str, split_layer: int, wire: str, max_tokens: int, fields: dict | None = None):
    from ..serve.proto import split_pb2 as pb
    from ..serve.protocol import PROTOCOL_VERSION, WIRE_TO_PB

    return pb.ClientMessage(open=pb.Open(model_sha256=sha, split_layer=split_layer, wire=WIRE_TO_PB[wire],
                                         max_tokens=max_tokens, kv_mode=pb.KV_HIDDEN,
                                         protocol_version=PROTOCOL_VERSION, sampling=pb.Sampling(),
                                         **(fields or {})))


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
             clients: int, pace_s: float, timeout_s: float = 300.0, fields: dict | None = None) -> dict:
    """One run: `clients` replay sessions at once against `mode`'s server; the measurements."""
    target = f"127.0.0.1:{server.ports[mode]}"
    recs = [recordings[i % len(recordings)] for i in range(clients)]
    results = [_ClientResult() for _ in range(clients)]
    ready = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=_replay, name=f"bench-replay-{i}", daemon=True,
                                args=(target, server.api_key,
                                      _open_message(sha, split_layer, wire, r.max_tokens, fields),
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
