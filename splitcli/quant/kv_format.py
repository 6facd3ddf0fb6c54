"""Format and exact size of the quantized KV cache (paper eq. (2)); no transformers import, so
cost models and planners can use it cheaply. The cache itself lives in kv_cache.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitcli.errors import SplitLLMError
from splitcli.quant.rtn import check_group_size, packed_width

KV_FORMAT_VERSION = 1
SCALE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class KVQuantConfig:
    """Q_a and its layout. group_size None means one group per head (group = head_dim).

    fp16 scales/zeros are the default; float32 exists for models whose keys exceed fp16's range.
    """

    bits: int = 8
    group_size: int | None = None
    scale_dtype: str = "float16"
    version: int = KV_FORMAT_VERSION

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise SplitLLMError(f"KV cache bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            raise SplitLLMError(f"KV group size must be positive, got {self.group_size}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise SplitLLMError(f"KV scale dtype must be one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype}")
        if self.version != KV_FORMAT_VERSION:
            raise SplitLLMError(f"KV quantization format version {self.version} is not supported")

    def group_for(self, head_dim: int) -> int:
        g = head_dim if self.group_size is None else self.group_size
        check_group_size(head_dim, g)
        return g


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, cfg: KVQuantConfig) -> int:
    """Exact stored bytes one token adds to the quantized cache of `n_layers` layers (K and V)."""
    g = cfg.group_for(head_dim)
    scale_bytes = torch.empty((), dtype=SCALE_DTYPES[cfg.scale_dtype]).element_size()
    per_head = packed_width(head_dim, cfg.bits) + 2 * (head_dim // g) * scale_bytes
    return n_layers * 2 * n_kv_heads * per_head


def fp_kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, bytes_per_value: int = 4) -> int:
    """Bytes per token of an unquantized cache (4 for float32 DynamicCache, 2 for fp16)."""
    return n_layers * 2 * n_kv_heads * head_dim * bytes_per_value
