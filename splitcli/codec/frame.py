"""The wire frame: encode a hidden state [tokens, hidden] to self-describing bytes and back.

Layout, little-endian (version 2; version 3 = version 2 + FLAG_ROTATION and its seed):

    header   magic "SLCF" | version u8 | dtype u8 | flags u8 | q_bar u8 | q_min u8 | 0 u8
             | tokens u32 | hidden u32 | tau f32 | delta f32 | n_outliers u32 | body_len u32
             or, with FLAG_COMPACT (one-token frames, i.e. decode steps, whose body fits u16):
             magic "SLCF" | version u8 | dtype u8 | flags u8 | q_bar u8 | q_min u8
             | hidden u16 | n_outliers u16 | body_len u16       (tokens = 1, no tau/delta)
             | crc32 of the channel scale u32 (only if FLAG_CHANNEL_SCALE)
             | crc32 of the channel classes u32 (only if FLAG_CHANNEL_CLASS)
             | crc32 of the static symbol model u32 (only if FLAG_STATIC_MODEL)
             | rotation seed u32 (only if FLAG_ROTATION, version 3 only)
    per token  widths u8[tokens] | scales f32[tokens] | zeros i32[tokens] (only if FLAG_ZEROS)
    sparse   counts u16[tokens] (CSR row pointers = their prefix sums; absent with FLAG_COMPACT,
             where the one row holds all n_outliers) | cols u16[n_outliers]
             | values dtype[n_outliers] (the input's exact bits)
    models   rANS paths without FLAG_STATIC_MODEL, per group (width ascending, then channel
             class ascending when FLAG_CLASS_MODELS): lo u8 | hi u8 | counts u16[hi-lo+1]
    body     body_len bytes: rANS uint32 words, or per width group the symbols bit-packed
    crc32    u32 over everything above

Version 3 (FLAG_ROTATION): T_below (after the channel scale) was rotated by the seeded randomized
Hadamard transform of splitcli.codec.transform before TAB-Q; decoding un-rotates the eq. 7
reconstruction with the header's seed. A frame that does not rotate is written as version 2,
byte for byte what earlier builds wrote, and both versions decode.

tau and delta are informational (decoding does not need them). Frames encoded with per-channel
calibration (channel_scale / channel_class / symbol_model, see calibrate.py) decode only with the
same CodecConfig; the header's crc32s make a mismatch a FrameError rather than garbage. Reconstruction is eq. 7 with one
reading: at outlier positions the output is the exact outlier value (the quantized residual of
T_below there is a zero and is dropped rather than added), so outliers round-trip bit for bit.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from splitcli.codec.config import FORMAT_VERSION, MAX_Q_BAR, MIN_Q, CodecConfig
from splitcli.codec.entropy import MODE_RANS, MODE_RANS_CLASSES, MODE_RANS_STATIC, MODE_RAW, decode_body, encode_body
from splitcli.codec.tabq import reconstruct, tab_q
from splitcli.codec.threshold import calibrate_tau, split_threshold
from splitcli.codec.transform import rotate, rotation_supported, unrotate
from splitcli.errors import SplitLLMError

MAGIC = b"SLCF"
_HEADER = struct.Struct("<4sBBBBBBIIffII")
# Version 2 added the compact header: a decode-step frame is ~300 bytes, of which the full
# header's tau/delta (informational), u32 counts and the one-row CSR count were ~21.
_COMPACT = struct.Struct("<4sBBBBBHHH")
_PREFIX = struct.Struct("<4sBBB")       # magic, version, dtype, flags: common to both headers
_CRC = struct.Struct("<I")
FLAG_RANS = 1
FLAG_ZEROS = 2
FLAG_CHANNEL_SCALE = 4
FLAG_CHANNEL_CLASS = 8
FLAG_CLASS_MODELS = 16
FLAG_STATIC_MODEL = 32
FLAG_COMPACT = 64
FLAG_ROTATION = 128      # version 3 only
_V2_FLAGS = FLAG_RANS | FLAG_ZEROS | FLAG_CHANNEL_SCALE | FLAG_CHANNEL_CLASS | FLAG_CLASS_MODELS | \
    FLAG_STATIC_MODEL | FLAG_COMPACT
_KNOWN_FLAGS = {2: _V2_FLAGS, 3: _V2_FLAGS | FLAG_ROTATION}

# dtype code -> (torch dtype, numpy dtype holding its raw bits)
_DTYPES = {0: (torch.float32, np.dtype("<u4")), 1: (torch.float16, np.dtype("<u2")),
           2: (torch.bfloat16, np.dtype("<u2"))}
_PATHS = {MODE_RAW: "raw", MODE_RANS: "rans", MODE_RANS_CLASSES: "rans-class", MODE_RANS_STATIC: "rans-static"}
_DTYPE_CODES = {td: code for code, (td, _) in _DTYPES.items()}
_BITS_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

#: Wire-format cap on the hidden size (columns travel as uint16).
MAX_HIDDEN = 0xFFFF
DEFAULT_MAX_TOKENS = 1 << 16
DEFAULT_MAX_ELEMENTS = 1 << 26      # 256 MiB of float32 output
_MAX_ABS_ZERO = 1 << 21             # tabq keeps |z| <= 2^20
_FLOAT32_MAX = np.finfo(np.float32).max
#: Largest finite value of each output dtype: a reconstruction past it saturates, never turns inf.
_FINITE_MAX = {torch.float32: float(_FLOAT32_MAX), torch.float16: 65504.0,
               torch.bfloat16: float(torch.finfo(torch.bfloat16).max)}


class FrameError(SplitLLMError):
    """The only error `decode` raises: the bytes are not a valid frame (truncated, corrupted,
    from another version, or beyond the caller's size caps)."""


@dataclass(frozen=True)
class CodecStats:
    """What one encoded frame is made of. Bits are totals over the frame."""

    frame_bytes: int
    tokens: int
    hidden: int
    n_outliers: int
    path: str              # "raw", "rans" (a model per width), "rans-class" (per width and
                           # class) or "rans-static" (the config's calibrated model)
    meta_bytes: int        # header + per-token widths/scales/zeros + crc
    sparse_bytes: int
    model_bytes: int
    body_bytes: int
    entropy_bits: float    # empirical entropy of the symbols under the path's grouping
    mean_width: float
    max_distortion: float  # largest per-token δ (relative L2 of the TAB-Q part)
    tau: float

    @property
    def n_symbols(self) -> int:
        return self.tokens * self.hidden

    @property
    def coded_bits(self) -> int:
        return 8 * self.body_bytes

    @property
    def entropy_overhead(self) -> float:
        """coded_bits / entropy_bits - 1 of the symbol body (models excluded)."""
        return self.coded_bits / self.entropy_bits - 1 if self.entropy_bits > 0 else 0.0

    @property
    def entropy_overhead_with_model(self) -> float:
        bits = 8 * (self.body_bytes + self.model_bytes)
        return bits / self.entropy_bits - 1 if self.entropy_bits > 0 else 0.0


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise SplitLLMError(f"codec input must be a tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise SplitLLMError(f"codec input must have shape [tokens, hidden], got {tuple(x.shape)}")
    if x.dtype not in _DTYPE_CODES:
        raise SplitLLMError(f"codec input dtype must be float32, float16 or bfloat16, got {x.dtype}")
    if x.shape[1] > MAX_HIDDEN:
        raise SplitLLMError(f"codec hidden size {x.shape[1]} exceeds the format's {MAX_HIDDEN}")
    if x.shape[0] > 0xFFFFFFFF:
        raise SplitLLMError("codec input has too many tokens for one frame")
    return x.detach().to("cpu").contiguous()


def encode_with_stats(x, cfg: CodecConfig) -> tuple[bytes, CodecStats]:
    """Encode x [tokens, hidden] (float32/float16/bfloat16) into one frame; see module docstring."""
    x = _as_tensor(x)
    x32 = x.to(torch.float32).numpy()                                     # [tokens, hidden]
    if not np.isfinite(x32).all():
        raise SplitLLMError("codec input contains NaN or Inf; refusing to encode it")
    tokens, hidden = x32.shape
    for name, vec in (("channel_scale", cfg.channel_scale), ("channel_class", cfg.channel_class)):
        if vec is not None and len(vec) != hidden:
            raise SplitLLMError(f"codec {name} has {len(vec)} entries, the input {hidden} channels")
    tau = cfg.tau if cfg.tau is not None else calibrate_tau(x32, cfg.tau_quantile)
    sparse, below = split_threshold(x32, tau)
    if cfg._scale is not None:
        below = below / cfg._scale                                        # [tokens, hidden]
    rotated = cfg.rotation_seed is not None
    if rotated:
        if not rotation_supported(hidden):
            raise SplitLLMError(f"codec rotation does not support hidden size {hidden}")
        with np.errstate(over="ignore", invalid="ignore"):
            below = rotate(below, cfg.rotation_seed)                       # [tokens, hidden]
        if not np.isfinite(below).all():
            raise SplitLLMError("codec input is too large to rotate in float32 (values near 3e38 below tau); "
                                "use a finite tau or rotation none")
    tq = tab_q(below, cfg.q_bar, cfg.q_min, cfg.delta)

    raw_bits = x.view(_BITS_VIEW[x.dtype]).numpy()
    values = raw_bits[sparse.rows, sparse.cols.astype(np.intp)].astype(_DTYPES[_DTYPE_CODES[x.dtype]][1])

    body = encode_body(tq.symbols, tq.widths, cfg._class_cols, cfg.entropy, cfg._static)

    has_zeros = bool(tq.zeros.any())
    flags = (FLAG_RANS if body.mode != MODE_RAW else 0) | (FLAG_ZEROS if has_zeros else 0) | \
        (FLAG_CHANNEL_SCALE if cfg._scale is not None else 0) | \
        (FLAG_CHANNEL_CLASS if cfg._class_cols is not None else 0) | \
        (FLAG_CLASS_MODELS if body.mode == MODE_RANS_CLASSES else 0) | \
        (FLAG_STATIC_MODEL if body.mode == MODE_RANS_STATIC else 0) | (FLAG_ROTATION if rotated else 0)
    version = 3 if rotated else 2        # see the module docstring: v2 frames stay v2
    compact = tokens == 1 and len(body.body) <= 0xFFFF
    if compact:
        header = _COMPACT.pack(MAGIC, version, _DTYPE_CODES[x.dtype], flags | FLAG_COMPACT, cfg.q_bar,
                               cfg.q_min, hidden, int(sparse.cols.size), len(body.body))
    else:
        header = _HEADER.pack(MAGIC, version, _DTYPE_CODES[x.dtype], flags, cfg.q_bar, cfg.q_min, 0,
                              tokens, hidden, tau, cfg.delta, int(sparse.cols.size), len(body.body))
    if cfg._scale is not None:
        header += _CRC.pack(cfg._scale_crc)
    if cfg._class_cols is not None:
        header += _CRC.pack(cfg._class_crc)
    if body.mode == MODE_RANS_STATIC:
        header += _CRC.pack(cfg._static_crc)
    if rotated:
        header += _CRC.pack(cfg.rotation_seed)     # a u32 like the crcs
    meta = tq.widths.tobytes() + tq.scales.astype("<f4").tobytes() + \
        (tq.zeros.astype("<i4").tobytes() if has_zeros else b"")
    counts = b"" if compact else sparse.counts.astype("<u2").tobytes()
    sparse_blob = counts + sparse.cols.astype("<u2").tobytes() + values.tobytes()
    payload = b"".join((header, meta, sparse_blob, body.models, body.body))
    frame = payload + _CRC.pack(zlib.crc32(payload))
    stats = CodecStats(frame_bytes=len(frame), tokens=tokens, hidden=hidden, n_outliers=int(sparse.cols.size),
                       path=_PATHS[body.mode], meta_bytes=len(header) + len(meta) + _CRC.size,
                       sparse_bytes=len(sparse_blob), model_bytes=len(body.models), body_bytes=len(body.body),
                       entropy_bits=body.entropy_bits,
                       mean_width=float(tq.widths.mean()) if tokens else 0.0,
                       max_distortion=float(tq.distortion.max()) if tokens else 0.0, tau=float(tau))
    return frame, stats


def encode(x, cfg: CodecConfig) -> bytes:
    """Encode x [tokens, hidden] into a frame (bytes)."""
    return encode_with_stats(x, cfg)[0]


class _Reader:
    """Bounds-checked cursor: every read is validated against the frame before it is made."""

    def __init__(self, buf: memoryview, end: int):
        self.buf, self.pos, self.end = buf, 0, end

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.end:
            raise FrameError(f"codec frame is truncated: {what} needs {n} bytes, "
                             f"{self.end - self.pos} left")
        view = self.buf[self.pos:self.pos + n]
        self.pos += n
        return view

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        dt = np.dtype(dtype)
        return np.frombuffer(self.take(count * dt.itemsize, what), dt)


def _saturate(below: np.ndarray, limit: float) -> np.ndarray:
    """below [tokens, hidden] float32 with NaN -> 0 and everything else clipped to [-limit, limit],
    in place. Eq. 7 can land past the dtype's range when a token's max is near it (the zero
    point's rounding adds up to s/2; an fp16 input at 65504 would turn inf in the cast); the true
    value was finite, so saturating only reduces error. NaN cannot arise from a valid frame (a
    forged scale can make inf - inf in the unrotation). One check on the per-token path: the max
    of |below| is NaN if any entry is (np.max propagates NaN) and NaN <= limit is False, so this
    also catches NaN and +-inf."""
    if below.size == 0 or np.abs(below).max() <= limit:
        return below
    np.nan_to_num(below, copy=False, nan=0.0)
    return np.clip(below, -limit, limit, out=below)


def decode(frame: bytes, cfg: CodecConfig | None = None, *, max_tokens: int = DEFAULT_MAX_TOKENS,
           max_hidden: int = MAX_HIDDEN, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """Decode a frame into a tensor [tokens, hidden] of the encoded dtype.

    `cfg` is needed only for frames encoded with per-channel calibration (channel_scale or
    channel_class): it must carry the same vectors (checked by crc32). Every length and count is
    checked against the frame and against the caps before anything is allocated; any invalid
    frame raises `FrameError` and nothing else."""
    if cfg is not None and not isinstance(cfg, CodecConfig):
        raise FrameError(f"decode's cfg must be a CodecConfig, got {type(cfg).__name__}")
    try:
        return _decode(frame, cfg, max_tokens, max_hidden, max_elements)
    except FrameError:
        raise
    except (ValueError, TypeError, OverflowError, struct.error, MemoryError) as exc:
        # constriction and decode_body report invalid streams as ValueError; anything else here
        # is a frame this function failed to vet, and it still must not escape as another type.
        raise FrameError(f"codec frame is invalid: {exc}") from exc


def _check_calibration(rd: _Reader, present: bool, crc_expected: int | None, size: int | None,
                       hidden: int, what: str) -> None:
    if present:
        (crc,) = _CRC.unpack(rd.take(_CRC.size, f"{what} crc"))
        if crc_expected is None:
            raise FrameError(f"codec frame was encoded with a {what}; decode needs the same config")
        if crc != crc_expected or size != hidden:
            raise FrameError(f"codec frame's {what} does not match the config given to decode")


def _decode(frame: bytes, cfg: CodecConfig | None, max_tokens: int, max_hidden: int, max_elements: int) -> torch.Tensor:
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise FrameError(f"codec frame must be bytes, got {type(frame).__name__}")
    buf = memoryview(frame).cast("B")
    if len(buf) < _COMPACT.size + _CRC.size:
        raise FrameError(f"codec frame is truncated: {len(buf)} bytes is shorter than a header")
    end = len(buf) - _CRC.size
    if zlib.crc32(buf[:end]) != _CRC.unpack_from(buf, end)[0]:
        raise FrameError("codec frame checksum mismatch (corrupted or truncated)")
    rd = _Reader(buf, end)
    compact = bool(_PREFIX.unpack_from(buf)[3] & FLAG_COMPACT)
    if compact:
        (magic, version, dtype_code, flags, q_bar, q_min, hidden, n_outliers,
         body_len) = _COMPACT.unpack(rd.take(_COMPACT.size, "header"))
        tokens, reserved = 1, 0
    else:
        (magic, version, dtype_code, flags, q_bar, q_min, reserved, tokens, hidden, _tau, _delta,
         n_outliers, body_len) = _HEADER.unpack(rd.take(_HEADER.size, "header"))
    if magic != MAGIC:
        raise FrameError("not a codec frame (bad magic)")
    if version == 4:
        raise FrameError("codec frame version 4 is a token-predictive frame: decode it with "
                         "splitcli.codec.predictive and the codec it was encoded with")
    if version not in _KNOWN_FLAGS:
        raise FrameError(f"codec frame version {version} is not supported (this build reads 2..{FORMAT_VERSION})")
    if dtype_code not in _DTYPES or flags & ~_KNOWN_FLAGS[version] or reserved != 0:
        raise FrameError("codec frame header has an unknown dtype or flag")
    if not MIN_Q <= q_min <= q_bar <= MAX_Q_BAR:
        raise FrameError(f"codec frame has invalid bit widths q_min={q_min} q_bar={q_bar}")
    if tokens > max_tokens or hidden > min(max_hidden, MAX_HIDDEN) or tokens * hidden > max_elements:
        raise FrameError(f"codec frame shape [{tokens}, {hidden}] exceeds the decoder's caps")
    if n_outliers > tokens * hidden:
        raise FrameError("codec frame claims more outliers than entries")
    scale = cfg._scale if cfg is not None else None
    class_cols = cfg._class_cols if cfg is not None else None
    _check_calibration(rd, bool(flags & FLAG_CHANNEL_SCALE), cfg._scale_crc if scale is not None else None,
                       scale.size if scale is not None else None, hidden, "channel scale")
    _check_calibration(rd, bool(flags & FLAG_CHANNEL_CLASS), cfg._class_crc if class_cols is not None else None,
                       len(cfg.channel_class) if class_cols is not None else None, hidden, "channel class")
    static = cfg._static if cfg is not None else None
    if flags & FLAG_STATIC_MODEL:
        (crc,) = _CRC.unpack(rd.take(_CRC.size, "symbol model crc"))
        if static is None or crc != cfg._static_crc or (cfg.q_min, cfg.q_bar) != (q_min, q_bar):
            raise FrameError("codec frame needs the config's static symbol model, which does not match")
    if flags & FLAG_CLASS_MODELS and not (flags & FLAG_CHANNEL_CLASS and flags & FLAG_RANS):
        raise FrameError("codec frame has per-class models without channel classes")
    if flags & FLAG_STATIC_MODEL and (flags & FLAG_CLASS_MODELS or not flags & FLAG_RANS):
        raise FrameError("codec frame combines a static model with another model path")
    seed = None
    if flags & FLAG_ROTATION:
        (seed,) = _CRC.unpack(rd.take(_CRC.size, "rotation seed"))
        if not rotation_supported(hidden):
            raise FrameError(f"codec frame is rotated at hidden size {hidden}, which rotation does not support")
    elif version == 3:
        raise FrameError("codec frame version 3 without its rotation flag")
    torch_dtype, bits_dtype = _DTYPES[dtype_code]
    has_zeros = bool(flags & FLAG_ZEROS)
    fixed = tokens * (1 + 4 + (4 if has_zeros else 0) + (0 if compact else 2)) + n_outliers * (2 + bits_dtype.itemsize)
    if fixed + body_len > end - rd.pos:
        raise FrameError("codec frame is shorter than its header says")

    widths = rd.array("u1", tokens, "widths")
    scales = rd.array("<f4", tokens, "scales")
    zeros = rd.array("<i4", tokens, "zeros") if has_zeros else np.zeros(tokens, np.int32)
    if tokens and (widths.min() < q_min or widths.max() > q_bar):
        raise FrameError("codec frame has a token width outside [q_min, q_bar]")
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise FrameError("codec frame has a negative or non-finite scale")
    if tokens and (zeros.max() > 0 or zeros.min() < -_MAX_ABS_ZERO):
        raise FrameError("codec frame has an out-of-range zero point")
    counts = np.array([n_outliers], np.int64) if compact else rd.array("<u2", tokens, "sparse row counts")
    cols = rd.array("<u2", n_outliers, "sparse columns")
    values = rd.array(bits_dtype.str, n_outliers, "sparse values")
    if int(counts.sum(dtype=np.int64)) != n_outliers or (tokens and counts.max() > hidden):
        raise FrameError("codec frame sparse row counts do not match its outlier count")
    rows = np.repeat(np.arange(tokens), counts)
    if n_outliers and cols.max() >= hidden:
        raise FrameError("codec frame has a sparse column outside the hidden size")
    if n_outliers > 1 and not (np.diff(rows * (hidden + 1) + cols.astype(np.int64)) > 0).all():
        raise FrameError("codec frame sparse columns are not strictly ascending within a row")

    mode = (MODE_RAW if not flags & FLAG_RANS else MODE_RANS_CLASSES if flags & FLAG_CLASS_MODELS
            else MODE_RANS_STATIC if flags & FLAG_STATIC_MODEL else MODE_RANS)
    symbols = decode_body(rd, mode, widths, hidden, class_cols, body_len, static)   # [tokens, hidden]
    if rd.pos != end:
        raise FrameError(f"codec frame has {end - rd.pos} unexpected trailing bytes")
    with np.errstate(over="ignore", invalid="ignore"):
        below = reconstruct(symbols, widths, scales, zeros)              # [tokens, hidden]
        if seed is not None:
            below = unrotate(below, seed)
        if flags & FLAG_CHANNEL_SCALE:
            below *= scale
    out = torch.from_numpy(_saturate(below, _FINITE_MAX[torch_dtype])).to(torch_dtype)
    if n_outliers:
        exact = torch.from_numpy(values.astype(bits_dtype.newbyteorder("=")).view(
            np.int32 if bits_dtype.itemsize == 4 else np.int16).copy()).view(torch_dtype)
        out[torch.from_numpy(rows), torch.from_numpy(cols.astype(np.int64))] = exact
    return out
