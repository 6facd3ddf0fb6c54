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


_RAW_MAGIC = b"SRAW"
_RAW_HEADER = struct.Struct("<4sBII")  # magic, dtype code, tokens, hidden
_RAW_DTYPES = {0: np.float32, 1: np.float16}
_MAX_ELEMENTS = 1 << 28  # 1 GiB of fp32: refuse anything larger before allocating


class RawWire:
    """Uncompressed hidden states in fp32 (exact) or fp16."""

    def __init__(self, dtype: str = "fp32"):
        if dtype not in ("fp32", "fp16"):
            raise SplitLLMError(f"raw wire dtype must be fp32 or fp16, got {dtype!r}")
        self.name = f"raw-{dtype}"
        self._code = 0 if dtype == "fp32" else 1

    def encode(self, hidden: torch.Tensor) -> bytes:
        n, h = hidden.shape
        arr = hidden.detach().to(torch.float32).cpu().numpy().astype(_RAW_DTYPES[self._code], copy=False)
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
        return torch.from_numpy(arr.astype(np.float32))
