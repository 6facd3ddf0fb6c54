"""The edge side of the protocol: run the edge half here, stream its frames to a cloud server.

`generate_remote` is `runtime.generate.generate` for one prompt with the cloud across a gRPC
stream: the edge embeds and runs layers [0, ℓ) with its own cache, encodes each step with the
split's wire, and the cloud answers with the next token (it samples: greedy, or temperature /
top-p with the request's seed, the same sampler as in-process) or with its top-k logits (the edge
samples). Prefill frames larger than a message are chunked. Errors come back as `RemoteError`
carrying the gRPC status.

Not here yet (issue 13): reconnect and rebuild after a broken stream, handoff, TLS.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
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

    def __post_init__(self) -> None:
        if not self.target:
            raise SplitLLMError("the cloud address is empty: give HOST:PORT")
        if not self.model_sha256:
            raise SplitLLMError("the edge needs the model's sha256 to open a cloud session")
        if self.max_message_bytes <= CHUNK_HEADROOM:
            raise SplitLLMError(f"max_message_bytes must exceed {CHUNK_HEADROOM}, got {self.max_message_bytes}")
        if not self.timeout_s > 0:
            raise SplitLLMError(f"timeout_s must be > 0, got {self.timeout_s!r}")

    def channel(self) -> grpc.Channel:
        limit = self.max_message_bytes
        return grpc.insecure_channel(self.target, options=[("grpc.max_send_message_length", limit),
                                                           ("grpc.max_receive_message_length", limit)])


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
    if tok.WhichOneof("result") == "token_id":
        return tok.token_id
    ids = torch.tensor(list(tok.top_k.token_ids), dtype=torch.long)
    if ids.numel() == 0 or int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise SplitLLMError("the cloud sent top-k logits with invalid token ids")
    logits = torch.full((1, vocab), float("-inf"))
    logits[0, ids] = torch.tensor(list(tok.top_k.logits), dtype=torch.float32)
    return int(sample_next(logits, cfg, generator)[0])


def generate_remote(split, input_ids, cfg: SamplingConfig, cloud: RemoteCloud,
                    eos_token_ids: set[int] | None = None, top_k_logits: int = 0,
                    channel: grpc.Channel | None = None) -> Iterator[int]:
    """Yield up to cfg.max_new_tokens token ids for one prompt (ids [1, T] or a list), the edge
    half running here and the cloud half on `cloud`. Stops after an eos token."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise SplitLLMError("generate_remote takes one non-empty prompt: token ids [1, T]")
    eos = set(eos_token_ids or ())
    edge, wire = split.edge, split.wire
    vocab = edge.parts.config.vocab_size  # the embedding may be a QuantEmbedding (no .weight)
    generator = torch.Generator().manual_seed(cfg.seed)  # the edge samples only in top-k mode
    own_channel = channel is None
    channel = channel or cloud.channel()
    stream = _Stream(cloud, channel)
    try:
        stream.send(open_message(split, cloud, ids.shape[1] + cfg.max_new_tokens, cfg, top_k_logits))
        opened = stream.receive()
        if opened.WhichOneof("kind") != "opened" or not opened.opened.admitted:
            stream.receive()  # a refusal is followed by the status that says why: raises RemoteError
            raise SplitLLMError(f"the cloud did not admit the session: {opened.opened.reason or 'no reason given'}")
        chunk = min(cloud.max_message_bytes, opened.opened.max_message_bytes or cloud.max_message_bytes)
        chunk -= CHUNK_HEADROOM
        cache = edge.new_cache()
        position, step_id, new = 0, 0, ids
        for _ in range(cfg.max_new_tokens):
            t = new.shape[1]
            hidden = edge(new, torch.arange(position, position + t)[None], None, cache)  # [1, t, H]
            frame = wire.encode(hidden.reshape(t, -1))
            for msg in chunk_frame(frame, step_id, position, t, chunk):
                stream.send(msg)
            token = _to_token(stream.receive(), step_id, cfg, vocab, generator)
            yield token
            if token in eos:
                break
            position, step_id = position + t, step_id + 1
            new = torch.tensor([[token]], dtype=torch.long)
        stream.send(pb.ClientMessage(close=pb.Close()))
    finally:
        stream.close()
        if own_channel:
            channel.close()
