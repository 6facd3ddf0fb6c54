"""The raw wire: exact fp32, fp16 that refuses to overflow, bf16 that keeps the range; hostile frames."""

from __future__ import annotations

import struct

import pytest
import torch

from splitcli.errors import SplitLLMError
from splitcli.runtime.wire import FP16_MAX, RawWire


def test_fp32_is_exact_and_keeps_nan_inf():
    x = torch.tensor([[1.5, -2.25e30, float("nan"), float("inf")], [0.0, -0.0, 1e-40, 3.0]])
    y = RawWire("fp32").decode(RawWire("fp32").encode(x))
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(x)) and torch.isnan(y[0, 2])


def test_fp16_refuses_massive_activations_instead_of_sending_inf():
    x = torch.ones(3, 8)
    x[1, 5] = 2.4e4  # representable: SmolLM2's largest hidden values at ℓ = 15
    y = RawWire("fp16").decode(RawWire("fp16").encode(x))
    assert torch.isfinite(y).all() and float(y[1, 5]) == pytest.approx(2.4e4, rel=1e-3)
    x[2, 0] = -1.0e5  # a Gemma-style channel: beyond fp16
    with pytest.raises(SplitLLMError, match="beyond fp16.*bf16 or fp32"):
        RawWire("fp16").encode(x)
    edge = torch.full((1, 2), FP16_MAX)
    assert torch.equal(RawWire("fp16").decode(RawWire("fp16").encode(edge)), edge)


def test_bf16_keeps_the_range():
    x = torch.tensor([[1.0e5, -3.0e38, 0.1, 0.0]])
    y = RawWire("bf16").decode(RawWire("bf16").encode(x))
    assert torch.isfinite(y).all()
    assert torch.equal(y, x.to(torch.bfloat16).to(torch.float32))
    assert RawWire("bf16").name == "raw-bf16" and len(RawWire("bf16").encode(x)) == 13 + 2 * 4


def test_empty_and_hostile_frames():
    for dtype in ("fp32", "fp16", "bf16"):
        w = RawWire(dtype)
        assert w.decode(w.encode(torch.zeros(0, 4))).shape == (0, 4)
    w = RawWire("fp32")
    with pytest.raises(SplitLLMError, match="shorter"):
        w.decode(b"SR")
    with pytest.raises(SplitLLMError, match="not a raw"):
        w.decode(struct.pack("<4sBII", b"SRAW", 9, 1, 1) + b"\0" * 4)
    huge = struct.pack("<4sBII", b"SRAW", 0, 1 << 20, 1 << 20)  # claims 4 TiB: refused before allocating
    with pytest.raises(SplitLLMError, match="does not match"):
        w.decode(huge)
    with pytest.raises(SplitLLMError, match="raw wire dtype"):
        RawWire("fp8")
