"""The cloud server core: the cloud half of one split behind the SplitCloud gRPC service.

One stream per generation session (proto/split.proto). The servicer checks the bearer token,
admits an Open against its session limit and KV-memory budget (the cache of layers [ℓ, L) for the
session's `max_tokens`), then answers each complete hidden-state Step with the next token (or
the top-k logits); a KV Step (handoff with I_kv = 1) is installed into the session's cache. Every forward goes through one `Batcher`, which runs concurrent sessions' decode steps
as one batched forward. Anything wrong with one stream (bad frame, out-of-order step, oversized
frame, wrong model) ends that stream with a status; the server keeps serving the others.

Network input is hostile: message sizes are capped by gRPC (`max_message_bytes`), a step's
chunks together by `max_frame_bytes`, tokens by the session's admitted `max_tokens`, and a frame
is decoded only up to the size its step claims. A stream idle for `idle_timeout_s` is cancelled
and its session freed.

The cloud half runs on the fast decode path (`runtime.fast.fast_cloud_half`: one static KV cache
per session, preallocated for the positions its Open reserved) when the model supports it, else on
the eager Hugging Face half; one servicer runs one kind for all its sessions (prefills, decode
steps, batches, KV handoffs), so a static cache never meets an eager forward or the reverse.

TLS: `CloudServer(..., credentials=grpc.ssl_server_credentials(...))`. The metrics endpoint and
the SIGTERM handler live in the `serve-cloud` command (splitcli/cli/serve.py), which reads
`counters()`, the `on_step` / `on_token` hooks and `CloudServer.drain` from here.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch

from splitcli.codec.config import MIN_Q
from splitcli.errors import SplitLLMError
from splitcli.quant import fp_kv_bytes_per_token
from splitcli.runtime.adaptive import with_q_bar
from splitcli.runtime.fast import fast_cloud_half
from splitcli.runtime.generate import SamplingConfig, sample_next
from splitcli.runtime.kv_rows import install_static_rows
from splitcli.serve.batching import Batcher, CloudState
from splitcli.serve.batching_fast import is_fast
from splitcli.serve.config import CloudSettings  # noqa: F401 - its home is serve.config; imported from here too
from splitcli.serve.proto import split_pb2 as pb
from splitcli.serve.proto import split_pb2_grpc as pb_grpc
from splitcli.serve.protocol import (PB_TO_IKV, PB_TO_WIRE, PROTOCOL_VERSION, check_codec_config, codec_config_from_pb,
                                     codec_from_pb, decode_frame)
from splitcli.serve.state import ServeCounters, ServingState, expected_auth  # noqa: F401 - ServeCounters: imported from here too

#: Most chunks one step may arrive in (bounds per-step bookkeeping whatever the sizes).
MAX_CHUNKS = 4096


def cloud_kv_bytes_per_token(cloud) -> int:
    """Bytes one position costs in the cloud's cache of layers [ℓ, L) (float cache, model dtype)."""
    cfg = cloud.parts.config
    heads = getattr(cfg, "num_attention_heads")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    itemsize = next(cloud.parts.lm_head.parameters()).element_size()
    return fp_kv_bytes_per_token(cloud.parts.num_layers - cloud.split_layer, kv_heads, head_dim, itemsize)


class _Refused(Exception):
    """An Open the server does not admit: the status code and the one-line reason."""

    def __init__(self, code: grpc.StatusCode, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass
class _Session:
    id: str
    state: CloudState
    i_kv: int
    max_tokens: int
    reserved: int
    sampling: SamplingConfig
    top_k: int
    generator: torch.Generator
    next_step: int = 0
    next_chunk: int = 0
    chunks: list | None = None
    chunk_bytes: int = 0
    chunk_meta: tuple = ()
    codec: object = None  # the edge's calibrated CodecConfig from its Open; None: the served wire's own
    cfgs: dict = dataclasses.field(default_factory=dict)  # q̄ -> the session's codec cut to it (Step.q_bar)


class CloudServicer(ServingState, pb_grpc.SplitCloudServicer):
    """Per-session cloud state, admission, auth and limits around one split's cloud half.
    `fast`: run the half on the fast path where supported (False: the eager half, as before)."""

    def __init__(self, split, settings: CloudSettings, fast: bool = True):
        self.split, self.settings = split, settings
        self.cloud = (fast_cloud_half(split.cloud) if fast else None) or split.cloud
        self.fast = is_fast(self.cloud)
        self.hidden_size = self.cloud.parts.config.hidden_size
        self.vocab = self.cloud.parts.lm_head.weight.shape[0]
        self.context_length = getattr(self.cloud.parts.config, "max_position_embeddings", None)
        self.bytes_per_token = cloud_kv_bytes_per_token(self.cloud)
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self.batcher = Batcher(self.cloud, settings.batch_window_ms / 1e3, settings.max_batch,
                               active=lambda: len(self._sessions))  # a racy read is fine for a hint
        self._kv_used = 0
        self._ids = itertools.count()
        self._counters = ServeCounters()
        self._draining = False
        self._expected_auth = expected_auth(settings.api_key)
        #: Metrics hooks (must not raise): on_step(seconds, n_tokens) after each forward;
        #: on_token(first, seconds) per reply: since admission for a session's first, else since its last.
        self.on_step = None
        self.on_token = None
        self._start_reaper(settings.idle_timeout_s)

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        self._stop_reaper()
        self.batcher.stop()
        with self._lock:
            for sess in list(self._sessions.values()):
                self._release_locked(sess)

    @property
    def kv_used(self) -> int:
        with self._lock:
            return self._kv_used

    @property
    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _reaped_locked(self, key) -> None:  # ServingState's reaper: the session was idle too long
        sess = self._sessions.get(key)
        if sess is not None:
            self._release_locked(sess)

    def _release_locked(self, sess: _Session) -> None:
        self._watched.pop(sess.id, None)
        if self._sessions.pop(sess.id, None) is not None:
            self._kv_used -= sess.reserved
            sess.state.closed = True
            sess.state.cache = None  # the memory goes now, not when the handler thread notices

    # -- the RPC ---------------------------------------------------------------------------
    def Session(self, request_iterator, context):
        self._authenticate(context)
        first = self._first_message(request_iterator, context)
        try:
            sess = self._admit(first.open, context)
        except _Refused as refused:
            with self._lock:
                self._counters.sessions_refused += 1
            yield pb.ServerMessage(opened=pb.Opened(admitted=False, reason=refused.reason))
            context.abort(refused.code, refused.reason)
        try:
            yield pb.ServerMessage(opened=pb.Opened(
                admitted=True, session_id=sess.id, max_message_bytes=self.settings.max_message_bytes,
                max_frame_bytes=self.settings.max_frame_bytes, protocol_version=PROTOCOL_VERSION,
                adaptive_steps=True, codec_config=True))
            last_reply = None
            admitted_at = time.monotonic()
            for msg in request_iterator:
                self._touch(sess.id)
                kind = msg.WhichOneof("kind")
                if kind == "close":
                    return
                if kind == "probe":  # the edge timing its link: answered at once, nothing kept
                    yield pb.ServerMessage(probe=pb.ProbeReply(received=len(msg.probe.padding)))
                    continue
                if kind != "step":
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"expected a step or close, got {kind or 'nothing'}")
                # A busy session is never reaped: its step may sit in a batch with other sessions'.
                if not self._touch(sess.id, busy=True):
                    context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the session was idle too long and was freed")
                held = time.perf_counter()
                try:
                    token = self._step(sess, msg.step, context)
                finally:
                    self._touch(sess.id)
                if token is not None:
                    token.cloud_us = int((time.perf_counter() - held) * 1e6)
                    reply = pb.ServerMessage(token=token)
                    with self._lock:
                        self._counters.reply_bytes_out += reply.ByteSize()
                    now = time.monotonic()
                    if self.on_token is not None:
                        self.on_token(last_reply is None, now - (admitted_at if last_reply is None else last_reply))
                    last_reply = now
                    yield reply
        finally:
            with self._lock:
                self._release_locked(sess)

    def _admit(self, msg: pb.Open, context) -> _Session:
        spec = self.split.spec
        bad = grpc.StatusCode.FAILED_PRECONDITION
        if msg.protocol_version != PROTOCOL_VERSION:
            raise _Refused(bad, f"protocol version {msg.protocol_version} is not the server's {PROTOCOL_VERSION}")
        if msg.model_sha256 != self.settings.model_sha256:
            raise _Refused(bad, f"model sha256 {msg.model_sha256[:16] or '(empty)'}… is not the served model "
                                f"{self.settings.model_sha256[:16]}…")
        if msg.split_layer != spec.split_layer:
            raise _Refused(bad, f"split layer {msg.split_layer} is not the served ℓ = {spec.split_layer}")
        wire = PB_TO_WIRE.get(msg.wire)
        if wire != spec.wire:
            raise _Refused(bad, f"wire {wire or msg.wire} is not the served wire {spec.wire}")
        session_codec = None
        if wire == "tabq":
            try:
                codec = codec_from_pb(msg.codec)
            except SplitLLMError as exc:
                raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            if codec != spec.codec:
                theirs, ours = codec.to_dict(), spec.codec.to_dict()
                diff = ", ".join(f"{k} {theirs[k]!r} (served {ours[k]!r})" for k in ours if theirs[k] != ours[k])
                raise _Refused(bad, f"codec settings differ from the served ones: {diff}")
            session_codec = self._session_codec(msg, codec)
        if wire == "predictive" and msg.predictive_crc != self.split.wire.pc.crc:
            raise _Refused(bad, f"the edge's predictive codec (crc {msg.predictive_crc:08x}) is not the served one "
                                f"(crc {self.split.wire.pc.crc:08x}): give the edge the cloud's codec file "
                                "(--predictive-codec)")
        ikv = PB_TO_IKV.get(msg.kv_mode)
        if ikv is None:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, "kv_mode must be KV_HIDDEN or KV_CACHE")
        sampling, top_k = self._sampling(msg)
        if msg.max_tokens < 1 or (self.context_length is not None and msg.max_tokens > self.context_length):
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"max_tokens must lie in [1, {self.context_length}], got {msg.max_tokens}")
        reserved = msg.max_tokens * self.bytes_per_token
        with self._lock:
            if self._draining:
                raise _Refused(grpc.StatusCode.UNAVAILABLE, "the server is draining: it admits no new session")
            if len(self._sessions) >= self.settings.max_sessions:
                raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"session limit reached ({self.settings.max_sessions} running)")
            if self._kv_used + reserved > self.settings.kv_budget_bytes:
                raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"KV budget exhausted: {reserved} bytes asked, "
                               f"{self.settings.kv_budget_bytes - self._kv_used} free")
            # a static cache holds exactly the positions reserved (allocated at its first forward)
            cache = self.cloud.new_cache(msg.max_tokens) if self.fast else self.cloud.new_cache()
            sess = _Session(id=f"s{next(self._ids)}", state=CloudState(cache), i_kv=ikv,
                            max_tokens=msg.max_tokens, reserved=reserved, sampling=sampling, top_k=top_k,
                            generator=torch.Generator().manual_seed(sampling.seed), codec=session_codec)
            self._sessions[sess.id] = sess
            self._watch_locked(sess.id, context)
            self._kv_used += reserved
            self._counters.sessions_admitted += 1
        return sess

    def _session_codec(self, msg: pb.Open, settings):
        """The edge's calibrated codec (Open.codec_config), checked against the model and the
        session's settings before the session holds it; None when the edge sent none (an older
        edge: the served wire's own calibration decodes, as before)."""
        if not msg.HasField("codec_config"):
            return None
        try:
            cfg = codec_config_from_pb(msg.codec_config, self.hidden_size)
            check_codec_config(cfg, settings, self.hidden_size)
        except SplitLLMError as exc:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        return cfg

    def _sampling(self, msg: pb.Open) -> tuple[SamplingConfig, int]:
        s = msg.sampling
        if s.top_k_logits > min(self.settings.max_top_k, self.vocab):
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                           f"top_k_logits must be <= {min(self.settings.max_top_k, self.vocab)}, got {s.top_k_logits}")
        try:
            cfg = SamplingConfig(max_new_tokens=max(1, msg.max_tokens), temperature=s.temperature,
                                 top_p=s.top_p or 1.0, seed=s.seed % (1 << 63))
        except SplitLLMError as exc:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        return cfg, s.top_k_logits

    # -- steps -----------------------------------------------------------------------------
    def _step(self, sess: _Session, step: pb.Step, context) -> pb.Token | None:
        """A complete step's token; None for a duplicate or a chunk that is not the last."""
        expected = (sess.next_step, sess.next_chunk)
        got = (step.step_id, step.chunk_index)
        if got < expected:
            return None  # a duplicate: already received, ignored
        if got != expected:
            context.abort(grpc.StatusCode.ABORTED, f"step {step.step_id} chunk {step.chunk_index} is out of order: "
                                                   f"expected step {expected[0]} chunk {expected[1]}")
        count = step.chunk_count or 1
        meta = (step.position, step.n_tokens, count, step.kind)
        if step.chunk_index == 0:
            if count > MAX_CHUNKS:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a step may have at most {MAX_CHUNKS} chunks, got {count}")
            sess.chunks, sess.chunk_bytes, sess.chunk_meta = [], 0, meta
        elif meta != sess.chunk_meta:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "chunks of one step disagree on position, tokens, count or kind")
        sess.chunk_bytes += len(step.payload)
        if sess.chunk_bytes > self.settings.max_frame_bytes:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"frame exceeds the server's max_frame_bytes = {self.settings.max_frame_bytes}")
        sess.chunks.append(step.payload)
        if step.chunk_index + 1 < count:
            sess.next_chunk += 1
            return None
        frame = b"".join(sess.chunks)
        sess.chunks, sess.chunk_bytes = None, 0
        sess.next_step, sess.next_chunk = sess.next_step + 1, 0
        self._check_span(sess, step.step_id, step.position, step.n_tokens, context)
        if step.kind == pb.PAYLOAD_KV:
            self._install_kv(sess, step.step_id, step.position, step.n_tokens, frame, context)
            return None
        if step.kind != pb.PAYLOAD_HIDDEN:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"step {step.step_id} has an unknown payload kind")
        return self._run_step(sess, step.step_id, step.position, step.n_tokens, frame, context, step.q_bar)

    def _check_span(self, sess: _Session, step_id: int, position: int, n_tokens: int, context) -> None:
        if position != sess.state.length:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"step {step_id} is at position {position}; the session is at {sess.state.length}")
        if n_tokens < 1 or position + n_tokens > sess.max_tokens:
            context.abort(grpc.StatusCode.OUT_OF_RANGE,
                          f"step {step_id} brings {n_tokens} tokens at position {position}; "
                          f"the session was admitted for {sess.max_tokens}")

    def _install_kv(self, sess: _Session, step_id: int, position: int, n_tokens: int, frame: bytes, context) -> None:
        """A handoff with I_kv = 1: the edge's KV rows of layers [ℓ, L) for positions
        [position, position + n_tokens) go straight into the session's cache. No forward runs, and
        this session has no step in the batcher now (its steps are sequential), so the handler
        thread may write its cache."""
        from splitcli.runtime.handoff import decode_kv, kv_layout
        from splitcli.runtime.kv_rows import install_rows

        if sess.i_kv != 1:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"step {step_id} carries KV rows, but the session "
                                                               "was opened with KV_HIDDEN (I_kv = 0)")
        parts = self.cloud.parts
        try:
            # The layout caps every size at this session's admitted tokens before anything is allocated.
            layout = kv_layout(parts, range(self.cloud.split_layer, parts.num_layers), 1, sess.max_tokens)
            payload = decode_kv(frame, layout)
            if (payload.start, payload.count) != (position, n_tokens):
                raise SplitLLMError(f"KV rows cover [{payload.start}, {payload.start + payload.count}), the step "
                                    f"claims [{position}, {position + n_tokens})")
            if tuple(r.layer for r in payload.layers) != tuple(layout.layers):
                raise SplitLLMError(f"KV rows must cover exactly the cloud's layers {layout.layers.start}.."
                                    f"{layout.layers.stop - 1}")
            if not all(torch.isfinite(r.keys).all() and torch.isfinite(r.values).all() for r in payload.layers):
                raise SplitLLMError("KV rows hold NaN or Inf")
            dtype = next(parts.lm_head.parameters()).dtype
            if self.fast:
                install_static_rows(sess.state.cache, payload, self.cloud.split_layer, dtype)
            else:
                install_rows(sess.state.cache, payload, dtype)
        except SplitLLMError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"step {step_id}: {exc}")
        sess.state.length += n_tokens
        with self._lock:
            self._counters.prompt_tokens += n_tokens if position == 0 else 0
            self._counters.frame_bytes_in += len(frame)

    def _codec_at(self, sess: _Session, q_bar: int, step_id: int, context):
        """The session's codec (the edge's calibration, else the served wire's), cut to the q̄ a Step
        names (Algorithm 2 compressing harder); None: the served wire's own."""
        base = sess.codec if sess.codec is not None else getattr(self.split.wire, "cfg", None)
        if q_bar == 0:
            return sess.codec
        if base is None or not MIN_Q <= q_bar <= base.q_bar:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"step {step_id} names q̄ {q_bar}: the session's wire "
                                                            + (f"takes q̄ in [{MIN_Q}, {base.q_bar}]" if base else "is raw"))
        if q_bar not in sess.cfgs:  # at most one per q̄ in [2, q̄]; only this session's handler touches it
            sess.cfgs[q_bar] = with_q_bar(base, q_bar)
        return sess.cfgs[q_bar]

    def _run_step(self, sess: _Session, step_id: int, position: int, n_tokens: int, frame: bytes, context,
                  q_bar: int = 0):
        cfg = self._codec_at(sess, q_bar, step_id, context)
        try:
            hidden = decode_frame(self.split.wire, frame, n_tokens, self.hidden_size, cfg)
        except SplitLLMError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"step {step_id}: {exc}")
        started = time.perf_counter()
        try:
            # the logits its reply reads: the top-k it sends, else what its sampling reads
            logits = self.batcher.run(sess.state, hidden[None], top=sess.top_k or sess.sampling.top)
        except SplitLLMError as exc:  # the frame was valid: the failure is the server's
            context.abort(grpc.StatusCode.INTERNAL, f"step {step_id}: {exc}")
        if self.on_step is not None:
            self.on_step(time.perf_counter() - started, n_tokens)
        with self._lock:
            c = self._counters
            c.prompt_tokens += n_tokens if position == 0 else 0
            c.generated_tokens += 1
            c.frame_bytes_in += len(frame)
        if sess.top_k:
            values, ids = torch.topk(logits.float(), sess.top_k)
            return pb.Token(step_id=step_id, top_k=pb.TopK(token_ids=ids.tolist(), logits=values.tolist()))
        token = sample_next(logits[None], sess.sampling, sess.generator)
        return pb.Token(step_id=step_id, token_id=int(token[0]))


class CloudServer:
    """A started gRPC server around a CloudServicer; `port` is the bound port (0 picks a free one)."""

    def __init__(self, split, settings: CloudSettings, address: str = "127.0.0.1:0", credentials=None,
                 servicer=None):
        # servicer: another SplitCloud servicer to serve instead (serve/ray_backend.py's front)
        self.servicer = servicer if servicer is not None else CloudServicer(split, settings)
        workers = settings.max_sessions + 4  # room to refuse sessions past the limit with a reason
        limit = settings.max_message_bytes
        self._executor = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="splitllm-cloud")
        self.server = grpc.server(
            self._executor,
            # so_reuseport off: with it (gRPC's default) a second server on a busy port binds anyway and
            # silently shares the traffic; a port in use must be an error instead.
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=workers)
        pb_grpc.add_SplitCloudServicer_to_server(self.servicer, self.server)
        # credentials: grpc.ssl_server_credentials(...) for TLS; None serves plaintext (loopback, tests)
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError:  # grpc raises on a port in use or a bad address (older versions return 0)
            self.port = 0
        if self.port == 0:
            self.servicer.close()
            self._executor.shutdown(wait=False)
            why = "port in use or bad address" + (", or a TLS certificate/key gRPC cannot use" if credentials else "")
            raise SplitLLMError(f"could not bind the cloud server to {address} ({why})")
        self.server.start()

    def drain(self, timeout_s: float) -> bool:
        """Refuse new sessions and wait up to `timeout_s` for running ones to end (for SIGTERM);
        True when none is left. `stop` afterwards ends whatever still runs."""
        self.servicer.start_draining()
        deadline = time.monotonic() + timeout_s
        while self.servicer.session_count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.servicer.session_count == 0

    def stop(self, grace: float | None = 0) -> None:
        self.server.stop(grace).wait(timeout=10)
        self.servicer.close()
        # grpc does not own the pool it was given: without this its worker threads outlive the server
        self._executor.shutdown(wait=True, cancel_futures=True)
