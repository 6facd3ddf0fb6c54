"""CodecConfig validation."""

import math

import pytest

from splitcli.codec import FORMAT_VERSION, CodecConfig
from splitcli.errors import SplitLLMError


def test_defaults_are_valid_and_versioned():
    cfg = CodecConfig()
    assert cfg.version == FORMAT_VERSION
    with pytest.raises(AttributeError):
        cfg.q_bar = 3


@pytest.mark.parametrize("kwargs", [
    dict(tau=1.0, tau_quantile=0.9), dict(tau=None, tau_quantile=None), dict(tau=-1.0, tau_quantile=None),
    dict(tau=math.nan, tau_quantile=None), dict(tau_quantile=1.5), dict(tau_quantile=-0.1),
    dict(q_bar=9), dict(q_bar=1, q_min=1), dict(q_bar=4, q_min=5), dict(q_bar=4.0), dict(q_bar=True),
    dict(delta=-0.1), dict(delta=math.inf), dict(entropy=1), dict(version=99),
])
def test_invalid_configs_raise_the_user_error(kwargs):
    with pytest.raises(SplitLLMError):
        CodecConfig(**kwargs)


def test_infinite_tau_disables_threshold_splitting():
    assert CodecConfig(tau=math.inf, tau_quantile=None).tau == math.inf


def test_dict_round_trip_through_json_keeps_frames_decodable():
    import json

    import torch

    from splitcli.codec import calibrate_config, decode, encode

    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.5, 9, 32)
    cfg = calibrate_config(x, CodecConfig(q_bar=5, delta=0.02), n_classes=3)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert "_scale" not in data and data["version"] == FORMAT_VERSION
    again = CodecConfig.from_dict(data)
    assert again == cfg
    assert torch.equal(decode(encode(x[:1], cfg), again), decode(encode(x[:1], again), cfg))


@pytest.mark.parametrize("data", [{"bogus": 1}, {"q_bar": "six"}, [1, 2], {"channel_class": [0, 99]}])
def test_from_dict_rejects_bad_data(data):
    with pytest.raises(SplitLLMError):
        CodecConfig.from_dict(data)
