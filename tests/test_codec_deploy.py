"""Codec on the split runtime: CodecWire in a SplitSession, the calibration cache, CodecOptions."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from splitcli.codec import CodecConfig, decode
from splitcli.codec.deploy import (CodecOptions, cache_dir, calibrate_from_samples, calibrated_config,
                                   calibration_ids, edge_hidden)
from splitcli.errors import SplitLLMError
from splitcli.runtime.codec_wire import CodecWire, build_wire, codec_params
from splitcli.runtime.session import SplitSession
from splitcli.runtime.wire import RawWire


class CharTokenizer:
    """Deterministic stand-in tokenizer for the tiny models (vocab 128)."""

    bos_token_id = eos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 128 for c in text]}


def write_wikitext(root, n_chars=6000):
    words = ["the", "river", "valley", "was", "settled", "in", "1820", "by", "farmers", "and", "a", "mill", ","]
    g = torch.Generator().manual_seed(1)
    text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (n_chars // 4,), generator=g))
    (root / "wikitext2").mkdir(parents=True, exist_ok=True)
    (root / "wikitext2" / "wiki.test.raw").write_text(" = Title = \r\n" + text[:n_chars] + "\r\n")
    return root


@pytest.fixture(scope="module")
def llama():
    from conftest import _tiny

    return _tiny("llama")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_codec_wire_in_split_session_close_to_raw(llama):
    tiny_model = llama
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (1, 48))
    calib = edge_hidden(tiny_model, 2, torch.randint(0, 128, (200,)))                 # [200, 64]
    cfg = calibrate_from_samples(calib, CodecOptions())
    raw, coded = SplitSession(tiny_model, 2, wire=RawWire("fp32")), SplitSession(tiny_model, 2, wire=CodecWire(cfg))
    ref, out = raw.forward(ids, logits_to_keep=0), coded.forward(ids, logits_to_keep=0)   # [1, 48, V]
    assert _rel(out, ref) < 0.1 and _rel(out, ref) > 0       # lossy but close
    nxt = torch.tensor([[5]])
    ref1, out1 = raw.forward(nxt), coded.forward(nxt)        # a decode step through the caches
    assert _rel(out1, ref1) < 0.1
    assert len(coded.wire.stats) == 2 and coded.wire.last_stats.tokens == 1
    for r, c in zip(raw.stats, coded.stats):
        assert c.wire_bytes < r.wire_bytes


def test_codec_wire_frames_are_the_library_frames(llama):
    calib = edge_hidden(llama, 2, list(range(100)))
    cfg = calibrate_from_samples(calib, CodecOptions(q_bar=5))
    wire = CodecWire(cfg)
    x = edge_hidden(llama, 2, list(range(3, 40)))
    frame = wire.encode(x)
    assert torch.equal(wire.decode(frame), decode(frame, cfg).float())
    assert wire.stats[0].frame_bytes == len(frame) and wire.stats[0].tokens == x.shape[0]
    assert CodecConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_calibrate_from_samples_paths(llama):
    x = edge_hidden(llama, 2, list(range(64)))
    full = calibrate_from_samples(x, CodecOptions(tau_quantile=0.99))
    assert full.tau == pytest.approx(float(x.abs().flatten().quantile(0.99)), rel=0.05)
    assert full.channel_class is not None and full.symbol_model is not None
    fixed = calibrate_from_samples(x, CodecOptions(tau=2.5, entropy=False))
    assert fixed.tau == 2.5 and fixed.channel_class is None and fixed.symbol_model is None
    assert not CodecOptions(tau=2.5, entropy=False).needs_samples
    assert CodecOptions().tau_quantile == 0.999


@pytest.mark.parametrize("kw, msg", [
    (dict(tau=1.0, tau_quantile=0.9), "not both"),
    (dict(tau=0.0), "--tau"),
    (dict(tau=math.nan), "--tau"),
    (dict(tau_quantile=0.0), "--tau-quantile"),
    (dict(tau_quantile=1.5), "--tau-quantile"),
    (dict(q_bar=9), "--max-bits"),
    (dict(q_bar=1), "--max-bits"),
    (dict(delta=-0.1), "--delta"),
    (dict(delta=math.inf), "--delta"),
])
def test_codec_params_rejects(kw, msg):
    with pytest.raises(SplitLLMError, match=msg):
        CodecOptions(**kw)


def test_codec_params_from_cli(tmp_path):
    assert codec_params("none") is None
    with pytest.raises(SplitLLMError, match="need --codec tabq"):
        codec_params("none", q_bar=4)
    with pytest.raises(SplitLLMError, match="--codec must be one of"):
        codec_params("zip")
    with pytest.raises(SplitLLMError, match="does not exist"):
        codec_params("tabq", data_dir=tmp_path / "missing")
    p = codec_params("tabq", tau=3.0, entropy=False, data_dir=tmp_path / "missing")   # needs no data
    assert p == CodecOptions(tau=3.0, entropy=False)


def test_calibration_cache_hit_miss(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    data = write_wikitext(tmp_path / "data")
    lm = SimpleNamespace(model=llama, tokenizer=CharTokenizer(), sha256="ab" * 32)
    logs = []
    cfg, info = calibrated_config(lm, 2, CodecOptions(), data, logs.append)
    assert info["cache"] == "miss" and len(logs) == 1 and info["calib_tokens"] == 256   # tiny context
    cfg2, info2 = calibrated_config(lm, 2, CodecOptions(), data, logs.append)
    assert info2["cache"] == "hit" and cfg2 == cfg and len(logs) == 1
    assert len(list(cache_dir().glob("*.json"))) == 1
    # the calibration slice is the text's tail
    text = (data / "wikitext2" / "wiki.test.raw").read_text()
    assert calibration_ids(lm.tokenizer, text, 256) == CharTokenizer()(text)["input_ids"][-256:]
    # anything the config depends on changes the key
    assert calibrated_config(lm, 3, CodecOptions(), data)[1]["cache"] == "miss"
    assert calibrated_config(lm, 2, CodecOptions(q_bar=5), data)[1]["cache"] == "miss"
    other = SimpleNamespace(model=llama, tokenizer=CharTokenizer(), sha256="cd" * 32)
    assert calibrated_config(other, 2, CodecOptions(), data)[1]["cache"] == "miss"
    # a corrupt file is recalibrated, never trusted
    path = cache_dir() / info["path"].split("/")[-1]
    path.write_text("{not json")
    cfg3, info3 = calibrated_config(lm, 2, CodecOptions(), data)
    assert info3["cache"] == "miss" and cfg3 == cfg and json.loads(path.read_text())["config"] == cfg.to_dict()
    # an absolute tau without entropy coding needs neither data nor cache
    assert calibrated_config(lm, 2, CodecOptions(tau=1.0, entropy=False), tmp_path / "nope")[1]["cache"] == "none"


def test_calibration_text_too_short(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    data = write_wikitext(tmp_path / "data", n_chars=100)
    lm = SimpleNamespace(model=llama, tokenizer=CharTokenizer(), sha256="ab" * 32)
    with pytest.raises(SplitLLMError, match="fewer than"):
        calibrated_config(lm, 2, CodecOptions(), data)


def test_build_wire(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    lm = SimpleNamespace(model=llama, tokenizer=CharTokenizer(), sha256="ab" * 32)
    assert build_wire("none", None, lm, 2).name == "raw-fp32"
    wire = build_wire("tabq", CodecOptions(), lm, 2, write_wikitext(tmp_path / "data"))
    assert isinstance(wire, CodecWire) and wire.cfg.tau is not None and wire.cfg.symbol_model is not None
