"""The benchmark helpers on small synthetic hidden states (no timing assertions)."""

import pytest
import torch

from splitcli.codec import CodecConfig
from splitcli.codec.measure import measure_codec, sweep_codec
from splitcli.errors import SplitLLMError


def _hidden():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 48, generator=g)
    x[:, 7] *= 40      # a massive channel, like the real model's
    return x


def test_measure_reports_every_method():
    x = _hidden()
    rep = measure_codec(x, CodecConfig(tau_quantile=0.99), repeats=3, prefill_tokens=64, prefill_repeats=1)
    rows = {r.method: r for r in rep.methods}
    assert list(rows) == ["fp32", "fp16", "int8", "zstd(fp16)", "codec"]
    assert rows["fp32"].bytes_per_token == 4 * 48 and rows["fp16"].bytes_per_token == 2 * 48
    assert rows["int8"].bytes_per_token == 48 + 4 and rows["fp32"].rel_l2 == 0.0
    assert 0 < rows["fp16"].rel_l2 < 1e-3 and rows["int8"].rel_l2 > rows["fp16"].rel_l2
    assert rows["codec"].ratio_vs_fp16 == pytest.approx(96 / rows["codec"].bytes_per_token)
    assert rep.encode_ms_token > 0 and rep.decode_ms_token > 0 and rep.prefill_encode_mb_s > 0
    assert rep.prefill_tokens == 64 and rep.codec_path in ("rans", "raw")
    assert rep.token_ratio_vs_fp16 == pytest.approx(96 / rep.token_bytes)


def test_sweep_rows_cover_the_grid():
    rows = sweep_codec(_hidden(), CodecConfig(), tau_quantiles=(0.99, 0.999), q_bars=(3, 6))
    assert [(r["tau_quantile"], r["q_bar"]) for r in rows] == [(0.99, 3), (0.99, 6), (0.999, 3), (0.999, 6)]
    by = {(r["tau_quantile"], r["q_bar"]): r for r in rows}
    assert by[(0.99, 6)]["rel_l2"] < by[(0.99, 3)]["rel_l2"]
    assert by[(0.99, 6)]["bytes_per_token"] > by[(0.99, 3)]["bytes_per_token"]


def test_measure_rejects_empty_input():
    with pytest.raises(SplitLLMError):
        measure_codec(torch.zeros(0, 8), CodecConfig())


def test_sweep_accepts_a_calibrated_base():
    from splitcli.codec import calibrate_config
    x = _hidden()
    rows = sweep_codec(x, calibrate_config(x, n_classes=2), tau_quantiles=(0.99,), q_bars=(3, 4))
    assert len(rows) == 2 and all(r["ratio_vs_fp16"] > 1 for r in rows)
