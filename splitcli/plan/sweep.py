"""W_bar sweep (Fig. 5(b) / Fig. 6 style): who generates which tokens, and what crosses the wire.

Reading of the paper's serving scheme (Fig. 5): a request generates `total_tokens` tokens. The
edge runs split inference for the first min(W_bar, total) of them (its KV memory was sized for
W_bar tokens by eq. 8c); every such step, and the prompt's prefill, sends hidden states over the
wire. After W_bar the edge hands the request to the cloud, which generates the remaining tokens
alone; the hand-over sends token ids only, counted as 0 bytes here. "Cloud-only" generates all
tokens in the cloud (Fig. 5(b)'s flat line). The baseline wire size is the same token count at
the uncompressed per-token size (Fig. 6's "Baseline").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from splitcli.errors import SplitLLMError


@dataclass(frozen=True)
class SweepPoint:
    w_bar: int
    edge_tokens: int
    cloud_tokens: int
    cloud_only_tokens: int
    wire_bytes: float
    baseline_wire_bytes: float


def sweep_max_tokens(
    w_bars: Iterable[int],
    total_tokens: int,
    wire_bytes_per_token: float,
    baseline_bytes_per_token: float,
    prompt_tokens: int = 0,
) -> tuple[SweepPoint, ...]:
    """One SweepPoint per W_bar, in the given order (see module docstring)."""
    if isinstance(total_tokens, bool) or not isinstance(total_tokens, int) or total_tokens < 0:
        raise SplitLLMError(f"total_tokens must be an integer >= 0, got {total_tokens!r}")
    if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or prompt_tokens < 0:
        raise SplitLLMError(f"prompt_tokens must be an integer >= 0, got {prompt_tokens!r}")
    for name, value in (("wire bytes per token", wire_bytes_per_token),
                        ("baseline bytes per token", baseline_bytes_per_token)):
        if not (math.isfinite(value) and value >= 0):
            raise SplitLLMError(f"{name} must be a finite number >= 0, got {value!r}")
    points = []
    for w_bar in w_bars:
        if isinstance(w_bar, bool) or not isinstance(w_bar, int) or w_bar < 0:
            raise SplitLLMError(f"W_bar values must be integers >= 0, got {w_bar!r}")
        edge = min(w_bar, total_tokens)
        sent = (prompt_tokens + edge) if edge > 0 else 0
        points.append(SweepPoint(
            w_bar=w_bar, edge_tokens=edge, cloud_tokens=total_tokens - edge,
            cloud_only_tokens=total_tokens, wire_bytes=sent * wire_bytes_per_token,
            baseline_wire_bytes=sent * baseline_bytes_per_token,
        ))
    return tuple(points)
