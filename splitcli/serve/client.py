"""The edge side of the protocol: run the edge half here, stream its frames to a cloud server.

`generate_remote` is `runtime.generate.generate` for one prompt with the cloud across a gRPC
stream: the edge embeds and runs layers [0, ℓ) with its own cache (on the fast decode path of
`runtime.fast` where the model supports it, as `generate` does), encodes each step with the
split's wire, and the cloud answers with the next token (it samples: greedy, or temperature /
top-p with the request's seed, the same sampler as in-process) or with its top-k logits (the edge
samples). Prefill frames larger than a message are chunked. Errors come back as `RemoteError`
carrying the gRPC status. `generate_remote_handoff` is Fig. 5b: the edge generates the first w
tokens alone, then hands the session over (I_kv = 0: hidden states at ℓ; 1: KV rows of [ℓ, L));
it lives in serve/handoff.py, on this module's stream and step machinery.

Recovery: when the stream breaks mid-generation (the cloud restarted, the connection dropped),
`generate_remote` reconnects with bounded exponential backoff (`RemoteCloud.retries`) and rebuilds
the cloud's state on a new session from the edge's own history: the hidden states at ℓ of every
position so far, sent as one prefill step whose answer is the token the broken step was waiting
for. Greedy output is identical to an uninterrupted run; with temperature > 0 and the cloud
sampling, the cloud's sampler restarts from the seed, so sampled tokens after a reconnect differ
(top-k mode, where the edge samples, is unaffected). TLS: `RemoteCloud.root_certificates`.

`generate_remote_handoff` (serve/handoff.py) recovers the same way after an I_kv = 0 handoff (its history starts
with the hidden states of the local tokens); after an I_kv = 1 handoff a break is an error.

Algorithm 2: with `live` (a `serve.adaptive.LiveRun`) every decode step is decided on the link
this session measures (keep, compress harder, drop KV at the handoff, stop) and traced; see
`splitcli.serve.adaptive`. A replay after a break codes the history at the plan's q̄, so greedy
output after a recovery equals an uninterrupted run only where every step kept the plan's q̄.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import torch

from splitcli.errors import SplitLLMError
from splitcli.plan.early_exit import Step
from splitcli.runtime.generate import SamplingConfig, sample_next
from splitcli.runtime.wire import encode_step
from splitcli.serve.proto import split_pb2 as pb
from splitcli.serve.proto import split_pb2_grpc as pb_grpc
from splitcli.serve.protocol import (CHUNK_HEADROOM, IKV_TO_PB, PROTOCOL_VERSION, WIRE_TO_PB, chunk_frame,
                                     codec_config_to_pb, codec_to_pb)

_END = object()


class RemoteError(SplitLLMError):
    """The cloud ended the session with a gRPC status (`code`: grpc.StatusCode)."""

    def __init__(self, code, details: str):
        super().__init__(f"cloud refused: {code.name}: {details}")
        self.code, self.details = code, details


@dataclass(frozen=True)
class RemoteCloud:
    """Where the cloud is and how to talk to it. `timeout_s` bounds a whole generation."""

    target: str
    api_key: str
    model_sha256: str
    max_message_bytes: int = 4 << 20
    timeout_s: float = 120.0
    #: PEM of the CA (or the self-signed certificate) to trust: the channel uses TLS; None: plaintext.
    root_certificates: bytes | None = None
    #: Reconnects after a broken stream, waiting backoff_s, 2·backoff_s, ... (at most backoff_max_s):
    #: about 22 s in all by default, long enough for a cloud process to be restarted.
    retries: int = 8
    backoff_s: float = 0.2
    backoff_max_s: float = 4.0

    def __post_init__(self) -> None:
        if not self.target:
            raise SplitLLMError("the cloud address is empty: give HOST:PORT")
        if not self.model_sha256:
            raise SplitLLMError("the edge needs the model's sha256 to open a cloud session")
        if self.max_message_bytes <= CHUNK_HEADROOM:
            raise SplitLLMError(f"max_message_bytes must exceed {CHUNK_HEADROOM}, got {self.max_message_bytes}")
        if not self.timeout_s > 0:
            raise SplitLLMError(f"timeout_s must be > 0, got {self.timeout_s!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise SplitLLMError(f"retries must be an integer >= 0, got {self.retries!r}")
        if not 0 < self.backoff_s <= self.backoff_max_s:
            raise SplitLLMError(f"backoff must satisfy 0 < backoff_s <= backoff_max_s, got {self.backoff_s!r}, "
                                f"{self.backoff_max_s!r}")

    def channel(self) -> grpc.Channel:
        limit = self.max_message_bytes
        # gRPC's own reconnect backoff starts at 1 s and grows to 2 min; ours bounds the waiting instead.
        options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit),
                   ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", int(self.backoff_max_s * 1000))]
        if self.root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=self.root_certificates)
            return grpc.secure_channel(self.target, creds, options=options)
        return grpc.insecure_channel(self.target, options=options)


#: Statuses that mean the connection or the server went away (not that the request was wrong):
#: worth a reconnect. CANCELLED is what a stopping server gives its running streams.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


def open_message(split, cloud: RemoteCloud, max_tokens: int, cfg: SamplingConfig, top_k_logits: int = 0,
                 i_kv: int = 0) -> pb.ClientMessage:
    """The Open that describes `split` (ℓ, wire, codec settings) to the cloud; with the codec wire
    also the edge's calibrated codec (channel scale, classes, symbol model, the τ and q̄ calibration
    chose), so the cloud decodes with exactly what this edge encodes with."""
    spec = split.spec
    msg = pb.Open(model_sha256=cloud.model_sha256, split_layer=spec.split_layer, wire=WIRE_TO_PB[spec.wire],
                  max_tokens=max_tokens, kv_mode=IKV_TO_PB[i_kv], protocol_version=PROTOCOL_VERSION,
                  sampling=pb.Sampling(temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                                       top_k_logits=top_k_logits))
    if spec.wire == "tabq":
        msg.codec.CopyFrom(codec_to_pb(spec.codec))
        msg.codec_config.CopyFrom(codec_config_to_pb(split.wire.cfg))
    elif spec.wire == "predictive":
        msg.predictive_crc = split.wire.pc.crc
    return pb.ClientMessage(open=msg)


def _needs_codec_config(split) -> bool:
    """The session's frames decode only with this edge's calibrated state (a channel scale, or the
    τ / q̄ a target chose), which a server older than Opened.codec_config cannot take."""
    codec = split.spec.codec
    return split.spec.wire == "tabq" and (codec.channel_alpha > 0 or codec.target_rel_error is not None)


class _Stream:
    """One bidirectional call: messages go in through a queue, replies come out in order."""

    def __init__(self, cloud: RemoteCloud, channel: grpc.Channel):
        self._out: queue.Queue = queue.Queue()
        stub = pb_grpc.SplitCloudStub(channel)
        self._call = stub.Session(iter(self._out.get, _END), timeout=cloud.timeout_s,
                                  metadata=[("authorization", f"Bearer {cloud.api_key}")])

    def send(self, msg: pb.ClientMessage) -> None:
        self._out.put(msg)

    def receive(self) -> pb.ServerMessage:
        try:
            return next(self._call)
        except StopIteration:
            raise SplitLLMError("the cloud ended the session without answering") from None
        except grpc.RpcError as exc:
            raise RemoteError(exc.code(), exc.details()) from None

    def close(self) -> None:
        self._out.put(_END)
        self._call.cancel()  # no-op when the server already finished; frees the call otherwise


def _to_token(reply: pb.ServerMessage, step_id: int, cfg: SamplingConfig, vocab: int,
              generator: torch.Generator) -> int:
    if reply.WhichOneof("kind") != "token" or reply.token.step_id != step_id:
        raise SplitLLMError(f"the cloud answered step {step_id} with something else")
    tok = reply.token
    # The cloud is a peer on a network: its answer is checked before it indexes anything here.
    if tok.WhichOneof("result") == "token_id":
        if tok.token_id >= vocab:
            raise SplitLLMError(f"the cloud sent token id {tok.token_id}, outside the vocabulary of {vocab}")
        return tok.token_id
    if len(tok.top_k.token_ids) != len(tok.top_k.logits) or not 0 < len(tok.top_k.token_ids) <= vocab:
        raise SplitLLMError("the cloud sent malformed top-k logits")
    ids = torch.tensor(list(tok.top_k.token_ids), dtype=torch.long)
    if int(ids.max()) >= vocab:
        raise SplitLLMError("the cloud sent top-k logits with invalid token ids")
    vals = torch.tensor(list(tok.top_k.logits), dtype=torch.float32)
    # -inf is a masked token (allowed); NaN / +inf, or nothing finite, would crash sampling
    if vals.isnan().any() or vals.isposinf().any() or not vals.isfinite().any():
        raise SplitLLMError("the cloud sent top-k logits that are not finite")
    logits = torch.full((1, vocab), float("-inf"))
    logits[0, ids] = vals
    return int(sample_next(logits, cfg, generator)[0])


def _open_stream(split, cloud: RemoteCloud, channel, max_tokens: int, cfg: SamplingConfig, top_k_logits: int,
                 i_kv: int = 0, live=None):
    """A started, admitted stream and the payload bytes one chunk may carry."""
    stream = _Stream(cloud, channel)
    try:
        msg = open_message(split, cloud, max_tokens, cfg, top_k_logits, i_kv)
        t0 = time.perf_counter()
        if live is not None:
            live.shape(msg.ByteSize())  # the Open crosses the same (emulated) uplink as the frames
        stream.send(msg)
        opened = stream.receive()
        seconds = time.perf_counter() - t0
        if opened.WhichOneof("kind") != "opened" or not opened.opened.admitted:
            stream.receive()  # a refusal is followed by the status that says why: raises RemoteError
            raise SplitLLMError(f"the cloud did not admit the session: {opened.opened.reason or 'no reason given'}")
        if not opened.opened.codec_config and _needs_codec_config(split):
            raise SplitLLMError("the cloud predates codec v3 calibration in the Open (it decodes with its own): "
                                "channel alpha / a target error need a newer serve-cloud")
    except BaseException:
        stream.close()  # ends the request iterator too, so no thread waits on it
        raise
    if live is not None:
        live.opened(opened.opened, msg.ByteSize(), seconds)  # the round trip: the link's first sample
    chunk = min(cloud.max_message_bytes, opened.opened.max_message_bytes or cloud.max_message_bytes)
    return stream, chunk - CHUNK_HEADROOM


def _prompt_ids(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise SplitLLMError("remote generation takes one non-empty prompt: token ids [1, T]")
    return ids


def _edge_and_cache(split, cache, capacity: int):
    """The edge half this stage runs and its cache: the fast decode path (`runtime.fast`, a static
    cache for `capacity` positions) as `generate` runs it, unless the model is one it does not
    support or the caller brings its own eager cache (a handoff's, rows of the local model
    installed); a static cache the caller brings runs on the fast half."""
    from splitcli.quant.static_kv import StaticCache
    from splitcli.runtime.fast import fast_edge_half
    from splitcli.runtime.session import _context_length

    if isinstance(cache, StaticCache):  # a fast local stage's rows, carried (serve.handoff)
        return fast_edge_half(split.edge), cache
    fast = fast_edge_half(split.edge) if cache is None else None
    if fast is None:
        return split.edge, split.edge.new_cache() if cache is None else cache
    limit = _context_length(split.edge.parts) or capacity  # as Session.reserve caps it
    return fast, fast.new_cache(max(1, min(capacity, limit))) if capacity else fast.new_cache()


class _SplitSteps:
    """The split stage on the edge: edge half with its own cache, one frame per step, the reply."""

    def __init__(self, split, stream: _Stream, chunk: int, cfg: SamplingConfig, cache=None,
                 position: int = 0, step_id: int = 0, reopen: Callable | None = None,
                 cloud: RemoteCloud | None = None, live=None, capacity: int = 0):
        self.split, self.stream, self.chunk, self.cfg = split, stream, chunk, cfg
        # With `reopen` (a new admitted stream and its chunk size), a broken stream is rebuilt from
        # `history`: every hidden state [1, t, H] this edge has sent, in order.
        self.reopen, self.cloud = reopen, cloud
        self.history: list[torch.Tensor] = []
        # a token-predictive wire codes each step against its tokens: their ids, and the last one sent
        # (other wires ignore both: `encode_step`)
        self.id_history: list[torch.Tensor] = []
        self.prev_id: int | None = None
        self.edge, self.cache = _edge_and_cache(split, cache, capacity)
        self.position, self.step_id = position, step_id
        self.vocab = split.edge.parts.config.vocab_size  # the embedding may be a QuantEmbedding (no .weight)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # the edge samples only in top-k mode
        self.live = live  # serve.adaptive.LiveRun: Algorithm 2 per step, or None
        self.encode_s = 0.0
        self.exchange = None  # what the last exchange measured (with `live`)

    def send_hidden(self, hidden: torch.Tensor, q_bar: int | None = None, lead: tuple = (),
                    ids: torch.Tensor | None = None) -> int:
        """Hidden states [1, t, H] at the next t positions as one step; the cloud's next token.
        `lead`: (messages, bytes, replies) sent first in the same exchange (a handoff's payload);
        `ids` [1, t]: the tokens of those positions (what a token-predictive wire codes against)."""
        t = hidden.shape[1]
        if self.reopen is None:
            return self._exchange(hidden, self.position, self.step_id, q_bar, lead, ids)
        self.history.append(hidden)
        if ids is not None:
            self.id_history.append(ids)
        try:
            return self._exchange(hidden, self.position, self.step_id, q_bar, lead, ids)
        except RemoteError as exc:
            if exc.code not in RETRYABLE:
                raise
            return self._recover(exc, self.position + t)

    def _exchange(self, hidden: torch.Tensor, position: int, step_id: int, q_bar: int | None = None,
                  lead: tuple = (), ids: torch.Tensor | None = None) -> int:
        t = hidden.shape[1]
        live = self.live
        e0 = time.perf_counter()
        # a token-predictive wire codes against the step's ids (a replay from 0: no token before)
        prev_id = None if position == 0 else self.prev_id
        if live is not None:
            frame, field, prev_id = live.encode(hidden.reshape(t, -1), q_bar, ids, prev_id)
        else:
            (frame, prev_id), field = encode_step(self.split.wire, hidden.reshape(t, -1), ids, prev_id), 0
        self.encode_s = time.perf_counter() - e0
        messages = chunk_frame(frame, step_id, position, t, self.chunk, q_bar=field)
        lead_msgs, lead_bytes, lead_replies = lead or ((), 0, 0)
        s0 = time.perf_counter()
        if live is not None:
            live.shape(lead_bytes + len(frame))
        for msg in (*lead_msgs, *messages):
            self.stream.send(msg)
        cloud_us = 0
        for _ in range(lead_replies):  # a handoff's hidden states are answered: that token is known
            reply = self.stream.receive()
            if reply.WhichOneof("kind") != "token":
                raise SplitLLMError("the cloud answered the handoff with something else")
            cloud_us += reply.token.cloud_us
        reply = self.stream.receive()
        seconds = time.perf_counter() - s0
        token = _to_token(reply, step_id, self.cfg, self.vocab, self.generator)
        if live is not None:
            from splitcli.serve.adaptive import Exchange

            self.exchange = Exchange(lead_bytes + len(frame), seconds, (cloud_us + reply.token.cloud_us) / 1e6)
            live.measured(self.exchange)
        self.position, self.step_id, self.prev_id = position + t, step_id + 1, prev_id
        return token

    def _recover(self, first: RemoteError, length: int) -> int:
        """A new session on the cloud, its cache rebuilt by one prefill of all `length` positions'
        hidden states; that step's answer is the token the broken step was waiting for."""
        cloud, last = self.cloud, first
        for attempt in range(cloud.retries):
            time.sleep(min(cloud.backoff_max_s, cloud.backoff_s * 2 ** attempt))
            self.stream.close()
            try:
                self.stream, self.chunk = self.reopen()
                ids = torch.cat(self.id_history, dim=1) if self.id_history else None
                return self._exchange(torch.cat(self.history, dim=1), 0, 0, ids=ids)
            except RemoteError as exc:
                if exc.code not in RETRYABLE:
                    raise
                last = exc
        raise SplitLLMError(f"the cloud stream broke at position {length} and {cloud.retries} reconnects "
                            f"failed: {last.code.name}: {last.details}")

    def step(self, ids: torch.Tensor, stage: str = "split", decided=None, lead: tuple = (),
             kv_bytes: int = 0) -> int | None:
        """Token ids [1, t] through the edge half, then across; None when Algorithm 2 stops here.
        `decided`: (decision, rate) made already (a handoff's, whose payload goes as `lead`)."""
        t = ids.shape[1]
        live = self.live
        decision = rate = None
        q_bar, note = None, ""
        if live is not None and (self.position > 0 or decided is not None):
            decision, rate = decided or live.decide(live.per_step_bytes())
            if decision.step is Step.STOP:
                live.stop(stage, decision, rate)
                return None
            q_bar, note = live.q_bar_for(decision)
        c0 = time.perf_counter()
        hidden = self.edge(ids, torch.arange(self.position, self.position + t)[None], None, self.cache)
        edge_s = time.perf_counter() - c0
        token = self.send_hidden(hidden, q_bar, lead, ids=ids)
        if live is not None:
            compute_s = edge_s + self.encode_s
            if decision is None:  # the prefill: not decided (D bounds a token step, not the prompt)
                live.row("prefill", "prefill", "", live.base_q_bar, 0, None, None, compute_s, self.exchange, check=False)
                live.last_compute_s = compute_s / t
            else:
                live.row(stage, decision.step.value, decision.reason, q_bar, live.i_kv if stage == "handoff" else 0,
                         rate, decision.latency_s, compute_s, self.exchange, kv_bytes, note)
                live.last_compute_s = compute_s
        return token


def generate_remote(split, input_ids, cfg: SamplingConfig, cloud: RemoteCloud,
                    eos_token_ids: set[int] | None = None, top_k_logits: int = 0,
                    channel: grpc.Channel | None = None, live=None) -> Iterator[int]:
    """Yield up to cfg.max_new_tokens token ids for one prompt (ids [1, T] or a list), the edge
    half running here and the cloud half on `cloud`. Stops after an eos token, or where `live`
    (a `serve.adaptive.LiveRun`: Algorithm 2 on the measured link) says stop."""
    ids = _prompt_ids(input_ids)
    eos = set(eos_token_ids or ())
    own_channel = channel is None
    channel = channel or cloud.channel()
    steps = None
    if live is not None and live.i_kv:
        live.i_kv = 0
        live.note("I_kv = 0 on split steps: a networked split sends hidden states only (I_kv picks a handoff's payload)")

    def reopen():
        return _open_stream(split, cloud, channel, ids.shape[1] + cfg.max_new_tokens, cfg, top_k_logits, live=live)

    try:
        stream, chunk = reopen()
        steps = _SplitSteps(split, stream, chunk, cfg, reopen=reopen if cloud.retries else None, cloud=cloud,
                            live=live, capacity=ids.shape[1] + cfg.max_new_tokens)
        new = ids
        for i in range(cfg.max_new_tokens):
            if live is not None:
                live.step = i
            token = steps.step(new)
            if token is None:
                break
            yield token
            if token in eos:
                break
            new = torch.tensor([[token]], dtype=torch.long)
        steps.stream.send(pb.ClientMessage(close=pb.Close()))
    finally:
        if steps is not None:
            steps.stream.close()  # the latest stream: a reconnect replaces it
        if own_channel:
            channel.close()
