"""Token-predictive coding of the hidden state: frame format 4 (not in the paper).

Both ends of a split know which token each hidden-state row belongs to (the edge embedded it; the
frame carries the ids, which the cloud of a prefill would not otherwise have). So the edge sends
the residual of a prediction from the token instead of the hidden state itself:

    P_t = [E[x_t], E[x_{t-1}], 1] · W              ridge-linear, W [2H + 1, H] fitted offline
    y_t = (h_t − P_t) · U                          U [H, H]: the KLT of the calibration residuals
    s_t = round(y_t / δ)                           one step δ for every component (MSE-optimal)
    ĥ_t = P_t + (a_{g,c} s_t δ) · Uᵀ               the cloud's reconstruction, a: the shrink below

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

import math
import zlib

import constriction
import numpy as np
import torch

from splitcli.codec.frame import MAGIC, FrameError, _Reader
from splitcli.codec.predictive_codec import FILE_VERSION, K, PredictiveCodec  # noqa: F401 (this module's API too)
from splitcli.errors import SplitLLMError
from splitcli.quant import kernels

FRAME_VERSION = 4
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
_FP16_MAX = 65504.0
_CRC_ROWS = 4096

_AnsCoder = constriction.stream.stack.AnsCoder


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


def _mm(x: torch.Tensor, w: torch.Tensor, w16: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ w [K, N] (+ bias [N]) -> [T, N] float32: a decode step's few rows through the fp16
    kernel where it runs (w16 [N, K]: w's transpose in half precision), since one step streams every
    weight once and the float32 ones do not fit L2 (docs/results.md "Faster predictive decode
    steps"); a prefill, or a CPU without the kernels, in float32. The ends of a split that both run
    the kernel compute the same prediction; otherwise they differ by ~1e-4 of it, which adds to
    the reconstruction error (see the same section)."""
    if w16 is not None and len(x) <= kernels.GEMV_MAX_TOKENS and kernels.available() \
            and kernels.supports16(x.shape[1]):
        return kernels.mm16(x, w16, bias)
    return x @ w if bias is None else torch.addmm(bias, x, w)


def prediction(pc: PredictiveCodec, emb: torch.Tensor, ids: torch.Tensor, prev_id: int) -> torch.Tensor:
    """P_t for every row: ids [T] int64, prev_id the token before ids[0] (NO_TOKEN: none) -> [T, H]."""
    H, T = pc.hidden, len(ids)
    if T <= kernels.GEMV_MAX_TOKENS:   # a decode step: few operations (each costs ~5-20 us once the weights evict them)
        now = ids.tolist()
        before = ([] if prev_id == NO_TOKEN or not T else [prev_id]) + now[:-1]
        e = emb[torch.tensor(now + before, dtype=torch.int64)].detach().to(torch.float32).numpy()   # [T + T', H]
        rows = np.zeros((T, 2 * H), np.float32)                               # [T, 2H]: [E[x_t], E[x_{t-1}]]
        rows[:, :H] = e[:T]
        rows[T - len(before):, H:] = e[T:]
        return _mm(torch.from_numpy(rows), pc.W2, pc.W16, pc.bias)
    if prev_id != NO_TOKEN:
        ids = torch.cat([torch.tensor([prev_id]), ids])
    # a window repeats its tokens (~1/3 distinct in 2048 of WikiText): multiply each distinct one once
    tokens, inv = torch.unique(ids, return_inverse=True)
    both = torch.addmm(pc.bias12, emb[tokens], pc.W12)                         # [U, 2H]: bias in the first half
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


def quantize(pc: PredictiveCodec, y: np.ndarray):
    """y [T, H] float32 (KLT-domain residual, working order) -> symbols s [T, H] (float, integral; 0
    where escaped), gain levels [T], raw rows [T] bool, escapes outside raw rows as (rows, columns).
    In numpy: a decode step's row costs a few microseconds per operation less than in torch."""
    with np.errstate(over="ignore", invalid="ignore"):   # huge or NaN rows go raw below (or are refused)
        s = np.rint(y / np.float32(pc.step))
        gain = 0.5 * np.log2((y * y) @ pc.inv_crms2 / np.float32(y.shape[1]) + np.float32(1e-12))   # [T]: no masks
    hit = np.flatnonzero(np.abs(s).max(1, initial=0) > K)                 # rows with escapes: rare
    n_esc = np.zeros(len(y), np.int64)
    esc_t = esc_j = np.zeros(0, np.int64)
    if hit.size:   # the sink row, massive activations: those rows' gain without their escapes
        escaped = np.abs(s[hit]) > K                                        # [hits, H]
        gain[hit] = gain_of(torch.from_numpy(y[hit]), pc.crms_w, torch.from_numpy(escaped)).numpy()
        n_esc[hit] = escaped.sum(1)
        s[hit] = np.where(escaped, 0, s[hit])
    levels = np.searchsorted(pc.gain_edges, gain)                          # as torch.bucketize: edges < gain
    raw = (n_esc > RAW_ESCAPES) | (gain > pc.gain_max + RAW_GAIN_MARGIN) | ~np.isfinite(gain)
    if hit.size:
        keep = ~raw[hit]
        rows, cols = np.nonzero(escaped[keep])
        esc_t, esc_j = hit[keep][rows], cols
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
    rb = np.searchsorted(levels[order], np.arange(len(pc.gain_probs) + 1)).tolist()
    groups = [(g, c, slice(rb[g], rb[g + 1]), cols) for g in range(len(rb) - 1) if rb[g + 1] > rb[g]
              for c, cols in pc.class_cols]
    return order, groups


def encode(hidden: torch.Tensor, ids, pc: PredictiveCodec, emb: torch.Tensor, prev_id: int = NO_TOKEN) -> bytes:
    """hidden [T, H] of the tokens ids [T] (prev_id: the token before ids[0], if any) -> frame."""
    x = hidden.detach().to(torch.float32)
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    if x.ndim != 2 or x.shape[1] != pc.hidden or x.shape[0] != ids.numel():
        raise SplitLLMError(f"predictive encode needs hidden [T, {pc.hidden}] and T token ids, got "
                            f"{tuple(x.shape)} and {ids.numel()} ids")
    V = emb.shape[0]
    lo, hi = (int(v) for v in ids.aminmax()) if ids.numel() else (0, 0)
    if lo < 0 or hi >= V or not (prev_id == NO_TOKEN or 0 <= prev_id < V):
        raise SplitLLMError(f"predictive encode: token ids must lie in [0, {V})")
    T, H = x.shape
    y = _mm(x - prediction(pc, emb, ids, prev_id), pc.Uw, pc.Uw16T).numpy()     # [T, H]: (x - P) U, working order
    s, levels, raw_np, (esc_t, esc_j) = quantize(pc, y)
    raw_idx = np.flatnonzero(raw_np)
    esc_vals = y[esc_t, esc_j].astype("<f4")
    esc_flat = esc_t * H + pc.col_order[esc_j]                                  # KLT order on the wire
    by_index = np.argsort(esc_flat)
    esc_flat, esc_vals = esc_flat[by_index], esc_vals[by_index]
    rows_raw = x.numpy()[raw_idx]
    # NaN or Inf anywhere in x reaches a row's gain (the row goes raw) or an escape: refuse either
    if not (np.isfinite(rows_raw).all() and np.isfinite(esc_vals).all()):
        raise SplitLLMError("predictive encode: the hidden state contains NaN or Inf")
    coded = np.flatnonzero(~raw_np)
    lv = levels[coded]
    order, groups = _groups(pc, lv)
    sym = (s[coded[order]] + K).astype(np.int32)                                # [coded, H]
    coder = _AnsCoder()
    for g, c, rows, cols in reversed(groups):                                 # a stack: last pushed is read first
        coder.encode_reverse(sym[rows, cols].reshape(-1), pc.sym_model(g, c))
    if lv.size and len(pc.gain_probs) > 1:                                   # one level: nothing to say
        coder.encode_reverse(lv.astype(np.int32), pc.gain_model)
    body = coder.get_compressed().astype("<u4")
    raw32 = bool(rows_raw.size) and float(np.abs(rows_raw).max()) > _FP16_MAX
    ids32 = hi > 0xFFFF
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
    out = _mm(z, pc.UwT, pc.Uw16)                                               # [T, H]
    out += prediction(pc, emb, torch.from_numpy(ids), prev - 1 if prev else NO_TOKEN)
    if n_raw:
        out[torch.from_numpy(raw_idx)] = torch.from_numpy(raw_rows)
    return out
