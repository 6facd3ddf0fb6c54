"""Lossless coding of TAB-Q symbols: rANS (constriction) with per-group models, or bit packing.

Tokens are grouped by their TAB-Q width and, when the config carries channel classes, further
split by channel class; every group has its own categorical model, sent in the frame as the
symbol range [lo, hi] plus counts normalized to `COUNT_TOTAL` (uint16 each), which is all the
decoder needs to rebuild exactly the same model. A group whose symbols are all equal (lo == hi)
costs no body bits. Groups are coded back to back on one rANS stack in the order of
`symbol_groups` (width ascending, then class ascending). The encoder picks whichever of
{bit packing, rANS per width, rANS per width and class} is smallest, estimating the rANS size
from the empirical entropy, so tiny decode-step frames fall back to bit packing when models
would cost more than they save.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

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

    @cached_property
    def categorical(self):
        # cached: a static model (from the config) is reused for every decode-step frame
        return _Categorical(self.counts.astype(np.float64), perfect=False)

    @cached_property
    def code_lengths(self) -> np.ndarray:
        """-log2 p per symbol (zero counts get constriction's leaky minimum, ~1/2^24)."""
        p = np.maximum(self.counts / self.counts.sum(), 2.0 ** -24)
        return -np.log2(p)


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
            coder.encode_reverse(np.subtract(symbols.reshape(-1), model.lo, dtype=np.int32), model.categorical)
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
        out.append((coder.decode(model.categorical, n) + model.lo).astype(np.uint8))
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


MODE_RAW, MODE_RANS, MODE_RANS_CLASSES, MODE_RANS_STATIC = 0, 1, 2, 3
#: Frames with fewer tokens are "small": per-class models would cost more than they save (one
#: model per class and width), while a static model (no bytes) pays; larger frames are the
#: other way round. Trying only the options that can win keeps both encode paths fast.
SMALL_FRAME_TOKENS = 16
#: From this many tokens on, per-class models always win when classes are configured (their
#: extra model bytes are < 1% of the body), so pooled models are not even fitted.
LARGE_FRAME_TOKENS = 256


@dataclass(frozen=True)
class Group:
    """Symbols of `tokens` x `cols` (None = every column) coded with one model."""

    width: int
    tokens: np.ndarray          # [n] token indices
    cols: np.ndarray | None     # [m] column indices of one channel class
    cls: int = 0                # that class's id (0 when pooled)

    def rows(self, n_tokens: int):
        """Row index for fancy indexing: a slice when the group has every token (no copy)."""
        if self.tokens.size == n_tokens:
            return slice(None)
        return self.tokens if self.cols is None else self.tokens[:, None]

    def take(self, symbols: np.ndarray) -> np.ndarray:
        rows = self.rows(symbols.shape[0])
        return symbols[rows] if self.cols is None else symbols[rows, self.cols]

    def size(self, hidden: int) -> int:
        return self.tokens.size * (hidden if self.cols is None else self.cols.size)


def symbol_groups(widths: np.ndarray, class_cols: list[np.ndarray] | None) -> list[Group]:
    groups = []
    for w, idx in group_tokens(widths):
        if class_cols is None:
            groups.append(Group(w, idx, None))
        else:
            groups.extend(Group(w, idx, cols, c) for c, cols in enumerate(class_cols) if cols.size)
    return groups


@dataclass(frozen=True)
class Body:
    mode: int
    models: bytes
    body: bytes
    entropy_bits: float   # empirical entropy of the symbols under the chosen grouping


def _models_blob(models: list[GroupModel]) -> bytes:
    return b"".join(bytes((m.lo, m.hi)) + m.counts.astype("<u2").tobytes() for m in models)


def encode_body(symbols: np.ndarray, widths: np.ndarray, class_cols: list[np.ndarray] | None,
                allow_rans: bool, static: dict[tuple[int, int], GroupModel] | None = None) -> Body:
    """Code symbols [tokens, hidden] by the cheapest of the modes (see module docstring).
    `static` maps (width, class) -> a calibrated model over the full alphabet [0, 2^width) that
    both sides hold (MODE_RANS_STATIC: no model bytes in the frame); its groups are the class
    groups when `class_cols` is given, else class 0 covers every column."""
    pooled = symbol_groups(widths, None)
    hidden = symbols.shape[1]
    raw_size = sum(packed_size(g.size(hidden), g.width) for g in pooled)
    small = widths.size < SMALL_FRAME_TOKENS
    options = [] if class_cols is not None and widths.size >= LARGE_FRAME_TOKENS else [(MODE_RANS, pooled)]
    if class_cols is not None and not small:
        options.append((MODE_RANS_CLASSES, symbol_groups(widths, class_cols)))
    fitted = []
    for mode, groups in options:
        data = [g.take(symbols) for g in groups]
        parts = [fit_group_model(g.width, d) for g, d in zip(groups, data)]
        models = [m for m, _ in parts]
        bits = sum(e for _, e in parts)
        fitted.append((2 * len(models) + 2 * sum(len(m.counts) for m in models) + bits / 8, mode, data,
                       models, bits))
    if static is not None and small:
        groups = symbol_groups(widths, class_cols)
        data = [g.take(symbols) for g in groups] if class_cols is not None else fitted[0][2]
        models = [static[g.width, g.cls] for g in groups]
        cross_bits = sum(float(m.code_lengths[d.reshape(-1)].sum()) for m, d in zip(models, data))
        fitted.append((cross_bits / 8, MODE_RANS_STATIC, data, models, fitted[0][4]))
    estimate, mode, data, models, bits = min(fitted, key=lambda f: f[0])
    if allow_rans and pooled and estimate < raw_size:
        words = rans_encode(list(zip(models, data)))
        blob = _models_blob(models) if mode != MODE_RANS_STATIC else b""
        if len(blob) + 4 * words.size < raw_size:     # the estimate can be off by a word or two
            return Body(mode, blob, words.astype("<u4").tobytes(), bits)
    raw = b"".join(pack_bits(g.take(symbols), g.width) for g in pooled)
    return Body(MODE_RAW, b"", raw, fitted[0][4])


def decode_body(rd, mode: int, widths: np.ndarray, hidden: int, class_cols: list[np.ndarray] | None,
                body_len: int, static: dict[tuple[int, int], GroupModel] | None = None) -> np.ndarray:
    """Read models + body through `rd` (a bounds-checked reader) and return symbols
    [tokens, hidden] uint8, each < 2^width of its token. Raises ValueError on invalid data."""
    grouped = mode == MODE_RANS_CLASSES or (mode == MODE_RANS_STATIC and class_cols is not None)
    groups = symbol_groups(widths, class_cols if grouped else None)
    if mode == MODE_RAW:
        expected = sum(packed_size(g.size(hidden), g.width) for g in groups)
        if body_len != expected:
            raise ValueError(f"raw body is {body_len} bytes, expected {expected}")
        decoded = [unpack_bits(rd.take(packed_size(g.size(hidden), g.width), "raw body"), g.size(hidden), g.width)
                   for g in groups]
    else:
        models = []
        for g in groups:
            if mode == MODE_RANS_STATIC:
                models.append((static[g.width, g.cls], g.size(hidden)))
                continue
            lo, hi = rd.take(2, "model range")
            if not lo <= hi < (1 << g.width):
                raise ValueError(f"model range [{lo}, {hi}] invalid for width {g.width}")
            counts = rd.array("<u2", hi - lo + 1, "model counts").copy()
            if hi > lo and not counts.any():
                raise ValueError("a symbol model has all-zero counts")
            models.append((GroupModel(g.width, lo, counts), g.size(hidden)))
        if body_len % 4:
            raise ValueError("rANS body is not whole words")
        words = rd.array("<u4", body_len // 4, "rANS body").astype(np.uint32)
        decoded = rans_decode(words, models)
    symbols = np.empty((widths.size, hidden), np.uint8)                 # [tokens, hidden]
    for g, sym in zip(groups, decoded):
        if int(sym.max(initial=0)) >= (1 << g.width):
            raise ValueError("decoded a symbol outside its width")
        rows = g.rows(widths.size)
        if g.cols is None:
            symbols[rows] = sym.reshape(g.tokens.size, hidden)
        else:
            symbols[rows, g.cols] = sym.reshape(g.tokens.size, g.cols.size)
    return symbols
