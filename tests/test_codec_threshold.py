"""Threshold splitting (eq. 4) and tau calibration."""

import math

import numpy as np
import pytest
import torch

from splitcli.codec import CodecConfig, calibrate_tau, decode, encode
from splitcli.codec.threshold import split_threshold
from splitcli.errors import SplitLLMError


def test_split_is_csr_and_below_is_zeroed():
    x = np.array([[0.5, -7.0, 2.0, 9.0], [1.0, 1.0, 1.0, 1.0], [-5.0, 0.0, 0.0, 4.99]], np.float32)
    sparse, below = split_threshold(x, 5.0)
    assert sparse.counts.tolist() == [2, 0, 1]
    assert sparse.row_ptr.tolist() == [0, 2, 2, 3]
    assert sparse.cols.tolist() == [1, 3, 0]
    np.testing.assert_array_equal(below, np.array([[0.5, 0, 2.0, 0], [1, 1, 1, 1], [0, 0, 0, 4.99]], np.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sparse_part_round_trips_bit_exactly(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(17, 33, generator=g) * 3).to(dtype)
    x[3, 5] = 2.0e4
    x[0, 0] = -1.5e4
    tau = 4.0
    y = decode(encode(x, CodecConfig(tau=tau, tau_quantile=None, q_bar=3, delta=0.5)))
    assert y.dtype == dtype
    mask = x.float().abs() >= tau
    assert mask.sum() > 5
    bits = {torch.float32: torch.int32}.get(dtype, torch.int16)
    assert torch.equal(y[mask].view(bits), x[mask].view(bits))


def test_tau_zero_is_lossless_including_negative_zero():
    x = torch.tensor([[0.0, -0.0, 1e-30, -3.25], [7.0, 1e30, -1e-45, 2.5]])
    y = decode(encode(x, CodecConfig(tau=0.0, tau_quantile=None)))
    assert torch.equal(y.view(torch.int32), x.view(torch.int32))


def test_calibrate_tau_is_an_observed_quantile():
    x = torch.arange(1, 1001, dtype=torch.float32).reshape(10, 100) * torch.tensor([1.0, -1.0]).repeat(500).reshape(10, 100)
    assert calibrate_tau(x, 0.999) == 1000.0   # "higher": index 999*0.999 rounds up to the max
    assert calibrate_tau(x, 0.5) == 501.0
    assert calibrate_tau([x[:5], x[5:]], 0.5) == 501.0
    assert calibrate_tau(x, 1.0) == 1000.0
    assert math.isinf(calibrate_tau(torch.zeros(0, 4), 0.9))
    with pytest.raises(SplitLLMError):
        calibrate_tau(torch.tensor([[1.0, float("nan")]]), 0.5)
    with pytest.raises(SplitLLMError):
        calibrate_tau(x, 1.5)
