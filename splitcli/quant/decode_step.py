"""One decode token through a run of Llama-style decoder layers in one C call (`decode_step.c`).

Why: at batch 1 the fast path's per-layer torch ops (SDPA ~110-125 µs for one query, ~30 small
ops more) cost as much as the products of a 4-bit edge; `decode_step.c` says what it computes and
in which order. This module only describes the operands: a `Product` per weight (float W^T
[K, N], splitllm's 4-bit layout or int8 codes), a `LayerOperands` per layer, and `DecodeStep`,
which holds them (their tensors stay alive with it) and runs a token. `model.fast` builds one where
every layer fits (`DecodeStep.build` says why not otherwise) and calls it for one token of batch 1
on a float cache or an 8-bit one with fp16 scales; everything else stays on the torch path.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from dataclasses import dataclass

import torch

from ..errors import SplitLLMError
from . import kernels

_FLOAT, _INT4, _INT8, _INT4_A8 = 0, 1, 2, 3
_off = [0]  # depth of disabled()
_off_lock = threading.Lock()


def enabled() -> bool:
    """False inside `disabled()`."""
    return not _off[0]


@contextlib.contextmanager
def disabled():
    """Every fast-path token runs on the torch path inside (bench decode times both; tests compare
    them). Process-wide, not per thread, like `kernels.disabled`."""
    with _off_lock:
        _off[0] += 1
    try:
        yield
    finally:
        with _off_lock:
            _off[0] -= 1


class _Prod(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("K", ctypes.c_int64), ("N", ctypes.c_int64), ("G", ctypes.c_int64),
                ("a", ctypes.c_void_p), ("b", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Prod), ("o", _Prod), ("gate_up", _Prod), ("down", _Prod),
                ("w_in", ctypes.c_void_p), ("w_post", ctypes.c_void_p),
                ("eps_in", ctypes.c_double), ("eps_post", ctypes.c_double), ("scaling", ctypes.c_double),
                ("n_heads", ctypes.c_int64), ("n_kv", ctypes.c_int64), ("head_dim", ctypes.c_int64),
                ("inter", ctypes.c_int64)]


class _Cache(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int64), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("codes", ctypes.c_void_p),
                ("scales", ctypes.c_void_p), ("zeros", ctypes.c_void_p), ("layer_stride", ctypes.c_int64),
                ("sz_layer_stride", ctypes.c_int64), ("cap", ctypes.c_int64), ("G", ctypes.c_int64)]


@dataclass(frozen=True)
class Product:
    """One weight as the C step reads it: kind 'float' (a = W^T [K, N] float32 contiguous, N % 16
    == 0), 'int4' (a = packed, b = scales_and_zeros in kernels.c's layout, group G) or 'int8'
    (a = codes [N, K], b = scales [N] bf16, K % 64 == 0). act_bits: the 4-bit product's input
    width (kernels.ACT_BITS), as Int4Linear.act_bits."""

    kind: str
    K: int
    N: int
    a: torch.Tensor
    b: torch.Tensor | None = None
    G: int = 0
    act_bits: int = 16

    def __post_init__(self):
        why = self.unfit()
        if why is not None:
            raise ValueError(f"decode step product: {why}")

    def unfit(self) -> str | None:
        a, b, k, n = self.a, self.b, self.K, self.N
        if self.kind == "float":
            ok = a.dtype == torch.float32 and tuple(a.shape) == (k, n) and a.is_contiguous() and n % 16 == 0 \
                and a.device.type == "cpu"
            return None if ok else f"float W^T must be contiguous [K, N] float32 with N % 16 == 0, got {tuple(a.shape)}"
        if self.kind == "int4":
            if self.act_bits not in kernels.ACT_BITS:
                return f"4-bit input bits must be one of {kernels.ACT_BITS}, got {self.act_bits!r}"
            try:
                kernels.check_operands4(k, a, b, self.G)
            except SplitLLMError as e:
                return str(e)
            return None if a.shape[0] == n else "int4 rows do not match N"
        if self.kind == "int8":
            ok = b is not None and a.dim() == 2 and a.shape[0] == n and kernels.operands8_fit(k, a, b)
            return None if ok else "int8 operands must be contiguous [N, K] int8 codes and [N] bf16 scales, K % 64 == 0"
        return f"unknown kind {self.kind!r}"

    def _c(self) -> _Prod:
        kind = {"float": _FLOAT, "int4": _INT4_A8 if self.act_bits == 8 else _INT4, "int8": _INT8}[self.kind]
        return _Prod(kind, self.K, self.N, self.G, self.a.data_ptr(), 0 if self.b is None else self.b.data_ptr())


@dataclass(frozen=True)
class LayerOperands:
    """A decoder layer for the C step: products q|k|v, o, gate|up, down; RMSNorm weights [H] and
    epsilons; heads. The MLP's activation is SiLU (the caller checks)."""

    qkv: Product
    o: Product
    gate_up: Product
    down: Product
    w_in: torch.Tensor
    w_post: torch.Tensor
    eps_in: float
    eps_post: float
    scaling: float
    n_heads: int
    n_kv: int
    head_dim: int

    def unfit(self, hidden: int) -> str | None:
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        inter = self.gate_up.N // 2
        if nh <= 0 or nkv <= 0 or nh % nkv or d <= 0 or d % 2:
            return f"heads {nh} / kv heads {nkv} / head dim {d}"
        shapes = [(self.qkv, hidden, (nh + 2 * nkv) * d), (self.o, nh * d, hidden), (self.gate_up, hidden, 2 * inter),
                  (self.down, inter, hidden)]
        if any(p.K != k or p.N != n for p, k, n in shapes):
            return "product shapes do not chain"
        for w in (self.w_in, self.w_post):
            if w.dtype != torch.float32 or tuple(w.shape) != (hidden,) or not w.is_contiguous() or \
                    w.device.type != "cpu":
                return "norm weights are not contiguous float32 [H] on the CPU"
        return None

    def _c(self) -> _Layer:
        return _Layer(self.qkv._c(), self.o._c(), self.gate_up._c(), self.down._c(), self.w_in.data_ptr(),
                      self.w_post.data_ptr(), self.eps_in, self.eps_post, self.scaling, self.n_heads, self.n_kv,
                      self.head_dim, self.gate_up.N // 2)


class DecodeStep:
    """Layers' operands bound for `decode_step.c`; call it for one token (see __call__)."""

    def __init__(self, layers: list[LayerOperands], hidden: int):
        """Raises ValueError where the layers do not fit the C code (which trusts every size)."""
        why = self.unfit(layers, hidden)
        if why is not None:
            raise ValueError(f"decode step: {why}")
        self.layers, self.hidden = layers, hidden  # the tensors behind the pointers stay alive here
        self._c = (_Layer * len(layers))(*[ly._c() for ly in layers])
        self._lib = kernels._need()

    @staticmethod
    def unfit(layers: list[LayerOperands], hidden: int) -> str | None:
        if not layers:
            return "no layers"
        for i, ly in enumerate(layers):
            why = ly.unfit(hidden)
            if why is None and (ly.n_kv, ly.head_dim) != (layers[0].n_kv, layers[0].head_dim):
                why = "kv heads / head dim differ from the first layer's (one cache holds them all)"
            if why is not None:
                return f"layer {i}: {why}"
        return None

    @classmethod
    def build(cls, layers: list[LayerOperands], hidden: int) -> tuple["DecodeStep | None", str]:
        """(step, '') or (None, why not)."""
        if not kernels.available():
            return None, kernels.why_unavailable() or "splitllm's kernels are disabled"
        why = cls.unfit(layers, hidden)
        return (None, why) if why is not None else (cls(layers, hidden), "")

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int, *, k=None, v=None,
                 codes=None, scales=None, zeros=None, group: int = 0) -> bool:
        """Run one token: x [H] float32 contiguous, updated in place; cos, sin [D] this position's
        rotary rows (sin with rotate_half's sign folded in); the cache, written at `pos`
        (positions [0, pos) are the prefix): a float one, k, v [layers, 1, n_kv, capacity, D]
        float32, or an 8-bit one, codes [layers, 2, 1, n_kv, capacity, D] uint8 and scales, zeros
        [layers, 2, 1, n_kv, capacity, D / group] float16 (QuantStaticKV), all contiguous. False:
        a quantized product or the 8-bit cache left the token to float, x and the cache hold
        partial results, and the caller must run the token again another way from a copy of its
        input."""
        n, nkv, d = len(self.layers), self.layers[0].n_kv, self.layers[0].head_dim
        ok = (x.dtype == torch.float32 and x.is_contiguous() and x.numel() == self.hidden and cos.is_contiguous()
              and sin.is_contiguous() and cos.dtype == sin.dtype == torch.float32 and cos.numel() == sin.numel() == d)
        ok = ok and x.device.type == cos.device.type == sin.device.type == "cpu"
        if k is not None:
            cap = k.shape[3] if k.dim() == 5 else 0
            ok = ok and isinstance(v, torch.Tensor) and all(
                t.dtype == torch.float32 and t.is_contiguous() and tuple(t.shape) == (n, 1, nkv, cap, d)
                and t.device.type == "cpu" for t in (k, v))
            c = _Cache(0, k.data_ptr(), v.data_ptr() if ok else 0, 0, 0, 0, k.stride(0), 0, cap, 0) if ok else None
        else:
            tensors = all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in (codes, scales, zeros))
            cap = codes.shape[4] if tensors and codes.dim() == 6 else 0
            ok = ok and tensors and group > 0 and group % 8 == 0 and d % group == 0 and codes.dtype == torch.uint8 \
                and codes.is_contiguous() and tuple(codes.shape) == (n, 2, 1, nkv, cap, d) and all(
                    t.dtype == torch.float16 and t.is_contiguous() and tuple(t.shape) == (n, 2, 1, nkv, cap, d // group)
                    for t in (scales, zeros))
            c = _Cache(1, 0, 0, codes.data_ptr(), scales.data_ptr(), zeros.data_ptr(), codes.stride(0),
                       scales.stride(0), cap, group) if ok else None
        if not ok or not 0 <= pos < cap:
            raise ValueError("decode step operands do not fit the layers")
        lib = self._lib
        scratch = torch.empty(lib.splitllm_decode_scratch(self._c, n, self.hidden, pos, c.kind), dtype=torch.float32)
        left = lib.splitllm_decode_step(self._c, n, x.data_ptr(), self.hidden, cos.data_ptr(), sin.data_ptr(),
                                        ctypes.byref(c), pos, scratch.data_ptr())
        return left == 0


def kv8_quantize_rows(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The C step's 8-bit KV quantizer on rows x [R, D] float32 (for tests against
    `rtn.quantize_kv`): (codes [R, D] uint8, scales, zeros [R, D / group] float16, rows left
    unwritten because they hold a non-finite value or would get a non-finite scale or zero)."""
    r, d = x.shape
    if x.dtype != torch.float32 or group <= 0 or d % group:
        raise ValueError("rows must be float32 [R, D] with D % group == 0")
    x = x.contiguous()
    q = torch.zeros(r, d, dtype=torch.uint8)
    s, z = torch.zeros(r, d // group, dtype=torch.float16), torch.zeros(r, d // group, dtype=torch.float16)
    left = kernels._need().splitllm_kv8_quantize_rows(x.data_ptr(), r, d, group, q.data_ptr(), s.data_ptr(),
                                                       z.data_ptr())
    return q, s, z, int(left)
