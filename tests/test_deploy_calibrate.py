"""Codec on the split runtime: CodecWire in a SplitSession, the calibration cache, CodecSettings,
and the deployment layer's wire."""

from __future__ import annotations

import hashlib
import json
import math
from types import SimpleNamespace

import pytest
import torch

from splitcli.codec import CodecConfig, decode
from splitcli.codec.calibrate import calibrate_from_samples
from splitcli.deploy import SplitSpec, build_wire
from splitcli.deploy.calibrate import (cache_dir, calibrated_config, calibration_ids, edge_hidden, read_user_text,
                                      read_wikitext)
from splitcli.errors import SplitLLMError
from splitcli.plan.codec_settings import CodecSettings
from splitcli.runtime.codec_wire import CodecWire
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
    cfg = calibrate_from_samples(calib, CodecSettings())
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
    cfg = calibrate_from_samples(calib, CodecSettings(q_bar=5))
    wire = CodecWire(cfg)
    x = edge_hidden(llama, 2, list(range(3, 40)))
    frame = wire.encode(x)
    assert torch.equal(wire.decode(frame), decode(frame, cfg).float())
    assert wire.stats[0].frame_bytes == len(frame) and wire.stats[0].tokens == x.shape[0]
    assert CodecConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_calibrate_from_samples_paths(llama):
    x = edge_hidden(llama, 2, list(range(64)))
    full = calibrate_from_samples(x, CodecSettings(tau_quantile=0.99))
    assert full.tau == pytest.approx(float(x.abs().flatten().quantile(0.99)), rel=0.05)
    assert full.channel_class is not None and full.symbol_model is not None
    fixed = calibrate_from_samples(x, CodecSettings(tau=2.5, entropy=False))
    assert fixed.tau == 2.5 and fixed.channel_class is None and fixed.symbol_model is None
    assert not CodecSettings(tau=2.5, entropy=False).needs_samples
    assert CodecSettings().tau_quantile == 0.999


@pytest.mark.parametrize("kw, msg", [
    (dict(tau=1.0, tau_quantile=0.9), "exactly one"),
    (dict(tau=-1.0), "codec tau"),
    (dict(tau=math.nan), "codec tau"),
    (dict(tau_quantile=-0.1), "codec tau_quantile"),
    (dict(tau_quantile=1.5), "codec tau_quantile"),
    (dict(q_bar=9), "codec q_bar"),
    (dict(q_bar=1), "codec q_bar"),
    (dict(q_bar=4, q_bar_min=5), "codec q_bar_min"),
    (dict(delta=-0.1), "codec delta"),
    (dict(delta=math.inf), "codec delta"),
    (dict(delta=1.0), "codec delta"),
    (dict(entropy=1), "codec entropy"),
    (dict(n_classes=0), "codec n_classes"),
])
def test_codec_settings_reject(kw, msg):
    # library errors speak of settings, not of CLI flags
    with pytest.raises(SplitLLMError, match=msg) as e:
        CodecSettings(**kw)
    assert "--" not in str(e.value)


def test_codec_settings_and_wire_config_share_bounds():
    for kw in (dict(q_bar=9), dict(delta=1.0), dict(tau=-1.0)):
        with pytest.raises(SplitLLMError):
            CodecSettings(**kw)
        with pytest.raises(SplitLLMError):
            CodecConfig(**kw)
    assert CodecConfig.from_settings(CodecSettings(tau=0.0, q_bar=8)).tau == 0.0   # 0: everything lossless


def test_overlay_plan_defaults_flags_win():
    from splitcli.configio import overlay

    plan_codec = CodecSettings(tau_quantile=0.99, q_bar=4, delta=0.1)
    assert overlay(plan_codec) == plan_codec
    assert overlay(plan_codec, q_bar=6, delta=None) == CodecSettings(tau_quantile=0.99, q_bar=6, delta=0.1)
    # τ is one choice: an absolute flag replaces the plan's quantile, and the reverse
    assert overlay(plan_codec, tau=2.0) == CodecSettings(tau=2.0, q_bar=4, delta=0.1)
    assert overlay(CodecSettings(tau=2.0), tau_quantile=0.9).tau is None
    with pytest.raises(SplitLLMError, match="codec q_bar"):
        overlay(plan_codec, q_bar=12)
    with pytest.raises(SplitLLMError, match="no setting"):
        overlay(plan_codec, colour="red")
    spec = SplitSpec(split_layer=3, q_w1=4, wire="tabq", codec=plan_codec)
    got = spec.with_flags(codec={"q_bar": 8}, split_layer=None, q_w1=16)
    assert (got.split_layer, got.q_w1, got.codec.q_bar, got.codec.tau_quantile) == (3, 16, 8, 0.99)


def test_calibration_cache_hit_miss(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    data = write_wikitext(tmp_path / "data")
    lm = SimpleNamespace(model=llama, tokenizer=CharTokenizer(), sha256="ab" * 32)
    logs = []
    cfg, info = calibrated_config(lm, 2, CodecSettings(), data, logs.append)
    assert info["cache"] == "miss" and len(logs) == 1 and info["calib_tokens"] == 256   # tiny context
    cfg2, info2 = calibrated_config(lm, 2, CodecSettings(), data, logs.append)
    assert info2["cache"] == "hit" and cfg2 == cfg and len(logs) == 1
    assert len(list(cache_dir().glob("*.json"))) == 1
    # the calibration slice is the text's tail
    text = (data / "wikitext2" / "wiki.test.raw").read_text()
    assert calibration_ids(lm.tokenizer, text, 256) == CharTokenizer()(text)["input_ids"][-256:]
    # anything the config depends on changes the key
    assert calibrated_config(lm, 3, CodecSettings(), data)[1]["cache"] == "miss"
    assert calibrated_config(lm, 2, CodecSettings(q_bar=5), data)[1]["cache"] == "miss"
    other = SimpleNamespace(model=llama, tokenizer=CharTokenizer(), sha256="cd" * 32)
    assert calibrated_config(other, 2, CodecSettings(), data)[1]["cache"] == "miss"
    # a corrupt file is recalibrated, never trusted
    path = cache_dir() / info["path"].split("/")[-1]
    path.write_text("{not json")
    cfg3, info3 = calibrated_config(lm, 2, CodecSettings(), data)
    assert info3["cache"] == "miss" and cfg3 == cfg and json.loads(path.read_text())["config"] == cfg.to_dict()
    # an absolute tau without entropy coding needs neither data nor cache
    assert calibrated_config(lm, 2, CodecSettings(tau=1.0, entropy=False), tmp_path / "nope")[1]["cache"] == "none"


def test_calibration_text_too_short(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    data = write_wikitext(tmp_path / "data", n_chars=100)
    lm = SimpleNamespace(model=llama, tokenizer=CharTokenizer(), sha256="ab" * 32)
    with pytest.raises(SplitLLMError, match="fewer than"):
        calibrated_config(lm, 2, CodecSettings(), data)


def test_build_wire(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    lm = SimpleNamespace(model=llama, tokenizer=CharTokenizer(), sha256="ab" * 32)
    assert build_wire(SplitSpec(split_layer=2), lm).name == "raw-fp32"
    assert build_wire(SplitSpec(split_layer=2, wire="fp16"), lm).name == "raw-fp16"
    wire = build_wire(SplitSpec(split_layer=2, wire="tabq"), lm, write_wikitext(tmp_path / "data"))
    assert isinstance(wire, CodecWire) and wire.cfg.tau is not None and wire.cfg.symbol_model is not None


def test_calibration_to_a_target_reports_its_choice_and_caches_it(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    data = write_wikitext(tmp_path / "data")
    lm = SimpleNamespace(model=llama, tokenizer=CharTokenizer(), sha256="ab" * 32)
    logs = []
    settings = CodecSettings(target_rel_error=0.05, rotation="hadamard")
    cfg, info = calibrated_config(lm, 2, settings, data, logs.append)
    chosen = info["chosen"]
    assert info["cache"] == "miss" and chosen["met"] and chosen["bulk_rel_error"] <= 0.05
    assert cfg.q_bar == chosen["q_bar"] and cfg.tau == chosen["tau"] and cfg.rotation_seed == 0
    assert any("chose q_bar" in m for m in logs)
    cfg2, info2 = calibrated_config(lm, 2, settings, data)
    assert info2["cache"] == "hit" and cfg2 == cfg and info2["chosen"] == chosen


def test_split_with_codec_v3_switches_runs_close_to_raw(llama, tmp_path, monkeypatch):
    from splitcli.deploy import build_split

    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    lm = SimpleNamespace(model=llama, tokenizer=CharTokenizer(), sha256="ab" * 32, model_id="tiny")
    codec = CodecSettings(q_bar=4, rotation="hadamard", rotation_seed=5, channel_alpha=0.5)
    split = build_split(lm, SplitSpec(split_layer=2, q_w1=16, wire="tabq", codec=codec), write_wikitext(tmp_path / "data"))
    assert split.info["codec"]["rotation_seed"] == 5 and split.info["codec"]["channel_scale"]
    ids = torch.tensor([[5, 9, 17, 33, 65, 3, 7, 11]])
    coded = split.session(split.wire).forward(ids, None, logits_to_keep=0)
    raw = split.session(RawWire("fp32")).forward(ids, None, logits_to_keep=0)
    assert _rel(coded, raw) < 0.1


def test_cache_file_holds_one_report_and_a_hit_returns_what_the_miss_did(llama, tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("SPLITLLM_CACHE", str(tmp_path / "cache"))
    data = write_wikitext(tmp_path / "data")
    lm = SimpleNamespace(model=llama, tokenizer=CharTokenizer(), sha256="ab" * 32)
    for settings, key in ((CodecSettings(), "check"), (CodecSettings(target_rel_error=0.05), "chosen")):
        cfg, miss = calibrated_config(lm, 2, settings, data)
        stored = json.loads(Path(miss["path"]).read_text())
        assert "chosen" not in stored and "check" not in stored and stored["report"] == miss[key]
        assert ("check" if key == "chosen" else "chosen") not in miss
        _, hit = calibrated_config(lm, 2, settings, data)
        assert hit == dict(miss, cache="hit")
    # a report that is not a mapping is a corrupt file: recalibrated, never trusted
    Path(miss["path"]).write_text(json.dumps(dict(stored, report="target_rel_error")))
    cfg3, info3 = calibrated_config(lm, 2, CodecSettings(target_rel_error=0.05), data)
    assert info3["cache"] == "miss" and cfg3 == cfg and json.loads(Path(miss["path"]).read_text())["report"] == miss["chosen"]


def test_user_and_wikitext_texts_are_read_with_the_hash_of_their_bytes(tmp_path):
    """The text (LF line ends) and the sha256 that keys the caches come from one read of the same bytes;
    empty and non-UTF-8 files get one clear error naming what they were for."""
    raw = "één\r\ntwee\rdrie\n".encode()
    (tmp_path / "mine.txt").write_bytes(raw)
    assert read_user_text(tmp_path / "mine.txt") == ("één\ntwee\ndrie\n", hashlib.sha256(raw).hexdigest())
    wiki = tmp_path / "data" / "wikitext2"
    wiki.mkdir(parents=True)
    (wiki / "wiki.test.raw").write_bytes(raw)
    assert read_wikitext(tmp_path / "data") == ("één\ntwee\ndrie\n", hashlib.sha256(raw).hexdigest())
    (tmp_path / "empty.txt").write_bytes(b" \n")
    (tmp_path / "binary.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(SplitLLMError, match="the fit text .*empty.txt is empty"):
        read_user_text(tmp_path / "empty.txt")
    with pytest.raises(SplitLLMError, match=r"cannot read the text: .*binary.txt is not UTF-8 text \(invalid start "
                                            r"byte at byte 3\)"):
        read_user_text(tmp_path / "binary.txt", "text")
    with pytest.raises(SplitLLMError, match="cannot read the fit text .*missing.txt"):
        read_user_text(tmp_path / "missing.txt")
