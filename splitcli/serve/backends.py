"""What the edge's HTTP API generates with: a prompt [1, T] and a SamplingConfig in, token ids out,
one at a time (so the API can stream). Two backends: the whole split in this process, and the
edge half here with the cloud half on a gRPC server. Both sample exactly as
`runtime.generate.generate` does, so greedy output is the same token for token."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from splitcli.errors import SplitLLMError
from splitcli.runtime.generate import SamplingConfig, TokenStream


class Backend(Protocol):
    """A generator of token ids. `context_length` (None: unbounded) bounds prompt + new tokens;
    `vocab_size` bounds the token ids a client may send as a prompt."""

    context_length: int | None
    vocab_size: int

    def generate(self, input_ids: torch.Tensor, cfg: SamplingConfig,
                 eos_token_ids: set[int] | None = None) -> Iterator[int]:
        """Yield up to cfg.max_new_tokens ids for the prompt [1, T]; the last one is an eos id
        when generation stopped on one. Closing the iterator early frees what it holds."""
        ...


def _config_of(split):
    return split.edge.parts.config


def _eos_of(config) -> tuple[int, ...]:
    eos = getattr(config, "eos_token_id", None)
    return tuple(t for t in (eos if isinstance(eos, (list, tuple)) else [eos]) if isinstance(t, int))


def _check_wire(split) -> None:
    # A codec wire that keeps per-frame stats grows by one record per frame for the server's
    # lifetime (and is shared by every request's session): a server must not build it that way.
    if getattr(split.wire, "keep_stats", False):
        raise SplitLLMError("a served split's codec wire must not keep per-frame stats: "
                            "build it with keep_stats=False")


def _check_prompt(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise SplitLLMError("a backend generates for one non-empty prompt: token ids [1, T]")
    return ids


class LocalBackend:
    """The whole split in this process: `split.session()` per request (its own caches), one
    `TokenStream` step per token, as `runtime.generate.generate` runs it."""

    def __init__(self, split):
        _check_wire(split)
        self.split = split
        config = _config_of(split)
        self.context_length = getattr(config, "max_position_embeddings", None)
        self.vocab_size = int(config.vocab_size)
        self.eos_token_ids = _eos_of(config)  # beside the tokenizer's, as `splitllm generate` stops

    def generate(self, input_ids, cfg: SamplingConfig, eos_token_ids: set[int] | None = None) -> Iterator[int]:
        ids = _check_prompt(input_ids)
        session = self.split.session()
        stream = TokenStream(cfg, 1, eos_token_ids)
        logits = session.prefill(ids)[:, -1]
        while True:
            nxt = stream.sample(logits)
            yield int(nxt[0])
            if stream.finished:
                return
            logits = session.forward(nxt[:, None])[:, -1]


class RemoteBackend:
    """The edge half here, the cloud half across gRPC (`serve.client.generate_remote`). One channel
    for all requests: gRPC multiplexes the sessions' streams over it and reconnects on its own.
    `live` (a `serve.adaptive.RemotePolicy`): Algorithm 2 decides every step of every request on
    the link that request measures (a stop ends its generation early)."""

    def __init__(self, split, cloud, live=None):
        from splitcli.serve.client import RemoteCloud

        if not isinstance(cloud, RemoteCloud):
            raise SplitLLMError(f"RemoteBackend needs a RemoteCloud, got {type(cloud).__name__}")
        _check_wire(split)
        self.split, self.cloud, self.live = split, cloud, live
        config = _config_of(split)
        self.context_length = getattr(config, "max_position_embeddings", None)
        self.vocab_size = int(config.vocab_size)
        self.eos_token_ids = _eos_of(config)  # beside the tokenizer's, as `splitllm generate` stops
        self._channel = cloud.channel()

    def generate(self, input_ids, cfg: SamplingConfig, eos_token_ids: set[int] | None = None) -> Iterator[int]:
        from splitcli.serve.adaptive import LiveRun
        from splitcli.serve.client import generate_remote

        live = LiveRun(self.live, self.split) if self.live is not None else None
        return generate_remote(self.split, _check_prompt(input_ids), cfg, self.cloud,
                               eos_token_ids=eos_token_ids, channel=self._channel, live=live)

    def close(self) -> None:
        self._channel.close()
