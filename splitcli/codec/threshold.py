"""Threshold splitting (paper eq. 4): entries with |x| >= tau leave as an exact sparse CSR part."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from splitcli.errors import SplitLLMError


@dataclass(frozen=True)
class SparsePart:
    """T_above in CSR form. Row pointers are the prefix sums of `counts` (kept as per-row
    counts because that is what travels on the wire)."""

    counts: np.ndarray   # [tokens] uint16: outliers per token
    cols: np.ndarray     # [nnz] uint16: column of each outlier, ascending within a row
    rows: np.ndarray     # [nnz] intp: row of each outlier (not sent; derived from counts)

    @property
    def row_ptr(self) -> np.ndarray:
        """Classic CSR row pointers, [tokens + 1]."""
        return np.concatenate(([0], np.cumsum(self.counts, dtype=np.int64)))


def _abs_values(samples: torch.Tensor | np.ndarray | Iterable) -> np.ndarray:
    if isinstance(samples, (torch.Tensor, np.ndarray)):
        samples = [samples]
    parts = []
    for s in samples:
        a = s.detach().to("cpu", torch.float32).numpy() if isinstance(s, torch.Tensor) else np.asarray(s, np.float32)
        parts.append(np.abs(a.reshape(-1)))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def calibrate_tau(samples: torch.Tensor | np.ndarray | Iterable, quantile: float) -> float:
    """The `quantile` of |x| over all calibration samples, for storing as an absolute tau.

    E.g. quantile=0.999 keeps about the top 0.1% of entries by magnitude lossless.
    Empty samples give tau = inf (nothing to keep)."""
    if not 0.0 <= quantile <= 1.0:
        raise SplitLLMError(f"tau quantile must lie in [0, 1], got {quantile}")
    a = _abs_values(samples)
    if a.size == 0:
        return float("inf")
    if not np.isfinite(a).all():
        raise SplitLLMError("cannot calibrate tau: the samples contain NaN or Inf")
    # 'higher' picks an observed magnitude, so tau is reproducible bit for bit from data.
    return float(np.quantile(a, quantile, method="higher"))


def split_threshold(x: np.ndarray, tau: float) -> tuple[SparsePart, np.ndarray]:
    """Split x [tokens, hidden] into the sparse part (|x| >= tau) and T_below (outliers zeroed)."""
    mask = np.abs(x) >= tau                                  # [tokens, hidden]
    rows, cols = np.nonzero(mask)                           # row-major order = CSR order
    counts = np.bincount(rows, minlength=x.shape[0]).astype(np.uint16)
    below = np.where(mask, np.float32(0), x) if rows.size else x
    return SparsePart(counts=counts, cols=cols.astype(np.uint16), rows=rows), below

