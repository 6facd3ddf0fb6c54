"""Windowed perplexity, GPTQ / Atom convention.

The whole text is tokenized once (no special tokens added), cut into non-overlapping windows of
``seqlen`` tokens (the remainder is dropped), and each window is scored on its own: the shifted
cross-entropy of tokens 1..seqlen-1 given their prefix in the window. ppl = exp(total / tokens)
with ``tokens = windows * (seqlen - 1)``, the number of predicted tokens. GPTQ writes this as
exp(sum(mean_loss * seqlen) / (windows * seqlen)); since every window predicts the same number of
tokens the two are equal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from splitcli.errors import SplitLLMError
from splitcli.eval.metrics import ppl_from_nll
from splitcli.eval.protocols import LogitsFn
from splitcli.eval.scoring import run_logits


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # summed natural-log cross-entropy over all scored tokens
    tokens: int  # predicted tokens: windows * (seqlen - 1)
    windows: int
    seqlen: int
    text_tokens: int  # tokens in the whole text (before windowing)


def n_windows_available(n_tokens: int, seqlen: int) -> int:
    return n_tokens // seqlen


def window_nll(logits_fn: LogitsFn, windows: torch.Tensor) -> list[float]:
    """Summed shifted cross-entropy per window. ``windows``: [W, seqlen] token ids."""
    logits = run_logits(logits_fn, windows.tolist(), pad_token_id=0)  # [W, seqlen, V]
    logp = logits[:, :-1].float().log_softmax(-1)  # [W, seqlen-1, V]
    nll = -logp.gather(-1, windows[:, 1:, None]).squeeze(-1).sum(-1)  # [W]
    out = [float(x) for x in nll]
    if any(x != x for x in out):
        raise SplitLLMError("logits_fn produced NaN log-probabilities; the model output is broken")
    return out


def perplexity(
    logits_fn: LogitsFn,
    token_ids: Sequence[int] | torch.Tensor,
    *,
    seqlen: int,
    n_windows: int | None = None,
    batch_size: int = 1,
    done_nll: Sequence[float] = (),
    on_window: Callable[[int, float], None] | None = None,
) -> PerplexityResult:
    """Perplexity of the first ``n_windows`` windows (all when None).

    ``done_nll`` are per-window results of an interrupted run (windows 0..k-1), reused as is;
    ``on_window(index, nll)`` fires for each newly scored window (the cache appends there).
    """
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    if n_windows is not None and n_windows < 1:
        raise ValueError(f"n_windows must be >= 1, got {n_windows}")
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()  # [N]
    available = n_windows_available(ids.numel(), seqlen)
    if available == 0:
        raise SplitLLMError(f"text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    windows = available if n_windows is None else min(n_windows, available)
    nlls = list(done_nll)[:windows]
    while len(nlls) < windows:
        start = len(nlls)
        stop = min(start + batch_size, windows)
        chunk = ids[start * seqlen : stop * seqlen].view(stop - start, seqlen)  # [W, seqlen]
        for k, value in enumerate(window_nll(logits_fn, chunk)):
            nlls.append(value)
            if on_window is not None:
                on_window(start + k, value)
    total = float(sum(nlls))
    tokens = windows * (seqlen - 1)
    return PerplexityResult(ppl_from_nll(total, tokens), total, tokens, windows, seqlen, int(ids.numel()))
