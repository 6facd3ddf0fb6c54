"""Unsplit vs split decode speed on the same prompt and the same tokens.

Both sessions are teacher-forced with one greedy continuation (computed once, unsplit), so they
do identical work. Repeats run in adjacent pairs whose order alternates (u,s then s,u) so drifting
machine load hits both alike; we report the median tok/s of each, overhead = 1 - split/unsplit from
those medians, and the median of the per-pair ratios (steadier when the load drifts).
"""

from __future__ import annotations

import statistics
import time

import torch

from ..deploy import SplitSpec, build_split
from ..runtime.generate import SamplingConfig, encode_prompts, generate
from ..runtime.session import Session, UnsplitSession

DEFAULT_PROMPT = "The history of the city begins with a small settlement on the river, where"


def _timed_decode(session: Session, prompt_ids: torch.Tensor, tokens: torch.Tensor) -> float:
    """Prefill (untimed), then feed `tokens` one at a time; returns decode tokens per second."""
    session.prefill(prompt_ids)
    t0 = time.perf_counter()
    for i in range(tokens.shape[1]):
        session.forward(tokens[:, i : i + 1])
    return tokens.shape[1] / (time.perf_counter() - t0)


def bench_decode(lm, split_layer: int, n_tokens: int = 64, repeats: int = 5, prompt: str = DEFAULT_PROMPT,
                 wire_factory=None, progress=None) -> dict:
    ids, _ = encode_prompts(lm.tokenizer, [prompt])
    ref = generate(UnsplitSession(lm.model), ids, None, SamplingConfig(max_new_tokens=n_tokens))
    tokens = ref.tokens  # [1, n] — eos is not special here: we time a fixed token sequence
    the_split = build_split(lm, SplitSpec(split_layer=split_layer))  # compression off
    _timed_decode(UnsplitSession(lm.model), ids, tokens[:, :4])  # warm-up both paths
    _timed_decode(the_split.session(), ids, tokens[:, :4])
    unsplit, split = [], []
    for r in range(repeats):
        wire = wire_factory() if wire_factory else None
        run_u = lambda: unsplit.append(_timed_decode(UnsplitSession(lm.model), ids, tokens))  # noqa: E731
        run_s = lambda: split.append(_timed_decode(the_split.session(wire), ids, tokens))  # noqa: E731
        for run in ((run_u, run_s) if r % 2 == 0 else (run_s, run_u)):
            run()
        if progress:
            progress(r + 1, repeats)
    u, s = statistics.median(unsplit), statistics.median(split)
    return {
        "model": lm.model_id,
        "split_layer": split_layer,
        "tokens": int(tokens.shape[1]),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "unsplit_tok_s": u,
        "split_tok_s": s,
        "overhead": 1 - s / u,
        "overhead_paired_median": 1 - statistics.median(b / a for a, b in zip(unsplit, split)),
        "unsplit_tok_s_runs": unsplit,
        "split_tok_s_runs": split,
    }
