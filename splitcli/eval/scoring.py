"""Batched log-likelihood of continuations given contexts (lm-evaluation-harness conventions).

For a request (context, continuation) with token ids c and x, the model input is
``(c + x)[-(max_length + 1):][:-1]`` (left truncation, as the harness does) and the score is
``sum_j log p(x_j | c, x_<j)`` over the continuation tokens; ``is_greedy`` says every x_j was
the argmax. Rows are sorted longest first (less padding, and an out-of-memory shows up in the
first batch, not the last). Requests share one model row when their input ids are identical
(e.g. BoolQ's one-token "no"/"yes" share the context row) or, within one group (one question),
when one input is a prefix of another: a causal model's logits at position t depend only on
tokens <= t, so the shorter request reads its logits off the longer row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from splitcli.errors import SplitLLMError
from splitcli.eval.protocols import LogitsFn, Tokenizer, encode


@dataclass(frozen=True)
class TokenRequest:
    context: tuple[int, ...]
    continuation: tuple[int, ...]
    group: int | None = None  # requests of one question; enables prefix sharing among them


@dataclass(frozen=True)
class LoglikResult:
    loglik: float  # sum of the continuation's token log-probs (natural log)
    is_greedy: bool
    n_tokens: int  # continuation tokens scored (fewer than given only if truncation ate some)


def prefix_token_id(tokenizer: Tokenizer) -> int:
    """The token an empty context becomes: BOS if the tokenizer has one, else EOS (harness HFLM)."""
    for tid in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    raise SplitLLMError("tokenizer has neither a BOS nor an EOS token; cannot score an empty context")


def encode_pair(
    tokenizer: Tokenizer, context: str, continuation: str, _cache: dict[str, list[int]] | None = None
) -> tuple[list[int], list[int]]:
    """Harness ``_encode_pair``: trailing spaces move from context to continuation; the
    continuation's ids are those of ``context + continuation`` past the context's own ids, so a
    token merged across the boundary is attributed as the tokenizer would see the whole text."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if context == "":
        return [prefix_token_id(tokenizer)], encode(tokenizer, continuation)
    whole = encode(tokenizer, context + continuation)
    if _cache is not None and context in _cache:
        ctx = _cache[context]
    else:
        ctx = encode(tokenizer, context)
        if _cache is not None:
            _cache[context] = ctx
    return ctx, whole[len(ctx):]


@dataclass(frozen=True)
class _Placement:
    row: int
    start: int  # logits index predicting the first scored continuation token
    targets: tuple[int, ...]


def _plan_rows(
    requests: Sequence[TokenRequest], max_length: int
) -> tuple[list[tuple[int, ...]], dict[int, _Placement]]:
    """Assign each request to a model row, longest rows first."""
    inputs: dict[int, tuple[int, ...]] = {}
    spans: dict[int, tuple[int, tuple[int, ...]]] = {}
    for i, r in enumerate(requests):
        if not r.continuation:
            continue
        full = (r.context + r.continuation)[-(max_length + 1):]
        n_cont = min(len(r.continuation), len(full) - 1)
        inp = full[:-1]
        inputs[i] = inp
        spans[i] = (len(inp) - n_cont, full[len(full) - n_cont:])
    rows: list[tuple[int, ...]] = []
    exact: dict[tuple[int, ...], int] = {}
    by_group: dict[int, list[int]] = {}
    placement: dict[int, _Placement] = {}
    for i in sorted(inputs, key=lambda k: -len(inputs[k])):
        inp, group = inputs[i], requests[i].group
        row = exact.get(inp)
        if row is None and group is not None:
            row = next((r for r in by_group.get(group, []) if rows[r][: len(inp)] == inp), None)
        if row is None:
            row = len(rows)
            rows.append(inp)
            exact[inp] = row
            if group is not None:
                by_group.setdefault(group, []).append(row)
        placement[i] = _Placement(row, *spans[i])
    return rows, placement


def _batches(rows: list[tuple[int, ...]], batch_size: int, max_batch_tokens: int | None) -> list[range]:
    """Consecutive row ranges; rows are sorted longest first, so a batch's width is its first row."""
    out, start = [], 0
    while start < len(rows):
        width = len(rows[start])
        n = batch_size
        if max_batch_tokens is not None:
            n = max(1, min(n, max_batch_tokens // max(width, 1)))
        out.append(range(start, min(start + n, len(rows))))
        start += n
    return out


def run_logits(logits_fn: LogitsFn, rows: Sequence[Sequence[int]], pad_token_id: int) -> torch.Tensor:
    """Right-pad ``rows`` into one batch and call the model; checks the returned shape."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, : len(r)] = 1
    with torch.inference_mode():
        logits = logits_fn(ids, mask)  # [B, T, V]
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or tuple(logits.shape[:2]) != (len(rows), width):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise SplitLLMError(f"logits_fn returned {shape}; expected logits of shape [{len(rows)}, {width}, vocab]")
    return logits


def score_token_requests(
    logits_fn: LogitsFn,
    requests: Sequence[TokenRequest],
    *,
    max_length: int,
    batch_size: int = 16,
    max_batch_tokens: int | None = 4096,
    pad_token_id: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[LoglikResult]:
    """Score tokenized requests; results come back in request order.

    ``max_batch_tokens`` caps rows x width per call (the returned logits are B*T*V floats).
    ``on_batch(rows_done, rows_total)`` is called after every model call.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows, placement = _plan_rows(requests, max_length)
    by_row: dict[int, list[int]] = {}
    for i, p in placement.items():
        by_row.setdefault(p.row, []).append(i)
    results: list[LoglikResult | None] = [
        None if i in placement else LoglikResult(0.0, True, 0) for i in range(len(requests))
    ]
    for batch in _batches(rows, batch_size, max_batch_tokens):
        logits = run_logits(logits_fn, [rows[r] for r in batch], pad_token_id)  # [B, T, V]
        for b, r in enumerate(batch):
            for i in by_row[r]:
                p = placement[i]
                logp = logits[b, p.start : p.start + len(p.targets)].float().log_softmax(-1)  # [n, V]
                target = torch.tensor(p.targets, dtype=torch.long)  # [n]
                loglik = float(logp.gather(-1, target[:, None]).sum())
                if math.isnan(loglik):
                    raise SplitLLMError("logits_fn produced NaN log-probabilities; the model output is broken")
                greedy = bool((logp.argmax(-1) == target).all())
                results[i] = LoglikResult(loglik, greedy, len(p.targets))
        if on_batch is not None:
            on_batch(batch.stop, len(rows))
    return [r for r in results if r is not None]


def score_requests(
    logits_fn: LogitsFn,
    tokenizer: Tokenizer,
    requests: Sequence[tuple[str, str]] | Sequence[tuple[str, str, int | None]],
    *,
    max_length: int,
    batch_size: int = 16,
    max_batch_tokens: int | None = 4096,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[LoglikResult]:
    """Score (context, continuation[, group]) string requests; see ``score_token_requests``."""
    cache: dict[str, list[int]] = {}
    token_requests = []
    for req in requests:
        context, continuation = req[0], req[1]
        group = req[2] if len(req) > 2 else None  # type: ignore[misc]
        ctx, cont = encode_pair(tokenizer, context, continuation, cache)
        token_requests.append(TokenRequest(tuple(ctx), tuple(cont), group))
    return score_token_requests(
        logits_fn,
        token_requests,
        max_length=max_length,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
        pad_token_id=pad_id(tokenizer),
        on_batch=on_batch,
    )


def pad_id(tokenizer: Tokenizer) -> int:
    """Any valid id works for right padding (never attended to); prefer the declared pad token."""
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None:
            return int(tid)
    return 0
