"""Lossless coding of TAB-Q symbols: rANS (constriction) with a per-width model, or bit packing.

Tokens are grouped by their TAB-Q width; every group has its own categorical model, sent in the
frame as the symbol range [lo, hi] plus counts normalized to `COUNT_TOTAL` (uint16 each), which
is all the decoder needs to rebuild exactly the same model. A group whose symbols are all equal
(lo == hi) costs no body bits at all. Groups are coded back to back on one rANS stack, in
ascending width order as decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import constriction
import numpy as np

#: Counts of each group model are normalized to this total (14 bits: model error < 0.1% of rate).
COUNT_TOTAL = 1 << 14

_Categorical = constriction.stream.model.Categorical
_AnsCoder = constriction.stream.stack.AnsCoder


@dataclass(frozen=True)
class GroupModel:
    """Symbol model of the tokens that share one width."""

    width: int
    lo: int
    counts: np.ndarray   # [hi - lo + 1] uint16, normalized to about COUNT_TOTAL

    @property
    def hi(self) -> int:
        return self.lo + len(self.counts) - 1

    def categorical(self):
        return _Categorical(self.counts.astype(np.float64), perfect=False)


def group_tokens(widths: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(width, token indices) for every width present, ascending: the wire's group order."""
    return [(int(w), np.flatnonzero(widths == w)) for w in np.unique(widths)]


def fit_group_model(width: int, symbols: np.ndarray) -> tuple[GroupModel, float]:
    """Quantized model of one group's symbols, and their empirical entropy in bits (total)."""
    hist = np.bincount(symbols.reshape(-1), minlength=1 << width)
    present = np.flatnonzero(hist)
    if present.size == 0:
        return GroupModel(width, 0, np.ones(1, np.uint16)), 0.0
    lo, hi = int(present[0]), int(present[-1])
    h = hist[lo:hi + 1].astype(np.float64)
    n = h.sum()
    p = h[h > 0] / n
    entropy_bits = float(-(p * np.log2(p)).sum() * n)
    # Every present symbol keeps a count >= 1 so it stays encodable after normalization.
    counts = np.where(h > 0, np.maximum(np.rint(h * (COUNT_TOTAL / n)), 1), 0).astype(np.uint16)
    return GroupModel(width, lo, counts), entropy_bits


def rans_encode(groups: list[tuple[GroupModel, np.ndarray]]) -> np.ndarray:
    """Code every group's symbols onto one rANS stack; returns uint32 words."""
    coder = _AnsCoder()
    for model, symbols in reversed(groups):   # a stack: the last group pushed is read first
        if len(model.counts) > 1:
            coder.encode_reverse(symbols.reshape(-1).astype(np.int32) - model.lo, model.categorical())
    return coder.get_compressed()


def rans_decode(words: np.ndarray, groups: list[tuple[GroupModel, int]]) -> list[np.ndarray]:
    """Inverse of `rans_encode` for (model, symbol count) per group. Raises ValueError when the
    words are not a valid stream or are not consumed exactly."""
    coder = _AnsCoder(words) if words.size else None
    out = []
    for model, n in groups:
        if len(model.counts) == 1:
            out.append(np.full(n, model.lo, np.uint8))
            continue
        if coder is None:
            raise ValueError("rANS body is empty but a group needs coded symbols")
        out.append((coder.decode(model.categorical(), n) + model.lo).astype(np.uint8))
    if coder is not None and not coder.is_empty():
        raise ValueError("rANS body has words left over after the last symbol")
    return out


def pack_bits(symbols: np.ndarray, width: int) -> bytes:
    """Fixed-width little-endian bit packing of symbols < 2^width, padded to a whole byte."""
    flat = symbols.reshape(-1)
    bits = (flat[:, None] >> np.arange(width, dtype=np.uint8)) & 1       # [n, width]
    return np.packbits(bits, axis=None, bitorder="little").tobytes()


def packed_size(n: int, width: int) -> int:
    return (n * width + 7) // 8


def unpack_bits(data: bytes | memoryview, n: int, width: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(data, np.uint8), count=n * width, bitorder="little")
    weights = (1 << np.arange(width, dtype=np.uint16)).astype(np.uint16)
    return (bits.reshape(n, width).astype(np.uint16) @ weights).astype(np.uint8)
