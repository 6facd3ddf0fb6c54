"""The profile's codec points are measured on the calibration text's hidden states when the data
is there (random tokens' hidden states are unlike text's), else on random tokens; the profile
records which (`codec_source`), and profiles from before the field load as "random tokens"."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import _tiny
from splitcli.cli import app
from splitcli.deploy.calibrate import calibration_ids, edge_hidden
from splitcli.deploy.measure import ProfileSettings, measure_profile, profile_tokens, text_codec_ids
from splitcli.errors import SplitLLMError
from splitcli.plan.profile import CODEC_SOURCES, CodecCost, CodecPoint, Profile, profile_from_architecture

SETTINGS = ProfileSettings(bits=(16,), kv_bits=(16,), tokens=(1, 8), repeats=1, decode_context=12, group_size=32)
TEXT = "".join(f" = Section {i} =\n\nThe tower stood {i} metres tall above the old harbour .\n" for i in range(40))


def _capture(seen: dict):
    def hook(hiddens, repeats, recipes, tick):
        seen.update(hiddens)
        return None
    return hook


def test_codec_hiddens_come_from_the_given_ids_and_the_source_is_recorded():
    model = _tiny("llama")
    ids = [int(i) for i in torch.arange(5, 5 + profile_tokens(SETTINGS)) % model.config.vocab_size]
    text_seen, random_seen = {}, {}
    text = measure_profile(model, "tiny", SETTINGS, codec_hook=_capture(text_seen), codec_ids=ids)
    random = measure_profile(model, "tiny", SETTINGS, codec_hook=_capture(random_seen))
    assert (text.codec_source, random.codec_source) == ("calibration text", "random tokens")
    assert sorted(text_seen) == sorted(random_seen) == [1, 2, 3]
    with torch.inference_mode():
        for layer, hidden in text_seen.items():
            torch.testing.assert_close(hidden, edge_hidden(model, layer, ids))   # the split's hidden state
            assert not torch.allclose(hidden, random_seen[layer])                # not the random ids'


def test_bad_codec_ids_are_one_line():
    with pytest.raises(SplitLLMError, match="codec token ids must be") as e:
        measure_profile(_tiny("llama"), "tiny", SETTINGS, codec_hook=_capture({}), codec_ids=[10 ** 9])
    assert "\n" not in str(e.value)


class _Tok:
    """A word-level stand-in for a tokenizer: one id per whitespace-separated word."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(w) for w in text.split()]}


def _data_dir(tmp_path, text=TEXT):
    (tmp_path / "wikitext2").mkdir(parents=True)
    (tmp_path / "wikitext2" / "wiki.test.raw").write_bytes(text.replace("\n", "\r\n").encode())
    return tmp_path


def test_text_codec_ids_reads_the_calibration_slice_or_says_why_not(tmp_path, monkeypatch):
    data = _data_dir(tmp_path / "data")
    assert text_codec_ids(_Tok(), 20, data) == (calibration_ids(_Tok(), TEXT, 20), "")
    assert text_codec_ids(None, 20, data) == (None, "the model has no tokenizer")
    monkeypatch.setenv("SPLITLLM_DATA", str(tmp_path / "missing"))   # no data found: random tokens, and why
    ids, why = text_codec_ids(_Tok(), 20)
    assert ids is None and why.startswith("no evaluation text (") and "missing" in why
    with pytest.raises(SplitLLMError, match="not found"):             # a named directory must hold the text
        text_codec_ids(_Tok(), 20, tmp_path)


def _profile(**kw) -> Profile:
    codec = CodecCost(0.1, 0.1, (CodecPoint(q_bar=6, tau=0.99, bytes_per_token=300.0, tau_is_quantile=True),))
    return dataclasses.replace(profile_from_architecture("synthetic", 2, 64, 2, 16, 1000, 640), **{"codec": codec, **kw})


def test_codec_source_round_trips_and_old_profiles_load_as_random_tokens():
    for source in CODEC_SOURCES:
        assert Profile.from_dict(_profile(codec_source=source).to_dict()).codec_source == source
    data = _profile(codec_source="calibration text").to_dict()
    del data["codec_source"]                                   # a profile written before the field
    assert Profile.from_dict(data).codec_source == "random tokens"
    data["format_version"], data["codec"] = 1, None            # format 1 (its codec section aside)
    assert Profile.from_dict(data).codec_source == "random tokens"
    data["codec_source"] = "calibration text"                 # versions 1 and 2 never held it
    for old in (1, 2):
        data["format_version"] = old
        with pytest.raises(SplitLLMError, match="unknown keys codec_source"):
            Profile.from_dict(data)
    assert "codec_source" not in _profile(codec=None, codec_source="calibration text").to_dict()  # no points
    assert "codec_source" not in _profile().to_dict()         # random tokens: what a profile without it means


@pytest.mark.parametrize("value", ["text", "", None])
def test_bad_codec_source_is_one_line(value):
    with pytest.raises(SplitLLMError, match="codec_source must be one of random tokens, calibration text") as e:
        _profile(codec_source=value)
    assert "\n" not in str(e.value)


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_profile_cli_measures_the_codec_on_the_data_dirs_text(tiny_model_dir, tmp_path):
    out = tmp_path / "p.yaml"
    args = ["profile", "-m", tiny_model_dir, "--bits", "16", "--kv-bits", "16", "--tokens", "1,8", "--repeats", "1",
            "--group-size", "32", "--decode-context", "12", "--recipes", "none:0", "-o", out]
    r = _run(*args, "--data-dir", _data_dir(tmp_path / "data"))
    assert r.exit_code == 0, r.output
    assert Profile.from_dict(yaml.safe_load(out.read_text())).codec_source == "calibration text"
    assert "codec points measured on the last 13 tokens of wikitext2/wiki.test.raw" in " ".join(r.output.split())
    r = _run(*args, "--force", "--data-dir", tmp_path)        # named, but without the text: a clean error
    assert r.exit_code == 2 and "wiki.test.raw not found" in r.output and "Traceback" not in r.output
