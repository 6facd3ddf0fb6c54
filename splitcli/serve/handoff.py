"""Fig. 5b over the network: the edge generates the first w tokens alone, then hands the session
over to a cloud server and generation goes on split (`generate_remote_handoff`). With `live`
(Algorithm 2) the handoff is decided on a probe of the link (`_probe`). The stream, the split
steps and recovery are serve/client.py's."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator

import grpc
import torch

from splitcli.errors import SplitLLMError
from splitcli.plan.early_exit import Step
from splitcli.runtime.generate import SamplingConfig
from splitcli.serve.client import RemoteCloud, _open_stream, _prompt_ids, _SplitSteps, _Stream, generate_remote
from splitcli.serve.proto import split_pb2 as pb
from splitcli.serve.protocol import chunk_frame


def _probe(stream: _Stream, live) -> None:
    """A Probe of the live run's probe size, timed: the link's first large sample (a handoff
    decides before any step has crossed)."""
    from splitcli.serve.adaptive import Exchange

    padding = bytes(live.settings.probe_bytes)
    t0 = time.perf_counter()
    live.shape(len(padding))
    stream.send(pb.ClientMessage(probe=pb.Probe(padding=padding)))
    reply = stream.receive()
    if reply.WhichOneof("kind") != "probe" or reply.probe.received != len(padding):
        raise SplitLLMError("the cloud answered a probe with something else")
    live.measured(Exchange(len(padding), time.perf_counter() - t0, 0.0))


def generate_remote_handoff(split, edge_model, input_ids, cfg: SamplingConfig, cloud: RemoteCloud, *,
                            local_tokens: int, i_kv: int = 0, eos_token_ids: set[int] | None = None,
                            channel: grpc.Channel | None = None, live=None) -> Iterator[int]:
    """Fig. 5b over the network: the edge's model of all layers (`edge_model`, e.g.
    `deploy.opsc_edge_model`) prefills and samples the first `local_tokens` tokens here, as
    `runtime.handoff.handoff_generate` does in process; then the session crosses to the cloud and
    generation goes on split. I_kv = 0: the hidden states at ℓ of every position so far cross as
    one step (the cloud re-processes them; its reply is dropped, the edge already sampled that
    token). I_kv = 1: the KV rows of layers [ℓ, L) cross as one KV step (installed, not answered).
    The cloud is contacted only at the handoff. Greedy output equals the in-process handoff; with
    temperature > 0 the cloud's sampler starts from the seed at the handoff, so sampled tokens
    after it differ from in process. With `live` (Algorithm 2), `i_kv` is the plan's: the handoff
    step is decided on a probe of the link (keep, compress, I_kv = 0 instead of the KV rows, or
    stop with the local tokens), and every split step after it like `generate_remote`'s."""
    from splitcli.model.split import decoder_parts, new_cache
    from splitcli.runtime.fast import fast_edge_half, fast_local_edge
    from splitcli.runtime.generate import TokenStream
    from splitcli.runtime.handoff import encode_kv
    from splitcli.runtime.kv_rows import KVPayload, cache_rows, install_rows

    if isinstance(local_tokens, bool) or not isinstance(local_tokens, int) or local_tokens < 0:
        raise SplitLLMError(f"local tokens w must be an integer >= 0, got {local_tokens!r}")
    if i_kv not in (0, 1):
        raise SplitLLMError(f"I_kv must be 0 or 1, got {i_kv!r}")
    if local_tokens == 0:
        yield from generate_remote(split, input_ids, cfg, cloud, eos_token_ids, channel=channel, live=live)
        return
    ids = _prompt_ids(input_ids)
    ell = split.spec.split_layer
    tokens = TokenStream(cfg, 1, eos_token_ids)
    # the local stage on the fast decode path where it runs the model (as in process), else eager
    fast_edge = fast_edge_half(split.edge)
    fast_local = fast_local_edge(split, edge_model) if fast_edge is not None else None
    local_cache = new_cache(decoder_parts(edge_model)) if fast_local is None else None
    hidden_at_l: list[torch.Tensor] = fast_local.hidden if fast_local is not None else []
    fed: list[torch.Tensor] = []  # the ids of every local forward: a token-predictive wire codes against them
    if fast_local is not None:  # the positions the session can reach, allocated once (as Session.reserve)
        limit = getattr(decoder_parts(edge_model).config, "max_position_embeddings", None)
        for c in fast_local.caches:
            c.reserve(min(ids.shape[1] + cfg.max_new_tokens, limit or ids.shape[1] + cfg.max_new_tokens))

    @torch.inference_mode()
    def local_forward(new: torch.Tensor, position: int) -> torch.Tensor:
        t0 = time.perf_counter()
        fed.append(new)
        positions = torch.arange(position, position + new.shape[1])[None]
        if fast_local is not None:  # keeps the hidden states at ℓ itself
            logits = fast_local(new, positions, None, logits_to_keep=1)
        else:
            out = edge_model(input_ids=new, position_ids=positions, cache=local_cache, use_cache=True,
                             logits_to_keep=1, output_hidden_states=True)
            hidden_at_l.append(out.hidden_states[ell])  # the input of layer ℓ: what the edge half would send
            logits = out.logits
        if live is not None:
            seconds = time.perf_counter() - t0
            live.row("local", "local", "the edge generates alone", None, i_kv, None, None, seconds, None,
                     check=live.step > 0)
            live.last_compute_s = seconds / new.shape[1]
        return logits[:, -1]

    if live is not None:
        live.i_kv, live.step = i_kv, 0
    logits, position = local_forward(ids, 0), ids.shape[1]
    while True:
        nxt = tokens.sample(logits)
        yield int(nxt[0])
        if tokens.finished:
            return
        if len(tokens.out) == local_tokens:
            break
        if live is not None:
            live.step = len(tokens.out)
        logits, position = local_forward(nxt[:, None], position), position + 1
    own_channel = channel is None
    channel = channel or cloud.channel()
    stream = steps = None

    def reopen():
        return _open_stream(split, cloud, channel, ids.shape[1] + cfg.max_new_tokens, cfg, 0, i_kv, live=live)

    try:
        stream, chunk = reopen()
        # The edge half's cache takes over layers [0, ℓ) of the local cache; layers >= ℓ are dropped.
        if fast_local is not None:
            edge_cache, count = fast_local.carry(fast_edge), fast_local.caches[0].length
            local_rows = fast_local.rows
        else:
            edge_cache = split.edge.new_cache()
            count, rows = cache_rows(local_cache, range(ell), 0)
            install_rows(edge_cache, KVPayload(0, count, tuple(rows)), rows[0].keys.dtype)
            local_rows = functools.partial(cache_rows, local_cache)
        kv_frame = b""  # the KV rows [ℓ, L) are read only for I_kv = 1
        if i_kv == 1:
            _, kv_rows = local_rows(range(ell, decoder_parts(edge_model).num_layers), 0)
            kv_frame = encode_kv(kv_rows, 0, count)
        use_kv, decided = i_kv, None
        if live is not None:
            live.step = len(tokens.out)
            if live.adaptive_server:
                _probe(stream, live)
            else:
                live.note("no probe (the cloud predates Probe): the handoff is decided on the Open round trip alone")
            decided = live.decide(live.handoff_bytes(len(kv_frame), count), dataclasses.replace(live.policy, i_kv=i_kv))
            if decided[0].step is Step.STOP:
                live.stop("handoff", *decided)
                stream.send(pb.ClientMessage(close=pb.Close()))
                return
            use_kv = live.i_kv = min(i_kv, decided[0].i_kv)
        # Recovery replays hidden states at ℓ: with I_kv = 0 they are the whole history. With I_kv = 1
        # the cloud's rows for the local tokens came from the edge's (OPSC) model; re-processing
        # their hidden states would not rebuild the same cache, so a break there is an error.
        recover = reopen if cloud.retries and use_kv == 0 else None
        steps = _SplitSteps(split, stream, chunk, cfg, cache=edge_cache, reopen=recover, cloud=cloud, live=live)
        steps.prev_id = int(fed[-1][0, -1])  # the split steps after a KV handoff code against it
        history, history_ids = torch.cat(hidden_at_l, dim=1), torch.cat(fed, dim=1)
        if use_kv == 1:
            lead = (chunk_frame(kv_frame, 0, 0, count, chunk, kind=pb.PAYLOAD_KV), len(kv_frame), 0)
            steps.position, steps.step_id = count, 1
        elif live is None:
            steps.send_hidden(history, ids=history_ids)  # the handoff: its token is already sampled
            lead = ()
        else:  # the history crosses in the handoff step's exchange, at the decided q̄; its reply is known
            q_bar, _ = live.q_bar_for(decided[0])
            frame, field, steps.prev_id = live.encode(history.reshape(count, -1), q_bar, history_ids)
            lead = (chunk_frame(frame, 0, 0, count, chunk, q_bar=field), len(frame), 1)
            steps.history.append(history)
            steps.id_history.append(history_ids)
            steps.position, steps.step_id = count, 1
        stage, kv_bytes = "handoff", len(kv_frame) if use_kv else 0
        while True:
            if live is not None:
                live.step = len(tokens.out)
            token = steps.step(nxt[:, None], stage=stage, decided=decided, lead=lead, kv_bytes=kv_bytes)
            if token is None:
                break
            stage, decided, lead, kv_bytes = "split", None, (), 0
            if live is not None:
                live.i_kv = 0  # split steps after the handoff carry hidden states only
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
