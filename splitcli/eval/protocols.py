"""The interfaces the evaluation library consumes; anything matching them can be scored.

``LogitsFn`` is how every model reaches the evaluator: the unsplit model, the split edge/cloud
pipeline and quantized baselines are all the same callable to it, e.g.
``lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits``.

Padding convention: batches are RIGHT padded (real tokens first, then ``pad`` tokens with
``attention_mask == 0``), and position ids are implicitly 0..T-1. Only logits at real positions
are read. Because padding comes after every real token, a causal model's logits at real positions
cannot depend on the padding, so a LogitsFn that ignores the mask is still scored correctly. A
pipeline that needs left padding must adapt inside its own LogitsFn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class LogitsFn(Protocol):
    """``(input_ids [B, T] long, attention_mask [B, T] long) -> logits [B, T, V] float``."""

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the evaluator uses.

    ``tokenizer(text, add_special_tokens=False)["input_ids"]`` must return a flat list of ints.
    ``bos_token_id`` / ``eos_token_id`` may be None; one of them is needed only to score a
    continuation with an empty context (the harness prefixes such requests with one token).
    """

    bos_token_id: int | None
    eos_token_id: int | None

    def __call__(self, text: str, add_special_tokens: bool = ...) -> Mapping[str, Any]: ...


class ProgressFn(Protocol):
    """Called as work completes: ``progress(task, done, total)``.

    Units are examples for multiple-choice / cloze tasks and windows for perplexity. ``done`` is
    monotone (repeats are possible) and ends at ``total``; examples restored from the result cache
    count as done, and examples of the chunk being scored are credited as its model calls finish.
    """

    def __call__(self, task: str, done: int, total: int) -> None: ...


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Tokenize without special tokens (the harness convention for HF causal LMs)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if ids and isinstance(ids[0], Sequence):  # a batched tokenizer call on a single string
        raise TypeError("tokenizer returned a batch for a single string")
    return [int(i) for i in ids]


def hf_logits_fn(model: Any) -> LogitsFn:
    """The LogitsFn of a Hugging Face causal LM (anything returning ``.logits``)."""

    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V]

    return fn
