"""Token-predictive coding of the hidden state: frame format 4 (not in the paper).

Both ends of a split know which token each hidden-state row belongs to (the edge embedded it; the
frame carries the ids, which the cloud of a prefill would not otherwise have). So the edge sends
the residual of a prediction from the token instead of the hidden state itself:

    P_t = [E[x_t], E[x_{t-1}], 1] · W              ridge-linear, W [2H + 1, H] fitted offline
    y_t = (h_t − P_t) · U                          U [H, H]: the KLT of the calibration residuals
    s_t = round(y_t / δ)                           one step δ for every component (MSE-optimal)
    ĥ_t = (a_{g,c} s_t δ + P_t U) · Uᵀ             the cloud's reconstruction, a: the shrink below

The prediction is open loop (from the tokens only, never from earlier reconstructions), so a frame
decodes alone, prefill frames are one batch of matrix products, and an edge and a cloud whose
float rounding differs cannot drift apart (a history term over the decoded h_{t-1} would save
0.07 bit per value at full rank, 0.013 at rank 64, measured in docs/results.md "Token-predictive
coding", at the cost of all three).

Entropy coding: components fall into C classes by their calibration RMS; each token's residual
size relative to those RMS ("gain", 0.5 log2 mean (y_c / rms_c)^2) is quantized to one of G levels
and sent first; every symbol is then coded with the static model of its (gain level, class),
fitted on calibration text and held by both ends (`PredictiveCodec`). The decoder scales each
decoded component by a fixed gain per (gain level, component), the least-squares E[y q] / E[q²]
of the fit text: rounding's reconstruction points sit at bin centres, but the residual is peaked,
so the best estimate of a nonzero bin's value lies nearer zero (no rate; docs/results.md measured
it lowering the perplexity cost at equal size). Symbols past ±K escape: the
component travels exactly (f32) and codes as 0. A row that escapes often or whose gain is far past
anything seen in calibration (the attention sink's row, massive activations) travels raw (fp16,
or f32 when fp16 would overflow).

E is whatever table both ends agree on, checked by its crc32 (`PredictiveCodec.emb_crc`): a tensor
[V, H], or any object with `.shape` and float32 rows by a LongTensor index, such as an edge's 8-bit
embedding read a row at a time (`splitcli.deploy.predictive` picks the table).

Frame layout (little-endian; prefix as in frame.py so one reader tells the versions apart):

    magic "SLCF" | version u8 = 4 | dtype u8 = 0 | flags u8 | codec crc32 u32
    | varint tokens | varint hidden | varint prev_id + 1 (0: none) | varint n_raw | varint n_escapes
    | varint body_words
    ids      u16[tokens], or u32[tokens] with FLAG_IDS32
    raw      varint deltas of the raw rows' indices (ascending) | rows f16[n_raw, hidden] (f32 with
             FLAG_RAW32)
    escapes  varint deltas of the flat indices t * hidden + c (ascending) | values f32[n_escapes]
    body     u32[body_words]: one rANS stack, gain levels of the coded rows first (none for a codec of
             one level), then the symbols
             of each (gain level, class) group in that order, token-major within a group
    crc32    u32 over everything above
"""

from __future__ import annotations

import io
import json
import math
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import constriction
import numpy as np
import torch

from splitcli.codec.frame import MAGIC, FrameError, _Reader
from splitcli.errors import SplitLLMError

#: Version of the saved codec file (the arrays and their meaning).
FILE_VERSION = 1
FRAME_VERSION = 4
#: Symbols are coded in [-K, K]; larger ones escape.
K = 255
#: A row with more escapes than this travels raw.
RAW_ESCAPES = 8
#: ... as does a row whose gain exceeds the largest calibration gain by this many octaves.
RAW_GAIN_MARGIN = 2.0
FLAG_IDS32 = 1
FLAG_RAW32 = 2
_KNOWN_FLAGS = FLAG_IDS32 | FLAG_RAW32
_PREFIX_LEN = 11
NO_TOKEN = -1
DEFAULT_MAX_TOKENS = 1 << 16
_UNIQUE_FROM = 32        # rows from which `prediction` multiplies distinct tokens only
_FP16_MAX = 65504.0
_CRC_ROWS = 4096

_Categorical = constriction.stream.model.Categorical
_AnsCoder = constriction.stream.stack.AnsCoder


@dataclass(frozen=True, eq=False)
class PredictiveCodec:
    """Everything both ends hold for format-4 frames of one model at one split layer.

    W [2H + 1, H] float32: the token predictor; U [H, H] float32 orthogonal; step: δ;
    crms [H]: calibration RMS of each KLT component; classes [H] uint8 in [0, C);
    gain_edges [G - 1]: the gain levels' inner thresholds; gain_max: the largest calibration gain;
    gain_probs [G]; sym_probs [G, C, 2K + 1]: the static symbol models; shrink [G, H]: the decoder's
    gain per (gain level, component), E[y q] / E[q²] on the fit text (ones: none); emb_crc: crc32 of
    the input-embedding matrix the predictor was fitted with (checked where the codec meets a model).
    """

    W: np.ndarray
    U: np.ndarray
    step: float
    crms: np.ndarray
    classes: np.ndarray
    gain_edges: np.ndarray
    gain_max: float
    gain_probs: np.ndarray
    sym_probs: np.ndarray
    shrink: np.ndarray
    emb_crc: int
    info: dict = field(default_factory=dict)     # how it was fitted (text, windows, targets): not coded
    version: int = FILE_VERSION

    def __post_init__(self) -> None:
        if self.version != FILE_VERSION:
            raise SplitLLMError(f"predictive codec file version {self.version!r} is not supported "
                                f"(this build reads version {FILE_VERSION})")
        H = self.U.shape[0] if getattr(self.U, "ndim", 0) == 2 else -1
        arrays = dict(W=(self.W, (2 * H + 1, H), np.float32), U=(self.U, (H, H), np.float32),
                      crms=(self.crms, (H,), np.float32), classes=(self.classes, (H,), np.uint8),
                      gain_edges=(self.gain_edges, None, np.float32), gain_probs=(self.gain_probs, None, np.float64),
                      sym_probs=(self.sym_probs, None, np.float64), shrink=(self.shrink, None, np.float32))
        for name, (arr, shape, dtype) in arrays.items():
            if not isinstance(arr, np.ndarray) or (shape is not None and arr.shape != shape):
                raise SplitLLMError(f"predictive codec {name} must be an array of shape {shape}")
            if not np.isfinite(arr.astype(np.float64)).all():
                raise SplitLLMError(f"predictive codec {name} has NaN or Inf entries")
            object.__setattr__(self, name, np.ascontiguousarray(arr, dtype=dtype))
        G, C = len(self.gain_probs), int(self.classes.max()) + 1
        if H < 1 or G < 1 or self.gain_edges.shape != (G - 1,) or self.sym_probs.shape != (G, C, 2 * K + 1) \
                or self.shrink.shape != (G, H):
            raise SplitLLMError("predictive codec tables do not agree on hidden size, gain levels and classes")
        if not (math.isfinite(self.step) and self.step > 0 and math.isfinite(self.gain_max)):
            raise SplitLLMError(f"predictive codec step must be finite and > 0, got {self.step!r}")
        if (self.crms <= 0).any() or (self.gain_probs <= 0).any() or (self.sym_probs < 0).any() \
                or (self.sym_probs.sum(-1) <= 0).any() or (np.diff(self.gain_edges) < 0).any() \
                or (self.shrink <= 0).any() or (self.shrink > 4).any():
            raise SplitLLMError("predictive codec tables hold invalid probabilities, RMS or thresholds")

    @property
    def hidden(self) -> int:
        return self.U.shape[0]

    @cached_property
    def crc(self) -> int:
        """crc32 of everything that shapes a frame: frames carry it, so a mismatch is a FrameError."""
        crc = zlib.crc32(np.float64(self.step).tobytes())
        for arr in (self.W, self.U, self.crms, self.classes, self.gain_edges, self.gain_probs, self.sym_probs,
                    self.shrink):
            crc = zlib.crc32(arr.tobytes(), crc)
        return zlib.crc32(np.float64(self.gain_max).tobytes(), crc)

    @cached_property
    def A(self) -> torch.Tensor:
        """The predictor in the KLT domain, W · U [2H + 1, H]: one product gives P_t U."""
        return torch.from_numpy(self.W.astype(np.float64) @ self.U.astype(np.float64)).float()

    @cached_property
    def A12(self) -> torch.Tensor:
        """[H, 2H]: the current and the previous token's blocks of A side by side (one product for both)."""
        H, cols = self.hidden, torch.from_numpy(self.col_order)
        return torch.cat([self.A[:H, cols], self.A[H:2 * H, cols]], 1).contiguous()

    @cached_property
    def bias12(self) -> torch.Tensor:
        """[2H]: the bias in working order, then zeros (added once per distinct token, to its current half)."""
        H = self.hidden
        return torch.cat([self.A[2 * H, torch.from_numpy(self.col_order)], torch.zeros(H)])

    @cached_property
    def Uw(self) -> torch.Tensor:
        """U with its columns in working order [H, H]."""
        return self.Ut[:, torch.from_numpy(self.col_order)].contiguous()

    @cached_property
    def UwT(self) -> torch.Tensor:
        return self.Uw.T.contiguous()

    @cached_property
    def Ut(self) -> torch.Tensor:
        return torch.from_numpy(self.U)

    # Encoder and decoder work with the KLT components in *working order*, grouped by class
    # (`col_order`), so each (gain level, class) group of the body is a slice; frames index
    # components (escapes) in KLT order.
    @cached_property
    def shrink_steps(self) -> np.ndarray:
        """[G, H] float32, working order: the decoded value of symbol 1 per (gain level, component), a · δ."""
        return (self.shrink[:, self.col_order] * np.float32(self.step)).astype(np.float32)

    @cached_property
    def inv_crms2(self) -> torch.Tensor:
        """[H] 1 / rms², working order."""
        return torch.from_numpy((1.0 / self.crms[self.col_order].astype(np.float64) ** 2).astype(np.float32))

    @cached_property
    def crms_w(self) -> torch.Tensor:
        return torch.from_numpy(self.crms[self.col_order])

    @cached_property
    def col_rank(self) -> np.ndarray:
        """Inverse of col_order: KLT component -> working position."""
        return np.argsort(self.col_order)

    @cached_property
    def col_order(self) -> np.ndarray:
        """Components grouped by class (ascending index within a class): the body's column order."""
        return np.argsort(self.classes, kind="stable")

    @cached_property
    def col_bounds(self) -> np.ndarray:
        """[C + 1]: class c's columns are col_order[col_bounds[c]:col_bounds[c + 1]]."""
        return np.searchsorted(self.classes[self.col_order], np.arange(self.sym_probs.shape[1] + 1))

    @cached_property
    def gain_model(self):
        return _Categorical(self.gain_probs / self.gain_probs.sum(), perfect=False)

    @cached_property
    def row_bits(self) -> float:
        """Mean bits of one coded row (its gain level and H symbols) on text like the fit text: the fit
        text's own rate when the fit recorded it, else the models' entropy (which their smoothing
        inflates when the fit text was short). Escapes and raw rows (rare) are left out."""
        if isinstance(self.info.get("row_bits_fit"), (int, float)) and math.isfinite(self.info["row_bits_fit"]):
            return max(0.0, float(self.info["row_bits_fit"]))
        p = self.sym_probs / self.sym_probs.sum(-1, keepdims=True)                  # [G, C, 2K + 1]
        bits = -(p * np.log2(np.where(p > 0, p, 1.0))).sum(-1)                     # [G, C]
        g = self.gain_probs / self.gain_probs.sum()
        per_class = np.bincount(self.classes, minlength=bits.shape[1])             # components per class
        return float(g @ bits @ per_class - (g * np.log2(g)).sum())

    def sym_model(self, g: int, c: int):
        models = self.__dict__.setdefault("_models", {})
        if (g, c) not in models:
            p = self.sym_probs[g, c]
            models[g, c] = _Categorical(p / p.sum(), perfect=False)
        return models[g, c]

    # ---- persistence ----
    def save(self, path: str | Path) -> None:
        """Write an .npz (arrays + a JSON meta record); the caller decides about overwriting."""
        meta = dict(version=self.version, step=self.step, gain_max=self.gain_max, emb_crc=self.emb_crc,
                    info=self.info, format="splitllm-predictive-codec")
        buf = io.BytesIO()
        np.savez(buf, W=self.W, U=self.U, crms=self.crms, classes=self.classes, gain_edges=self.gain_edges,
                 gain_probs=self.gain_probs, sym_probs=self.sym_probs, shrink=self.shrink,
                 meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
        Path(path).write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "PredictiveCodec":
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                arrays = {k: z[k] for k in ("W", "U", "crms", "classes", "gain_edges", "gain_probs", "sym_probs",
                                            "shrink")}
        except (OSError, KeyError, ValueError, UnicodeDecodeError) as exc:
            raise SplitLLMError(f"cannot read predictive codec file {path}: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != "splitllm-predictive-codec":
            raise SplitLLMError(f"{path} is not a splitllm predictive codec file")
        try:
            return cls(**arrays, step=float(meta["step"]), gain_max=float(meta["gain_max"]),
                       emb_crc=int(meta["emb_crc"]), info=dict(meta.get("info") or {}), version=int(meta["version"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SplitLLMError(f"predictive codec file {path} is invalid: {exc}") from exc


def expected_frame_bytes(pc: PredictiveCodec, rows: int, vocab: int) -> float:
    """What a frame of `rows` hidden states costs on average on text like the fit text: header,
    token ids, the body at `row_bits` per row (in whole words) and the crc. The live policy's byte
    model for this wire, which has one rate (no q̄ to trade)."""
    words = math.ceil(rows * pc.row_bits / 32)
    counts = (rows, pc.hidden, vocab, 0, 0, words)                          # `_COUNTS`, prev_id at its widest
    header = _PREFIX_LEN + sum(len(_varint(n)) for n in counts) + 4        # ... and the crc
    return float(header + rows * (4 if vocab > 0x10000 else 2) + 4 * words)


def embedding_crc(emb) -> int:
    """crc32 of the float32 table [V, H], read in blocks of rows: `emb` is a tensor or anything
    with `.shape` and float32 rows by a LongTensor index (an edge's 8-bit table, dequantized a
    block at a time, so it never holds the float copy)."""
    crc, V = 0, emb.shape[0]
    for a in range(0, V, _CRC_ROWS):
        rows = emb[torch.arange(a, min(a + _CRC_ROWS, V))]
        crc = zlib.crc32(rows.detach().to(torch.float32).contiguous().numpy().tobytes(), crc)
    return crc


def prediction(pc: PredictiveCodec, emb: torch.Tensor, ids: torch.Tensor, prev_id: int) -> torch.Tensor:
    """P_t U for every row, working order: ids [T] int64, prev_id the token before ids[0] (NO_TOKEN:
    none) -> [T, H]."""
    H = pc.hidden
    if prev_id != NO_TOKEN:
        ids = torch.cat([torch.tensor([prev_id]), ids])
    if len(ids) > _UNIQUE_FROM:
        # a window repeats its tokens (~1/3 distinct in 2048 of WikiText): multiply each distinct one once
        tokens, inv = torch.unique(ids, return_inverse=True)
    else:
        tokens, inv = ids, torch.arange(len(ids))
    both = torch.addmm(pc.bias12, emb[tokens], pc.A12)                        # [U, 2H]: bias in the first half
    if prev_id != NO_TOKEN:
        out = both[:, :H][inv[1:]]                                            # [T, H]
        out += both[:, H:][inv[:-1]]
    else:
        out = both[:, :H][inv]
        out[1:] += both[:, H:][inv[:-1]]
    return out


def gain_of(y: torch.Tensor, crms: torch.Tensor, escaped: torch.Tensor) -> torch.Tensor:
    """Each row's residual size in units of the components' calibration RMS, log2 [T]."""
    r = torch.where(escaped, 0.0, y / crms)
    return 0.5 * torch.log2(r.pow(2).sum(1) / (~escaped).sum(1).clamp_min(1) + 1e-12)


def quantize(pc: PredictiveCodec, y: torch.Tensor):
    """y [T, H] (KLT-domain residual, working order) -> symbols s [T, H] (float, integral; 0 where
    escaped), gain levels [T], raw rows [T] bool, escapes outside raw rows as (rows, columns) arrays."""
    s = torch.round(y / pc.step)
    gain = 0.5 * torch.log2(torch.mv(y.square(), pc.inv_crms2) / y.shape[1] + 1e-12)     # [T]: no masks
    hit = torch.nonzero(s.abs().amax(1) > K).reshape(-1)                   # rows with escapes: rare
    n_esc = torch.zeros(len(y), dtype=torch.long)
    esc_t = esc_j = np.zeros(0, np.int64)
    if hit.numel():   # the sink row, massive activations: those rows' gain without their escapes
        escaped = s[hit].abs() > K                                          # [hits, H]
        gain[hit] = gain_of(y[hit], pc.crms_w, escaped)
        n_esc[hit] = escaped.sum(1)
        s[hit] = s[hit].masked_fill_(escaped, 0)
    levels = torch.bucketize(gain, torch.from_numpy(pc.gain_edges))
    raw = (n_esc > RAW_ESCAPES) | (gain > pc.gain_max + RAW_GAIN_MARGIN) | ~torch.isfinite(gain)
    if hit.numel():
        keep = ~raw[hit]
        rows, cols = np.nonzero(escaped[keep].numpy())
        esc_t, esc_j = hit[keep].numpy()[rows], cols
    return s, levels, raw, (esc_t, esc_j)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(rd: _Reader, what: str) -> int:
    n = 0
    for shift in range(0, 64, 7):
        b = rd.take(1, what)[0]
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n
    raise FrameError(f"codec frame has an overlong varint for {what}")


def _deltas(idx: np.ndarray) -> bytes:
    prev, out = -1, bytearray()
    for i in idx.tolist():
        out += _varint(i - prev - 1)
        prev = i
    return bytes(out)


def _read_deltas(rd: _Reader, n: int, limit: int, what: str) -> np.ndarray:
    out, prev = np.empty(n, np.int64), -1
    for k in range(n):
        prev = prev + 1 + _read_varint(rd, what)
        if prev >= limit:
            raise FrameError(f"codec frame has {what} past the end")
        out[k] = prev
    return out


def _groups(pc: PredictiveCodec, levels: np.ndarray):
    """The body's layout for coded rows with gain `levels` [N]: (row order, and per non-empty group in
    wire order (gain level, class, row slice, column slice)) over the symbols' rows in that order and
    columns in working order. Wire order: level ascending, class ascending, token-major in a group."""
    order = np.argsort(levels, kind="stable")
    rb = np.searchsorted(levels[order], np.arange(len(pc.gain_probs) + 1))
    cb = pc.col_bounds
    groups = [(g, c, slice(rb[g], rb[g + 1]), slice(cb[c], cb[c + 1]))
              for g in range(len(rb) - 1) if rb[g + 1] > rb[g] for c in range(len(cb) - 1) if cb[c + 1] > cb[c]]
    return order, groups


def encode(hidden: torch.Tensor, ids, pc: PredictiveCodec, emb: torch.Tensor, prev_id: int = NO_TOKEN) -> bytes:
    """hidden [T, H] of the tokens ids [T] (prev_id: the token before ids[0], if any) -> frame."""
    x = hidden.detach().to(torch.float32)
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    if x.ndim != 2 or x.shape[1] != pc.hidden or x.shape[0] != ids.numel():
        raise SplitLLMError(f"predictive encode needs hidden [T, {pc.hidden}] and T token ids, got "
                            f"{tuple(x.shape)} and {ids.numel()} ids")
    V = emb.shape[0]
    if ids.numel() and (ids.min() < 0 or ids.max() >= V) or not (prev_id == NO_TOKEN or 0 <= prev_id < V):
        raise SplitLLMError(f"predictive encode: token ids must lie in [0, {V})")
    T, H = x.shape
    pred = prediction(pc, emb, ids, prev_id)                                    # [T, H]
    y = torch.addmm(pred, x, pc.Uw, beta=-1)                                   # [T, H]: x U - P U, working order
    s, levels, raw, (esc_t, esc_j) = quantize(pc, y)
    raw_np = raw.numpy()
    raw_idx = np.flatnonzero(raw_np)
    esc_vals = y.numpy()[esc_t, esc_j].astype("<f4")
    esc_flat = esc_t * H + pc.col_order[esc_j]                                  # KLT order on the wire
    by_index = np.argsort(esc_flat)
    esc_flat, esc_vals = esc_flat[by_index], esc_vals[by_index]
    rows_raw = x[raw_idx].numpy()
    # NaN or Inf anywhere in x reaches a row's gain (the row goes raw) or an escape: refuse either
    if not (np.isfinite(rows_raw).all() and np.isfinite(esc_vals).all()):
        raise SplitLLMError("predictive encode: the hidden state contains NaN or Inf")
    coded = np.flatnonzero(~raw_np)
    lv = levels.numpy()[coded]
    order, groups = _groups(pc, lv)
    sym = (s[torch.from_numpy(coded[order])] + K).to(torch.int32).numpy()      # [coded, H]
    coder = _AnsCoder()
    for g, c, rows, cols in reversed(groups):                                 # a stack: last pushed is read first
        coder.encode_reverse(sym[rows, cols].reshape(-1), pc.sym_model(g, c))
    if lv.size and len(pc.gain_probs) > 1:                                   # one level: nothing to say
        coder.encode_reverse(lv.astype(np.int32), pc.gain_model)
    body = coder.get_compressed().astype("<u4")
    raw32 = bool(rows_raw.size) and float(np.abs(rows_raw).max()) > _FP16_MAX
    ids32 = bool(ids.numel()) and int(ids.max()) > 0xFFFF
    flags = (FLAG_IDS32 if ids32 else 0) | (FLAG_RAW32 if raw32 else 0)
    parts = [MAGIC, bytes([FRAME_VERSION, 0, flags]), pc.crc.to_bytes(4, "little"),
             _varint(T), _varint(H), _varint(prev_id + 1), _varint(raw_idx.size), _varint(esc_flat.size),
             _varint(body.size),
             ids.numpy().astype("<u4" if ids32 else "<u2").tobytes(),
             _deltas(raw_idx), rows_raw.astype("<f4" if raw32 else "<f2").tobytes(),
             _deltas(esc_flat), esc_vals.tobytes(), body.tobytes()]
    frame = b"".join(parts)
    return frame + zlib.crc32(frame).to_bytes(4, "little")


def decode(frame: bytes, pc: PredictiveCodec, emb: torch.Tensor, *, max_tokens: int = DEFAULT_MAX_TOKENS) -> torch.Tensor:
    """Frame -> reconstruction [T, H] float32. Any invalid frame raises FrameError and nothing else."""
    try:
        return _decode(frame, pc, emb, max_tokens)
    except FrameError:
        raise
    except (ValueError, TypeError, OverflowError, MemoryError, IndexError) as exc:
        raise FrameError(f"codec frame is invalid: {exc}") from exc


def frame_tokens(frame: bytes) -> np.ndarray:
    """The token ids a valid-looking format-4 frame carries (the cloud's view of the prompt)."""
    rd, flags, _crc, (T, *_rest) = _header(frame)
    return rd.array("<u4" if flags & FLAG_IDS32 else "<u2", T, "token ids").astype(np.int64)


_COUNTS = ("tokens", "hidden", "prev_id", "n_raw", "n_escapes", "body_words")


def _header(frame: bytes):
    """(reader at the token ids, flags, codec crc, the six varint counts of `_COUNTS`) of a frame
    whose checksum, magic, version and flags are valid."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise FrameError(f"codec frame must be bytes, got {type(frame).__name__}")
    buf = memoryview(bytes(frame))
    if len(buf) < _PREFIX_LEN + 4:
        raise FrameError(f"codec frame is truncated: {len(buf)} bytes is shorter than a header")
    if zlib.crc32(buf[:-4]) != int.from_bytes(buf[-4:], "little"):
        raise FrameError("codec frame checksum mismatch (corrupted or truncated)")
    if bytes(buf[:4]) != MAGIC:
        raise FrameError("not a codec frame (bad magic)")
    version, dtype, flags = buf[4], buf[5], buf[6]
    if version != FRAME_VERSION:
        raise FrameError(f"codec frame version {version} is not a predictive (version {FRAME_VERSION}) frame")
    if dtype != 0 or flags & ~_KNOWN_FLAGS:
        raise FrameError("codec frame header has an unknown dtype or flag")
    rd = _Reader(buf, len(buf) - 4)
    rd.take(7, "prefix")
    crc = int.from_bytes(rd.take(4, "codec crc"), "little")
    return rd, flags, crc, tuple(_read_varint(rd, w) for w in _COUNTS)


def _decode(frame, pc: PredictiveCodec, emb: torch.Tensor, max_tokens: int) -> torch.Tensor:
    rd, flags, crc, (T, H, prev, n_raw, n_esc, n_words) = _header(frame)
    if crc != pc.crc:
        raise FrameError("codec frame was encoded with another predictive codec (crc mismatch)")
    V = emb.shape[0]
    if H != pc.hidden or T > max_tokens or prev > V or n_raw > T or n_esc > T * H:
        raise FrameError(f"codec frame header is out of range (tokens {T}, hidden {H}, raw rows {n_raw}, "
                         f"escapes {n_esc})")
    # every count against the bytes that must follow it, before anything is allocated
    id_bytes = 4 if flags & FLAG_IDS32 else 2
    raw_bytes = 4 if flags & FLAG_RAW32 else 2
    if T * id_bytes + n_raw * (1 + raw_bytes * H) + 5 * n_esc + 4 * n_words > rd.end - rd.pos:
        raise FrameError("codec frame is truncated: its counts need more bytes than it has")
    ids = rd.array("<u4" if flags & FLAG_IDS32 else "<u2", T, "token ids").astype(np.int64)
    if ids.size and ids.max() >= V:
        raise FrameError("codec frame has a token id outside the vocabulary")
    raw_idx = _read_deltas(rd, n_raw, T, "raw rows")
    raw_dt = "<f4" if flags & FLAG_RAW32 else "<f2"
    raw_rows = rd.array(raw_dt, n_raw * H, "raw rows").astype(np.float32).reshape(n_raw, H)
    esc_flat = _read_deltas(rd, n_esc, T * H, "escapes")
    esc_vals = rd.array("<f4", n_esc, "escape values").astype(np.float32)
    words = rd.array("<u4", n_words, "body")
    if rd.pos != rd.end:
        raise FrameError(f"codec frame has {rd.end - rd.pos} unexpected trailing bytes")
    if not (np.isfinite(raw_rows).all() and np.isfinite(esc_vals).all()):
        raise FrameError("codec frame carries NaN or Inf values")
    is_raw = np.zeros(T, bool)
    is_raw[raw_idx] = True
    if n_esc and is_raw[esc_flat // H].any():
        raise FrameError("codec frame has escapes inside a raw row")
    coded = np.flatnonzero(~is_raw)
    z = np.zeros((T, H), np.float32)                                            # [T, H] KLT domain
    if coded.size:
        if not n_words:
            raise FrameError("codec frame has coded rows but an empty body")
        coder = _AnsCoder(words.astype(np.uint32))
        lv = coder.decode(pc.gain_model, coded.size) if len(pc.gain_probs) > 1 else np.zeros(coded.size, np.int64)
        if lv.max() >= len(pc.gain_probs):
            raise FrameError("codec frame has a gain level outside the codec's")
        order, groups = _groups(pc, lv)
        sym = np.empty((coded.size, H), np.int32)                               # permuted as encoded
        for g, c, rows, cols in groups:
            sym[rows, cols] = coder.decode(pc.sym_model(g, c), (rows.stop - rows.start) * (cols.stop - cols.start)) \
                .reshape(rows.stop - rows.start, cols.stop - cols.start)
        if not coder.is_empty():
            raise FrameError("codec frame body has words left over after the last symbol")
        z[coded[order]] = (sym - K) * pc.shrink_steps[lv[order]]                 # a δ per (row, component)
    elif n_words:
        raise FrameError("codec frame has a body but no coded rows")
    z = torch.from_numpy(z)
    if n_esc:
        et, ec = np.divmod(esc_flat, H)
        z[torch.from_numpy(et), torch.from_numpy(pc.col_rank[ec])] = torch.from_numpy(esc_vals)
    pred = prediction(pc, emb, torch.from_numpy(ids), prev - 1 if prev else NO_TOKEN)
    out = (z + pred) @ pc.UwT                                                   # [T, H]
    if n_raw:
        out[torch.from_numpy(raw_idx)] = torch.from_numpy(raw_rows)
    return out
