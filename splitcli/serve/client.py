"""The edge side of the protocol: run the edge half here, stream its frames to a cloud server.

`generate_remote` is `runtime.generate.generate` for one prompt with the cloud across a gRPC
stream: the edge embeds and runs layers [0, ℓ) with its own cache, encodes each step with the
split's wire, and the cloud answers with the next token (it samples: greedy, or temperature /
top-p with the request's seed, the same sampler as in-process) or with its top-k logits (the edge
samples). Prefill frames larger than a message are chunked. Errors come back as `RemoteError`
carrying the gRPC status. `generate_remote_handoff` is Fig. 5b: the edge generates the first w
tokens alone, then hands the session over (I_kv = 0: hidden states at ℓ; 1: KV rows of [ℓ, L)).

Recovery: when the stream breaks mid-generation (the cloud restarted, the connection dropped),
`generate_remote` reconnects with bounded exponential backoff (`RemoteCloud.retries`) and rebuilds
the cloud's state on a new session from the edge's own history: the hidden states at ℓ of every
position so far, sent as one prefill step whose answer is the token the broken step was waiting
for. Greedy output is identical to an uninterrupted run; with temperature > 0 and the cloud
sampling, the cloud's sampler restarts from the seed, so sampled tokens after a reconnect differ
(top-k mode, where the edge samples, is unaffected). TLS: `RemoteCloud.root_certificates`.

`generate_remote_handoff` recovers the same way after an I_kv = 0 handoff (its history starts
with the hidden states of the local tokens); after an I_kv = 1 handoff a break is an error.

Not here yet (issue 13): Algorithm 2 on the measured link, batches of prompts.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import torch

from splitcli.errors import SplitLLMError
from splitcli.runtime.generate import SamplingConfig, sample_next
from splitcli.serve.proto import split_pb2 as pb
from splitcli.serve.proto import split_pb2_grpc as pb_grpc
from splitcli.serve.protocol import CHUNK_HEADROOM, IKV_TO_PB, PROTOCOL_VERSION, WIRE_TO_PB, chunk_frame, codec_to_pb

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
    """The Open that describes `split` (ℓ, wire, codec settings) to the cloud."""
    spec = split.spec
    msg = pb.Open(model_sha256=cloud.model_sha256, split_layer=spec.split_layer, wire=WIRE_TO_PB[spec.wire],
                  max_tokens=max_tokens, kv_mode=IKV_TO_PB[i_kv], protocol_version=PROTOCOL_VERSION,
                  sampling=pb.Sampling(temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                                       top_k_logits=top_k_logits))
    if spec.wire == "tabq":
        msg.codec.CopyFrom(codec_to_pb(spec.codec))
    return pb.ClientMessage(open=msg)


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
    logits = torch.full((1, vocab), float("-inf"))
    logits[0, ids] = torch.tensor(list(tok.top_k.logits), dtype=torch.float32)
    return int(sample_next(logits, cfg, generator)[0])


def _open_stream(split, cloud: RemoteCloud, channel, max_tokens: int, cfg: SamplingConfig, top_k_logits: int,
                 i_kv: int = 0):
    """A started, admitted stream and the payload bytes one chunk may carry."""
    stream = _Stream(cloud, channel)
    try:
        stream.send(open_message(split, cloud, max_tokens, cfg, top_k_logits, i_kv))
        opened = stream.receive()
        if opened.WhichOneof("kind") != "opened" or not opened.opened.admitted:
            stream.receive()  # a refusal is followed by the status that says why: raises RemoteError
            raise SplitLLMError(f"the cloud did not admit the session: {opened.opened.reason or 'no reason given'}")
    except BaseException:
        stream.close()  # ends the request iterator too, so no thread waits on it
        raise
    chunk = min(cloud.max_message_bytes, opened.opened.max_message_bytes or cloud.max_message_bytes)
    return stream, chunk - CHUNK_HEADROOM


def _prompt_ids(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise SplitLLMError("remote generation takes one non-empty prompt: token ids [1, T]")
    return ids


class _SplitSteps:
    """The split stage on the edge: edge half with its own cache, one frame per step, the reply."""

    def __init__(self, split, stream: _Stream, chunk: int, cfg: SamplingConfig, cache=None,
                 position: int = 0, step_id: int = 0, reopen: Callable | None = None,
                 cloud: RemoteCloud | None = None):
        self.split, self.stream, self.chunk, self.cfg = split, stream, chunk, cfg
        # With `reopen` (a new admitted stream and its chunk size), a broken stream is rebuilt from
        # `history`: every hidden state [1, t, H] this edge has sent, in order.
        self.reopen, self.cloud = reopen, cloud
        self.history: list[torch.Tensor] = []
        self.cache = split.edge.new_cache() if cache is None else cache
        self.position, self.step_id = position, step_id
        self.vocab = split.edge.parts.config.vocab_size  # the embedding may be a QuantEmbedding (no .weight)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # the edge samples only in top-k mode

    def send_hidden(self, hidden: torch.Tensor) -> int:
        """Hidden states [1, t, H] at the next t positions as one step; the cloud's next token."""
        t = hidden.shape[1]
        if self.reopen is None:
            return self._exchange(hidden, self.position, self.step_id)
        self.history.append(hidden)
        try:
            return self._exchange(hidden, self.position, self.step_id)
        except RemoteError as exc:
            if exc.code not in RETRYABLE:
                raise
            return self._recover(exc, self.position + t)

    def _exchange(self, hidden: torch.Tensor, position: int, step_id: int) -> int:
        t = hidden.shape[1]
        frame = self.split.wire.encode(hidden.reshape(t, -1))
        for msg in chunk_frame(frame, step_id, position, t, self.chunk):
            self.stream.send(msg)
        token = _to_token(self.stream.receive(), step_id, self.cfg, self.vocab, self.generator)
        self.position, self.step_id = position + t, step_id + 1
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
                return self._exchange(torch.cat(self.history, dim=1), 0, 0)
            except RemoteError as exc:
                if exc.code not in RETRYABLE:
                    raise
                last = exc
        raise SplitLLMError(f"the cloud stream broke at position {length} and {cloud.retries} reconnects "
                            f"failed: {last.code.name}: {last.details}")

    def step(self, ids: torch.Tensor) -> int:
        """Token ids [1, t] through the edge half, then across."""
        t = ids.shape[1]
        hidden = self.split.edge(ids, torch.arange(self.position, self.position + t)[None], None, self.cache)
        return self.send_hidden(hidden)


def generate_remote(split, input_ids, cfg: SamplingConfig, cloud: RemoteCloud,
                    eos_token_ids: set[int] | None = None, top_k_logits: int = 0,
                    channel: grpc.Channel | None = None) -> Iterator[int]:
    """Yield up to cfg.max_new_tokens token ids for one prompt (ids [1, T] or a list), the edge
    half running here and the cloud half on `cloud`. Stops after an eos token."""
    ids = _prompt_ids(input_ids)
    eos = set(eos_token_ids or ())
    own_channel = channel is None
    channel = channel or cloud.channel()
    steps = None

    def reopen():
        return _open_stream(split, cloud, channel, ids.shape[1] + cfg.max_new_tokens, cfg, top_k_logits)

    try:
        stream, chunk = reopen()
        steps = _SplitSteps(split, stream, chunk, cfg, reopen=reopen if cloud.retries else None, cloud=cloud)
        new = ids
        for _ in range(cfg.max_new_tokens):
            token = steps.step(new)
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


def generate_remote_handoff(split, edge_model, input_ids, cfg: SamplingConfig, cloud: RemoteCloud, *,
                            local_tokens: int, i_kv: int = 0, eos_token_ids: set[int] | None = None,
                            channel: grpc.Channel | None = None) -> Iterator[int]:
    """Fig. 5b over the network: the edge's model of all layers (`edge_model`, e.g.
    `deploy.opsc_edge_model`) prefills and samples the first `local_tokens` tokens here, as
    `runtime.handoff.handoff_generate` does in process; then the session crosses to the cloud and
    generation goes on split. I_kv = 0: the hidden states at ℓ of every position so far cross as
    one step (the cloud re-processes them; its reply is dropped, the edge already sampled that
    token). I_kv = 1: the KV rows of layers [ℓ, L) cross as one KV step (installed, not answered).
    The cloud is contacted only at the handoff. Greedy output equals the in-process handoff; with
    temperature > 0 the cloud's sampler starts from the seed at the handoff, so sampled tokens
    after it differ from in process."""
    from splitcli.model.split import decoder_parts, new_cache
    from splitcli.runtime.generate import TokenStream
    from splitcli.runtime.handoff import KVPayload, cache_rows, encode_kv, install_rows

    if isinstance(local_tokens, bool) or not isinstance(local_tokens, int) or local_tokens < 0:
        raise SplitLLMError(f"local tokens w must be an integer >= 0, got {local_tokens!r}")
    if i_kv not in (0, 1):
        raise SplitLLMError(f"I_kv must be 0 or 1, got {i_kv!r}")
    if local_tokens == 0:
        yield from generate_remote(split, input_ids, cfg, cloud, eos_token_ids, channel=channel)
        return
    ids = _prompt_ids(input_ids)
    ell = split.spec.split_layer
    tokens = TokenStream(cfg, 1, eos_token_ids)
    local_cache = new_cache(decoder_parts(edge_model))
    hidden_at_l: list[torch.Tensor] = []

    @torch.inference_mode()
    def local_forward(new: torch.Tensor, position: int) -> torch.Tensor:
        out = edge_model(input_ids=new, position_ids=torch.arange(position, position + new.shape[1])[None],
                         cache=local_cache, use_cache=True, logits_to_keep=1, output_hidden_states=True)
        hidden_at_l.append(out.hidden_states[ell])  # the input of layer ℓ: what the edge half would send
        return out.logits[:, -1]

    logits, position = local_forward(ids, 0), ids.shape[1]
    while True:
        nxt = tokens.sample(logits)
        yield int(nxt[0])
        if tokens.finished:
            return
        if len(tokens.out) == local_tokens:
            break
        logits, position = local_forward(nxt[:, None], position), position + 1
    own_channel = channel is None
    channel = channel or cloud.channel()
    stream = steps = None

    def reopen():
        return _open_stream(split, cloud, channel, ids.shape[1] + cfg.max_new_tokens, cfg, 0, i_kv)

    try:
        stream, chunk = reopen()
        # The edge half's cache takes over layers [0, ℓ) of the local cache; layers >= ℓ are dropped.
        edge_cache = split.edge.new_cache()
        length, rows = cache_rows(local_cache, range(ell), 0)
        install_rows(edge_cache, KVPayload(0, length, tuple(rows)), rows[0].keys.dtype)
        # Recovery replays hidden states at ℓ: with I_kv = 0 they are the whole history. With I_kv = 1
        # the cloud's rows for the local tokens came from the edge's (OPSC) model; re-processing
        # their hidden states would not rebuild the same cache, so a break there is an error.
        recover = reopen if cloud.retries and i_kv == 0 else None
        steps = _SplitSteps(split, stream, chunk, cfg, cache=edge_cache, reopen=recover, cloud=cloud)
        if i_kv == 1:
            n_layers = decoder_parts(edge_model).num_layers
            count, kv_rows = cache_rows(local_cache, range(ell, n_layers), 0)
            for msg in chunk_frame(encode_kv(kv_rows, 0, count), 0, 0, count, chunk, kind=pb.PAYLOAD_KV):
                stream.send(msg)
            steps.position, steps.step_id = count, 1
        else:
            steps.send_hidden(torch.cat(hidden_at_l, dim=1))  # the handoff: its token is already sampled
        while True:
            token = steps.step(nxt[:, None])
            nxt = torch.tensor([token])
            yield token
            tokens.out.append(nxt)
            if token in tokens.eos or len(tokens.out) >= cfg.max_new_tokens:
                break
        steps.stream.send(pb.ClientMessage(close=pb.Close()))
    finally:
        latest = steps.stream if steps is not None else stream  # a reconnect replaces the stream
        if latest is not None:
            latest.close()
        if own_channel:
            channel.close()
