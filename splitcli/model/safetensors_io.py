"""A strict, copy-once reader for .safetensors files (and the payload arithmetic the shards use).

Why not `safetensors.torch.load_file`: it memory-maps the file and copies every tensor out of the
mapping, so while a shard loads its bytes are resident twice (the mapped pages count in RSS),
which would make the edge's peak memory twice its weights. Here each tensor is read straight
into its own freshly allocated buffer with `readinto`, so the peak is the weights themselves.
The reader also checks what a truncated or foreign file would get wrong (header bounds, offsets
that tile the payload exactly, the file size) and turns every failure into a SplitLLMError.

File layout (the safetensors spec): u64 little-endian header length N, N bytes of JSON header
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the payload;
offsets are relative to the payload's start.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from ..errors import SplitLLMError

DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64,
}
_MAX_HEADER = 100 << 20  # the spec's own limit


def read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries, metadata, payload start) of a safetensors file, validated against its size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SplitLLMError(f"{path} is truncated: {size} bytes, not even a header length")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise SplitLLMError(f"{path} is truncated or not a safetensors file (header of {n} bytes, file of {size})")
            raw = f.read(n)
    except OSError as e:
        raise SplitLLMError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SplitLLMError(f"{path} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise SplitLLMError(f"{path} has a corrupt safetensors header")
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    spans = []
    for name, e in header.items():
        try:
            dtype, shape, (b, end) = DTYPES[e["dtype"]], [int(s) for s in e["shape"]], e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SplitLLMError(f"{path}: tensor {name!r} has a malformed or unsupported header entry") from None
        want = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - b != want or b < 0:
            raise SplitLLMError(f"{path}: tensor {name!r} spans {end - b} bytes, its shape needs {want}")
        spans.append((b, end))
    spans.sort()
    pos = 0
    for b, end in spans:  # the payload must be tiled exactly, with no gaps or overlaps
        if b != pos:
            raise SplitLLMError(f"{path}: tensor data offsets do not tile the payload (gap or overlap at {pos})")
        pos = end
    if start + pos != size:
        what = "truncated" if start + pos > size else "longer than its header says"
        raise SplitLLMError(f"{path} is {what}: {size} bytes on disk, the header describes {start + pos}")
    return header, meta, start


def payload_bytes(path: Path) -> int:
    """Bytes of tensor data in the file (file size minus the header)."""
    entries, _, _ = read_header(path)
    return sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values())


def read_tensors(path: Path, names=None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors (all, or those in `names`) into fresh CPU memory, one copy each."""
    entries, meta, start = read_header(path)
    missing = [] if names is None else [k for k in names if k not in entries]
    if missing:
        raise SplitLLMError(f"{path} lacks tensor(s) {missing[:3]}")
    wanted = sorted(entries if names is None else names, key=lambda k: entries[k]["data_offsets"][0])
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        for name in wanted:
            e = entries[name]
            b, end = e["data_offsets"]
            buf = torch.empty(end - b, dtype=torch.uint8)
            f.seek(start + b)
            if end > b and f.readinto(buf.numpy()) != end - b:
                raise SplitLLMError(f"{path} is truncated inside tensor {name!r}")
            out[name] = buf.view(DTYPES[e["dtype"]]).reshape(e["shape"])
    return out, meta
