"""splitllm's own 4- and 8-bit weight kernels for x86-64 CPUs with AVX2 + FMA (`kernels.c`).

Why: torch's CPU int4 and int8 kernels are compute-bound on AVX2 (2.7 and ~7 GB/s of weights on a
Zen 3 core that streams 10+), so a quantized edge barely beats a float one there. These kernels
widen the codes to int16 and use vpmaddwd against the input rounded to int16 per group of inputs:
at one token 2.2-2.8x torch's int4 kernel and ~2.5x its int8 one, and ~100x closer to the float
product of the dequantized weight (relative error ~3e-5 vs ~3e-3 for torch's bf16 input).

The C source ships with the package and is compiled once per source version with the system C
compiler into the user cache (`cache_root()/kernels`), then loaded with ctypes (which releases
the GIL during the call). Where that is impossible (no compiler, not x86-64, a CPU without AVX2,
`ATEN_CPU_CAPABILITY=default`, or `SPLITLLM_CPU_KERNELS=torch`) `available()` is False and
`Int4Linear` / `Int8Linear` stay on torch's kernels and the predictive codec's decode steps on its
float32 products; `why_unavailable()` says why.

4-bit layout (portable: the same bytes on every CPU; see kernels.c): packed [N, K/2] uint8, 64
codes per 32 bytes as 16 words of four nibbles (`pack4`); scales_and_zeros [N/4, K/G, 4, 2] bf16, the
(scale, zero) pairs of blocks of four rows (`block_pairs4`; N % 4 == 0). Groups must be a multiple of
64 codes (`supports4`); other group sizes stay on torch's kernel. `mm4(..., act_bits=8)` rounds a
one-token input to int8 instead of int16 (opt-in: faster, coarser; `ACT_BITS`).
8-bit: Int8Linear's own codes [N, K] int8 and scales [N] bf16, for K % 64 == 0 (`supports8`), one
token per call (`mm8`); a prefill stays on torch's int8 kernel.
fp16: float32 inputs against IEEE-half weights [N, K], K % 8 == 0, up to GEMV_MAX_TOKENS rows
(`mm16`): the predictive codec's decode-step products, whose float32 weights did not fit L2.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from splitcli.data import cache_root
from splitcli.errors import SplitLLMError

KERNEL_ENV = "SPLITLLM_CPU_KERNELS"  # "torch" keeps every Int4Linear / Int8Linear on torch's kernels
_SOURCE = Path(__file__).with_name("kernels.c")
_INCLUDED = (Path(__file__).with_name("decode_step.c"),)  # #included by kernels.c: part of the build's key
# -ffp-contract=off: the KV dequantizer must round as torch's separate mul and add do
_FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-shared", "-fPIC", "-std=c99")
_ABI = 11
#: Tokens per call up to which the 4-bit kernel runs; above, a prefill dequantizes rows in chunks
#: and multiplies in float (2x torch's int4 kernel at 64+ tokens here; the GEMV is 0.75x there).
#: The 8-bit kernel runs up to this many tokens too; above, torch's int8 kernel.
GEMV_MAX_TOKENS = 8
_CHUNK_BYTES = 4 << 20
#: Widths the 4-bit kernel rounds a one-token input to, per weight group: 16 (the default: 2^-16 of
#: the group's largest |x|) or 8 (opt-in, a plan's edge_act_bits: 2^-8, llama.cpp's Q8 inputs;
#: vpmaddubsw makes the product ~1.35x faster; +0.21% WikiText-2 perplexity on the int4 edge)
ACT_BITS = (16, 8)  # float rows dequantized at a time by a prefill

_lock = threading.Lock()
_state: dict = {"off": 0}  # "lib" -> ctypes.CDLL | None, "why" -> str; "off": depth of disabled()


def _cpu_ok() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    cap = torch.backends.cpu.get_cpu_capability()  # follows ATEN_CPU_CAPABILITY
    if cap not in ("AVX2", "AVX512"):
        return f"torch dispatches to {cap} on this CPU, not AVX2"
    try:  # torch's AVX2 implies FMA; F16C (the KV dequantizer) is asked of the CPU where Linux says
        flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("flags")), None)
    except OSError:
        flags = None
    missing = [f for f in ("avx2", "fma", "f16c") if flags is not None and f not in flags]
    return f"the CPU lacks {', '.join(missing)}" if missing else None


def _build(dest: Path) -> None:
    cc = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not cc[0]:
        raise OSError("no C compiler (cc / gcc) on PATH")
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        r = subprocess.run([*cc, *_FLAGS, "-o", tmp, str(_SOURCE), "-lm"], capture_output=True, text=True,
                           timeout=120)
        if r.returncode != 0:
            lines = (r.stderr or r.stdout).strip().splitlines()
            first = next((ln for ln in lines if "error" in ln), lines[0] if lines else f"exit {r.returncode}")
            raise OSError(f"{' '.join(cc)} failed: {first.strip()}")
        os.replace(tmp, dest)  # atomic: processes building at once each install a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    # other versions' builds left for a week: best effort, and not sooner, since two installed
    # versions sharing a cache would otherwise delete each other's builds at every start
    for old in dest.parent.glob("kernels-*.so"):
        with contextlib.suppress(OSError):
            if old != dest and time.time() - old.stat().st_mtime > 7 * 86400:
                old.unlink()


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    try:
        abi = lib.splitllm_abi()
    except AttributeError:
        raise OSError(f"{path.name} has no splitllm_abi") from None
    if abi != _ABI:
        raise OSError(f"{path.name} holds ABI {abi}, this version needs {_ABI}")
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.splitllm_q4_gemv.argtypes = [p, i64, i64, p, p, i64, i64, i64, p, p]
    lib.splitllm_q4_gemv.restype = i64  # mask of tokens left to the float path
    lib.splitllm_q4_dequant.argtypes = [p, p, i64, i64, i64, i64, p]
    lib.splitllm_q4_dequant.restype = None
    lib.splitllm_q8_gemv.argtypes = [p, i64, i64, p, p, i64, p, p]
    lib.splitllm_q8_gemv.restype = i64
    lib.splitllm_f16_gemv.argtypes = [p, i64, i64, p, p, i64, p]
    lib.splitllm_f16_gemv.restype = None
    lib.splitllm_kv8_dequant.argtypes = [p, i64, p, p, i64, i64, i64, i64, i64, p, i64]
    lib.splitllm_kv8_dequant.restype = None
    lib.splitllm_decode_scratch.argtypes = [p, i64, i64, i64, i64]
    lib.splitllm_decode_scratch.restype = i64
    lib.splitllm_decode_step.argtypes = [p, i64, p, i64, p, p, p, i64, p]
    lib.splitllm_decode_step.restype = i64  # 1: a quantized product left the token to float
    lib.splitllm_kv8_quantize_rows.argtypes = [p, i64, i64, i64, p, p, p]
    lib.splitllm_kv8_quantize_rows.restype = i64
    lib.splitllm_abs_stats.argtypes = [p, i64, p]
    lib.splitllm_abs_stats.restype = None
    lib.splitllm_exp.argtypes = [p, i64, p]
    lib.splitllm_exp.restype = None
    lib.splitllm_argmax.argtypes = [p, i64]
    lib.splitllm_argmax.restype = i64
    f32 = ctypes.c_float
    lib.splitllm_screen_keep.argtypes = [p, p, p, i64, f32, f32, f32, f32, p, p, i64, p]
    lib.splitllm_screen_keep.restype = i64
    return lib


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get(KERNEL_ENV, "").strip().lower() == "torch":
        return None, f"{KERNEL_ENV}=torch"
    why = _cpu_ok()
    if why is not None:
        return None, why
    try:
        source = b"".join(f.read_bytes() for f in (_SOURCE, *_INCLUDED))
        key = hashlib.sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:16]
        path = cache_root() / "kernels" / f"kernels-{key}.so"
        if not path.exists():
            _build(path)
        try:
            return _open(path), ""
        except OSError:  # a damaged or foreign file under our name: build it again, once
            _build(path)
            # dlopen hands back the object it already holds under a name it has loaded, even
            # after the file was replaced: load the new build through a name of its own
            fresh = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.load")
            os.link(path, fresh)
            try:
                return _open(fresh), ""
            finally:
                fresh.unlink()
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:  # RuntimeError: no home directory
        return None, f"could not build or load splitllm's CPU kernels: {e}"


def _lib() -> ctypes.CDLL | None:
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib, _state["why"] = _load()
                _state["lib"] = lib  # last: a reader that sees "lib" finds "why" too
    return _state["lib"]


def _need() -> ctypes.CDLL:
    lib = _lib()
    if lib is None:  # e.g. a module of this layout unpickled where the kernels cannot run
        raise SplitLLMError(f"splitllm's CPU kernels are not available here: {_state['why']}")
    return lib


def available() -> bool:
    """Whether Int4Linear / Int8Linear modules built now run on these kernels (decided once per
    process, and False inside `disabled()`)."""
    return _lib() is not None and not _state["off"]


#: torch threads up to which splitllm's kernels (one thread per product) are chosen. Measured with
#: `bench decode` on a 2-core Zen 3: at 1 thread the int4 / int8 edges ran 1.24x / 1.09x the fp32
#: split against torch's kernels' 1.10x / 1.01x; at 2 threads 1.26x / 1.09x against 1.27x / 1.18x.
INT4_MAX_THREADS = 2  # a tie at 2; torch's kernel scales with more threads, this one does not
# torch's int8 kernel on 2 threads won the torch path's products by ~8%, but a one-token step in
# decode_step.c runs this kernel (up to model.fast.STEP_MAX_THREADS threads; the int8 edge step 5.7
# vs 16.0 ms at 2 threads there), and the eager and fast paths should round a product the same way
INT8_MAX_THREADS = 2


def use_for_int4() -> bool:
    """Whether an Int4Linear built now takes splitllm's layout: available, and torch runs on at
    most INT4_MAX_THREADS threads (the layout is fixed at construction)."""
    return available() and torch.get_num_threads() <= INT4_MAX_THREADS


def use_for_int8(tokens: int) -> bool:
    """Whether an Int8Linear's product of `tokens` tokens runs here now: at most GEMV_MAX_TOKENS,
    and torch on at most INT8_MAX_THREADS threads (asked per call: the operands are torch's own,
    so the kernel can follow the thread setting). The caller knows its module has `gemv`."""
    return tokens <= GEMV_MAX_TOKENS and torch.get_num_threads() <= INT8_MAX_THREADS


@contextlib.contextmanager
def disabled():
    """Int4Linear / Int8Linear modules built inside run on torch's kernels (bench decode times
    both). Modules built before keep theirs: the choice is made at construction. Process-wide,
    not per thread."""
    with _lock:
        _state["off"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["off"] -= 1


def why_unavailable() -> str:
    """'' when `available()`, else the reason in a few words (for bench and profile output)."""
    _lib()
    return _state["why"]


def supports4(in_features: int, group_size: int) -> bool:
    """Whether this kernel's layout holds the shape: whole 64-code runs inside each group."""
    return group_size % 64 == 0 and 0 < group_size <= 4096 and in_features > 0 and in_features % group_size == 0


def pack4(q: torch.Tensor) -> torch.Tensor:
    """Codes q [N, K] (0..15, K % 64 == 0) -> packed [N, K/2] uint8 in this kernel's layout: each run
    of 64 codes as 16 little-endian words, word w holding codes w, 16 + w, 32 + w, 48 + w in its
    nibbles 0..3."""
    n, k = q.shape
    runs = q.to(torch.uint8).reshape(n, k // 64, 4, 16)  # [N, K/64, nibble, word]
    lo, hi = runs[:, :, 0] | runs[:, :, 1] << 4, runs[:, :, 2] | runs[:, :, 3] << 4  # each word's two bytes
    return torch.stack([lo, hi], -1).reshape(n, k // 2).contiguous()


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack4`: [N, K/2] uint8 -> codes [N, K] uint8 (exact; needs no kernel)."""
    n, half = packed.shape
    b = packed.reshape(n, half // 32, 16, 2)  # [N, K/64, word, (low byte, high byte)]
    lo, hi = b[..., 0], b[..., 1]
    codes = torch.stack([lo & 15, lo >> 4, hi & 15, hi >> 4], 2)  # [N, K/64, nibble, word]
    return codes.reshape(n, half * 2)


def block_pairs4(sz: torch.Tensor) -> torch.Tensor:
    """(scale, zero) pairs [N, K/G, 2] (N % 4 == 0) -> this kernel's [N/4, K/G, 4, 2]: a block of
    four rows reads its pairs of a group with one load."""
    if sz.dim() != 3 or sz.shape[0] % 4 or sz.shape[2] != 2:
        raise SplitLLMError(f"4-bit kernel: (scale, zero) pairs {tuple(sz.shape)} need [N, groups, 2] with N % 4 == 0")
    n, ng, _ = sz.shape
    return sz.reshape(n // 4, 4, ng, 2).transpose(1, 2).contiguous()


def unblock_pairs4(sz: torch.Tensor) -> torch.Tensor:
    """Inverse of `block_pairs4`: [N/4, K/G, 4, 2] -> [N, K/G, 2]."""
    if sz.dim() != 4 or tuple(sz.shape[2:]) != (4, 2):
        raise SplitLLMError(f"4-bit kernel: blocked (scale, zero) pairs {tuple(sz.shape)} are not [N/4, groups, 4, 2]")
    b, ng = sz.shape[:2]
    return sz.transpose(1, 2).reshape(b * 4, ng, 2)


def check_operands4(in_features: int, packed: torch.Tensor, sz: torch.Tensor, group_size: int) -> None:
    """Raise SplitLLMError unless (packed, sz) are this layout's tensors for `in_features` inputs:
    the C code trusts every size it is given, so nothing else may reach it."""
    n = packed.shape[0] if packed.dim() == 2 else -1
    ok = (supports4(in_features, group_size) and packed.dtype == torch.uint8 and sz.dtype == torch.bfloat16
          and n % 4 == 0 and tuple(packed.shape) == (n, in_features // 2)
          and tuple(sz.shape) == (n // 4, in_features // group_size, 4, 2)
          and packed.is_contiguous() and sz.is_contiguous() and packed.device.type == sz.device.type == "cpu")
    if not ok:
        raise SplitLLMError(
            f"4-bit kernel operands do not fit: packed {tuple(packed.shape)} {packed.dtype}, scales_and_zeros "
            f"{tuple(sz.shape)} {sz.dtype} for {in_features} inputs in groups of {group_size} (want contiguous "
            f"[N, {in_features // 2}] uint8 with N % 4 == 0 and [N/4, {in_features // max(group_size, 1)}, 4, 2] "
            f"bfloat16)")


def _cpu_input(x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu" or x.layout != torch.strided or x.dim() != 2:
        raise SplitLLMError(f"splitllm's CPU kernels take a 2-D strided CPU input, got {x.dim()}-D {x.layout} "
                            f"on {x.device}")
    return x.to(torch.float32).contiguous()


def _chunk_rows(n: int, k: int) -> int:
    """Weight rows of width k dequantized to float at a time (at most _CHUNK_BYTES, at least one)."""
    return max(1, min(n, _CHUNK_BYTES // (4 * k)))


def _left_rows(left: int, m: int) -> list[int]:
    return [i for i in range(m) if left >> i & 1]


def _float_rows(y: torch.Tensor, left: int, product) -> None:
    """Rows of y the C code left (NaN / inf / extreme magnitudes), each as a float product of its
    own: one at a time, so a row's value does not depend on how many others fell back."""
    for i in _left_rows(left, y.shape[0]):
        y[i : i + 1] = product(i)


def mm4(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int,
        act_bits: int = 16) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] float32, W given as (packed [N, K/2], sz [N/4, K/G, 4, 2] bf16:
    `pack4`, `block_pairs4`), both contiguous. Only when `available()`. act_bits: the width the
    one-token kernel rounds x to per weight group (16, or 8: `ACT_BITS`); a prefill is float."""
    if act_bits not in ACT_BITS:
        raise SplitLLMError(f"4-bit kernel input bits must be one of {ACT_BITS}, got {act_bits!r}")
    x = _cpu_input(x)
    m, k = x.shape
    check_operands4(k, packed, sz, group_size)
    lib = _need()
    n = packed.shape[0]
    y = torch.empty(m, n, dtype=torch.float32)
    if m == 0:
        return y
    if m <= GEMV_MAX_TOKENS:
        scratch = torch.empty(m * k * 2 + 8 * m * (k // group_size), dtype=torch.uint8)
        left = lib.splitllm_q4_gemv(x.data_ptr(), m, k, packed.data_ptr(), sz.data_ptr(), n, group_size,
                                    int(act_bits == 8), scratch.data_ptr(), y.data_ptr())
        _float_rows(y, left, lambda i: _float_product(lib, x[i : i + 1], packed, sz, group_size))
        return y
    return _float_product(lib, x, packed, sz, group_size, y)


def _float_product(lib, x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int,
                   y: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W.T in float32 (W dequantized in chunks of rows), into y [M, N] if given."""
    m, k = x.shape
    n = packed.shape[0]
    if y is None:
        y = torch.empty(m, n, dtype=torch.float32)
    rows = _chunk_rows(n, k)
    w = torch.empty(rows, k, dtype=torch.float32)  # [rows, K] scratch, reused per chunk
    yt = y.t()  # [N, M] view: each chunk of rows is assigned into it
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        lib.splitllm_q4_dequant(packed.data_ptr(), sz.data_ptr(), k, group_size, n0, n1, w.data_ptr())
        yt[n0:n1] = w[: n1 - n0] @ x.t()
    return y


def supports8(in_features: int) -> bool:
    """Whether `mm8` takes this input width: whole groups of 64 inputs."""
    return in_features > 0 and in_features % 64 == 0


def operands8_fit(in_features: int, codes: torch.Tensor, scales: torch.Tensor) -> bool:
    """Whether (codes, scales) are the 8-bit kernel's operands for `in_features` inputs: contiguous
    [N, K] int8 and [N] bf16 on the CPU, K % 64 == 0 (the C code trusts every size it is given)."""
    n = codes.shape[0] if codes.dim() == 2 else -1
    return (supports8(in_features) and codes.dtype == torch.int8 and scales.dtype == torch.bfloat16
            and tuple(codes.shape) == (n, in_features) and tuple(scales.shape) == (n,) and codes.is_contiguous()
            and scales.is_contiguous() and codes.device.type == scales.device.type == "cpu")


def _q8_call(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The checked C call behind `mm8` and `mm8_screen`: (x as float32 [M, K], y [M, N] with the
    rows the C code computed, mask of the rows it left to float)."""
    x = _cpu_input(x)
    m, k = x.shape
    n = codes.shape[0] if codes.dim() == 2 else -1
    if not (m <= GEMV_MAX_TOKENS and operands8_fit(k, codes, scales)):
        raise SplitLLMError(
            f"8-bit kernel operands do not fit: x {tuple(x.shape)}, codes {tuple(codes.shape)} {codes.dtype}, scales "
            f"{tuple(scales.shape)} {scales.dtype} (want at most {GEMV_MAX_TOKENS} tokens of a width divisible by "
            f"64, contiguous [N, K] int8 and [N] bfloat16)")
    lib = _need()
    y = torch.empty(m, n, dtype=torch.float32)
    if m == 0:
        return x, y, 0
    scratch = torch.empty(k * 2 + 8 * (k // 64), dtype=torch.uint8)
    left = lib.splitllm_q8_gemv(x.data_ptr(), m, k, codes.data_ptr(), scales.data_ptr(), n, scratch.data_ptr(),
                                y.data_ptr())
    return x, y, left


def mm8(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (codes [N, K] int8 * scales [N, 1] bf16).T -> [M, N] float32, M <= GEMV_MAX_TOKENS.
    Only when `available()`."""
    x, y, left = _q8_call(x, codes, scales)
    n, k = y.shape[1], x.shape[1]
    rows = _chunk_rows(n, k)

    def product(i: int) -> torch.Tensor:
        return torch.cat([x[i : i + 1] @ (codes[r : r + rows].to(torch.float32)
                                          * scales[r : r + rows].to(torch.float32)[:, None]).t()
                          for r in range(0, n, rows)], 1)

    _float_rows(y, left, product)
    return y


def mm8_screen(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """`mm8` of one token x [K] -> [N], or None where the C code leaves x to float (NaN, inf,
    magnitudes past 1e30 or below 1e-30): a screen then computes its float product itself rather
    than this one of the dequantized copy. Only when `available()`."""
    _, y, left = _q8_call(x.reshape(1, -1), codes, scales)
    return None if left else y[0]


def supports16(in_features: int) -> bool:
    """Whether `mm16` takes this input width: whole runs of 8 inputs."""
    return in_features > 0 and in_features % 8 == 0


def mm16(x: torch.Tensor, w16: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w16.T (+ bias) -> [M, N] float32, for w16 [N, K] float16 and bias [N] float32,
    M <= GEMV_MAX_TOKENS, K % 8 == 0 (products and sums in float32). Only when `available()`."""
    x = _cpu_input(x)
    m, k = x.shape
    n = w16.shape[0] if w16.dim() == 2 else -1
    fits = (m <= GEMV_MAX_TOKENS and supports16(k) and w16.dtype == torch.float16 and tuple(w16.shape) == (n, k)
            and w16.is_contiguous() and w16.device.type == "cpu"
            and (bias is None or (bias.dtype == torch.float32 and tuple(bias.shape) == (n,) and bias.is_contiguous()
                                  and bias.device.type == "cpu")))
    if not fits:
        raise SplitLLMError(
            f"fp16 kernel operands do not fit: x {tuple(x.shape)}, weight {tuple(w16.shape)} {w16.dtype}, bias "
            f"{None if bias is None else (tuple(bias.shape), bias.dtype)} (want at most {GEMV_MAX_TOKENS} rows of a "
            "width divisible by 8, a contiguous [N, K] float16 weight and a [N] float32 bias)")
    lib = _need()
    y = torch.empty(m, n, dtype=torch.float32)
    if m and n:
        lib.splitllm_f16_gemv(x.data_ptr(), m, k, w16.data_ptr(), None if bias is None else bias.data_ptr(), n,
                              y.data_ptr())
    return y


def abs_stats(x: torch.Tensor) -> tuple[float, float]:
    """(||x||_1, max |x|) of a contiguous float32 x [K] (the sum in double, rounded to float32)."""
    out = (ctypes.c_float * 2)()
    _need().splitllm_abs_stats(x.data_ptr(), x.numel(), out)
    return out[0], out[1]


def exp(x: torch.Tensor) -> torch.Tensor:
    """e^x of a contiguous float32 x as the decode step computes it for its softmax and SiLU
    (within 1 ulp of a correctly rounded exp; NaN, +-inf and the subnormal range as expf)."""
    y = torch.empty_like(x)
    _need().splitllm_exp(x.data_ptr(), x.numel(), y.data_ptr())
    return y


def argmax(s: torch.Tensor) -> int:
    """The first index of the largest value of a contiguous, finite float32 s [V], V >= 1."""
    return int(_need().splitllm_argmax(s.data_ptr(), s.numel()))


def screen_keep(s: torch.Tensor, a: torch.Tensor, b: torch.Tensor, l1: float, c: float, slack: float, tiny: float,
                r: torch.Tensor, m: torch.Tensor) -> torch.Tensor | None:
    """Int8Screen.top's row decisions (kernels.c, splitllm_screen_keep): the indices [C] of the rows
    j with s[j] + e[j] >= T, T from the computed rows' values r [k] and margins m [k]; s [V] is
    overwritten with -inf. None (s untouched) where T is not finite. All float32, contiguous."""
    v = s.numel()
    idx = torch.empty(v, dtype=torch.int64)
    r, m = r.contiguous(), m.contiguous()
    n = _need().splitllm_screen_keep(s.data_ptr(), a.data_ptr(), b.data_ptr(), v, l1, c, slack, tiny, r.data_ptr(),
                                     m.data_ptr(), r.numel(), idx.data_ptr())
    return None if n < 0 else idx[:n]


def kv8_dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, out: torch.Tensor) -> bool:
    """The 8-bit KV prefix (codes [..., T, D] uint8, scales / zeros [..., T, D/G] float16) into
    out [..., T, D] float32, bit for bit what `rtn.dequantize_groupwise(..., 8, out=out)` writes.
    Each may be a prefix view of a larger capacity: rows contiguous, the leading dims one uniform
    plane stride. Returns False (nothing written) where this kernel does not take the operands,
    and the caller dequantizes with torch."""
    lib = _lib()
    if lib is None or _state["off"] or codes.dim() < 2:
        return False
    *lead, t, d = codes.shape
    groups = scales.shape[-1]
    planes = 1
    for n in lead:
        planes *= n

    def plane_stride(x: torch.Tensor, width: int) -> int | None:
        """The stride between consecutive [T, width] planes when every leading dim steps by it."""
        if x.dim() != codes.dim() or x.device.type != "cpu" or x.stride(-1) != 1 or (t > 1 and x.stride(-2) != width):
            return None
        if not lead:
            return 0
        step = x.stride(-3)
        expect = step
        for i in range(x.dim() - 3, -1, -1):
            if x.shape[i] > 1 and x.stride(i) != expect:
                return None
            expect *= x.shape[i]
        return step

    ok = (codes.dtype == torch.uint8 and scales.dtype == zeros.dtype == torch.float16 and out.dtype == torch.float32
          and d > 0 and groups > 0 and d % groups == 0 and (d // groups) % 8 == 0 and tuple(scales.shape) == tuple(zeros.shape)
          and tuple(scales.shape[:-1]) == tuple(codes.shape[:-1]) and tuple(out.shape) == tuple(codes.shape))
    strides = [plane_stride(codes, d), plane_stride(scales, groups), plane_stride(zeros, groups), plane_stride(out, d)]
    if not ok or None in strides or strides[1] != strides[2]:
        return False
    if planes and t:
        lib.splitllm_kv8_dequant(codes.data_ptr(), strides[0], scales.data_ptr(), zeros.data_ptr(), strides[1],
                                 planes, t, d, d // groups, out.data_ptr(), strides[3])
    return True
