"""Per-example decisions and their aggregation (lm-evaluation-harness definitions)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def mc_correct(logliks: Sequence[float], choice_texts: Sequence[str], gold: int) -> tuple[bool, bool]:
    """(acc, acc_norm) for one question.

    acc picks argmax of the summed log-likelihood; acc_norm divides each by the choice's length in
    characters (the choice text without the target delimiter). Ties go to the first choice
    (``np.argmax``), as in the harness. A zero-length choice divides by 1 rather than 0.
    """
    ll = np.asarray(logliks, dtype=np.float64)  # [choices]
    lengths = np.array([max(len(c), 1) for c in choice_texts], dtype=np.float64)  # [choices]
    return int(np.argmax(ll)) == gold, int(np.argmax(ll / lengths)) == gold


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def mean_stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean with the sample (n - 1) deviation, as the harness reports it.

    For 0/1 accuracies this is sqrt(p (1 - p) / (n - 1)). None when n < 2 (undefined).
    """
    n = len(values)
    if n < 2:
        return None
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1) / math.sqrt(n))


def ppl_from_nll(total_nll: float, tokens: int) -> float:
    """exp(total / tokens), inf instead of an overflow error for a hopeless model."""
    if tokens <= 0:
        return float("nan")
    rate = total_nll / tokens
    return math.exp(rate) if rate < 709.0 else float("inf")
