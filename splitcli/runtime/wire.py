"""What crosses the network between the edge and the cloud: hidden state [tokens, H] <-> bytes.

`RawWire` is the "compression off" path: the tensor's exact bytes plus a small header, so the
split run sees bit-identical hidden states. Compressing wires (the TAB-Q codec) implement the
same two methods.
"""

from __future__ import annotations

import struct
from typing import Protocol

import numpy as np
import torch

from ..errors import SplitLLMError


class Wire(Protocol):
    name: str

    def encode(self, hidden: torch.Tensor) -> bytes:  # [N, H] -> frame
        ...

    def decode(self, frame: bytes) -> torch.Tensor:  # frame -> [N, H] float32
        ...


def encode_step(wire, hidden: torch.Tensor, ids: torch.Tensor | None, prev_id: int | None) -> tuple[bytes, int | None]:
    """One step's frame of hidden [N, H], and the prev_id for the next step. A wire that codes
    against its tokens (`needs_ids`: the token-predictive one) gets the rows' ids [N] (any shape
    flattening to N) and the token before them (None: none); with no ids it says so itself. Other
    wires ignore both."""
    if not getattr(wire, "needs_ids", False):
        return wire.encode(hidden), prev_id
    flat = None if ids is None else ids.reshape(-1)
    frame = wire.encode(hidden, ids=flat, prev_id=prev_id)
    return frame, int(flat[-1]) if flat is not None and flat.numel() else prev_id


_RAW_MAGIC = b"SRAW"
_RAW_HEADER = struct.Struct("<4sBII")  # magic, dtype code, tokens, hidden
# bf16 travels as its raw 16-bit patterns (numpy has no bfloat16)
_RAW_DTYPES = {0: np.float32, 1: np.float16, 2: np.int16}
_CODES = {"fp32": 0, "fp16": 1, "bf16": 2}
_MAX_ELEMENTS = 1 << 28  # 1 GiB of fp32: refuse anything larger before allocating
FP16_MAX = 65504.0


class RawWire:
    """Uncompressed hidden states in fp32 (exact), fp16 or bf16.

    fp16 cannot hold |x| > 65,504, and some models' hidden states carry "massive activations"
    of 10^3-10^5 in a few channels: rather than send inf (and NaN logits on the cloud), the
    fp16 wire refuses such a tensor with a clear error. bf16 keeps fp32's range (8 bits of
    mantissa) and takes them as they are."""

    def __init__(self, dtype: str = "fp32"):
        if dtype not in _CODES:
            raise SplitLLMError(f"raw wire dtype must be one of {', '.join(_CODES)}, got {dtype!r}")
        self.name = f"raw-{dtype}"
        self._code = _CODES[dtype]

    def encode(self, hidden: torch.Tensor) -> bytes:
        n, h = hidden.shape
        x = hidden.detach().to(torch.float32).cpu()
        if self._code == 1:
            big = x.abs().masked_fill(~torch.isfinite(x), 0).amax() if x.numel() else torch.tensor(0.0)
            if float(big) > FP16_MAX:
                raise SplitLLMError(
                    f"the hidden state holds |x| = {float(big):.4g}, beyond fp16's {FP16_MAX:g}: the fp16 wire "
                    "would turn it into inf; use the bf16 or fp32 wire (or the tabq codec, which sends such "
                    "outliers exactly)")
        if self._code == 2:
            arr = x.to(torch.bfloat16).view(torch.int16).numpy()
        else:
            arr = x.numpy().astype(_RAW_DTYPES[self._code], copy=False)
        return _RAW_HEADER.pack(_RAW_MAGIC, self._code, n, h) + arr.tobytes()

    def decode(self, frame: bytes) -> torch.Tensor:
        if len(frame) < _RAW_HEADER.size:
            raise SplitLLMError("raw frame shorter than its header")
        magic, code, n, h = _RAW_HEADER.unpack_from(frame)
        if magic != _RAW_MAGIC or code not in _RAW_DTYPES:
            raise SplitLLMError("not a raw hidden-state frame")
        dtype = np.dtype(_RAW_DTYPES[code])
        if n * h > _MAX_ELEMENTS or len(frame) != _RAW_HEADER.size + n * h * dtype.itemsize:
            raise SplitLLMError("raw frame length does not match its header")
        arr = np.frombuffer(frame, dtype=dtype, offset=_RAW_HEADER.size).reshape(n, h)
        if code == 2:
            return torch.from_numpy(arr.copy()).view(torch.bfloat16).to(torch.float32)
        return torch.from_numpy(arr.astype(np.float32))
