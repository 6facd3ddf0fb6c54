"""Continuous batching on the fast cloud half (`model.fast.FastCloudHalf`, a `StaticKV` per session).

The same contract as `serve.batching.forward_batch` for the eager half: a batch of one-token
decode steps runs as one forward over the sessions' caches stacked and left-padded to the
longest, with an attention mask hiding the padding and each row's own position id (real tokens
before it). The stacking differs: each session's K/V rows [0, n) are copied into row i of one
B-row static cache at positions [longest - n, longest) (the padding stays zero: finite, and masked
out), the forward writes every row's new position at `longest`, and only that one position is
copied back into each session's cache at its own position n. Earlier positions of a session's
cache are never written, and nothing of the batch (padding, other rows, its capacity) reaches
it: a session's cache never depends on who it was batched with.

Single steps and prefills do not come here: `batching.forward_one` runs them on the session's own
cache with no mask, as the in-process `FastSplitSession` does, so an unbatched session is
bit-identical to it. A batched step is not (the products run with M = B rows and attention over
the padded length): within float rounding of the same step alone (tests/test_serve_fast_cloud.py
states the bound).

A KV handoff (I_kv = 1) writes the edge's rows into a session's static cache through the cache's
own `write` (`runtime.kv_rows.install_static_rows`).
"""

from __future__ import annotations

import torch

from splitcli.errors import SplitLLMError
from splitcli.model.fast import FastCloudHalf
from splitcli.quant.static_kv import StaticCache


def is_fast(cloud) -> bool:
    return isinstance(cloud, FastCloudHalf)


def check_cache(cloud, cache) -> None:
    """A fast half runs on static caches only and an eager half on Hugging Face caches only: the
    two never meet in one forward."""
    if is_fast(cloud) != isinstance(cache, StaticCache):
        half, kind = ("fast", "a Hugging Face") if is_fast(cloud) else ("eager", "a static")
        raise SplitLLMError(f"the {half} cloud half was given {kind} cache")


@torch.inference_mode()
def forward_batch_fast(cloud: FastCloudHalf, states: list, hidden: list[torch.Tensor],
                       head_rows: torch.Tensor | None = None) -> list[torch.Tensor]:
    """One-token steps of several sessions (each with a non-empty one-row static cache) as one
    forward. Returns each session's logits [V]; each session's cache gains its own new position only.
    `head_rows`: the LM head as a contiguous [V, H] copy (`model.fast.row_major_head`), which runs
    several rows 2.5-3x faster than the batch-1 layout; None uses the half's own."""
    # Each cache is taken once: a session released mid-step (its state's cache set to None) still
    # gets its row written into the cache it had, and the other sessions of the batch go on.
    caches, lengths = [s.cache for s in states], [s.length for s in states]
    for c, n in zip(caches, lengths):
        check_cache(cloud, c)
        if c.rows != 1 or c.length != n or n < 1:
            raise SplitLLMError("batched decode needs one-row static caches holding the sessions' lengths")
    longest, b = max(lengths), len(states)
    batch = cloud.new_cache(longest + 1)
    batch.reserve(longest + 1, b)  # [layers, B, kv_heads, longest + 1, D] zeros: the padding stays finite
    for i, (c, n) in enumerate(zip(caches, lengths)):
        batch.copy_rows(i, longest - n, c, 0, 0, n)
    batch.length = longest
    mask = torch.zeros(b, longest + 1, dtype=torch.long)  # [B, past + 1], 1 = a real position
    for i, n in enumerate(lengths):
        mask[i, longest - n:] = 1
    positions = torch.tensor(lengths)[:, None]  # [B, 1]
    logits = cloud(torch.cat(hidden), positions, mask, batch, logits_to_keep=1, head_rows=head_rows)  # [B, 1, V]
    for i, (s, c, n) in enumerate(zip(states, caches, lengths)):
        c.reserve(n + 1)  # within the session's reservation; grows (doubling) only past it
        c.copy_rows(0, n, batch, i, longest, 1)
        c.length = n + 1
        s.length += 1
    return [logits[i, -1] for i in range(b)]
