"""`measure_profile` times layers on the fast decode path `splitllm generate` runs when the model
supports it (else on the eager path), says which in `Profile.timed_path`, and leaves the model
as it was (the fast path fuses and re-lays out the weights it wraps: the profile wraps copies)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import _tiny
from splitcli.deploy import measure_fast
from splitcli.deploy.measure import ProfileSettings, measure_profile
from splitcli.deploy.measure_fast import fast_overhead_ms, layer_copies
from splitcli.errors import SplitLLMError
from splitcli.plan.profile import Profile, profile_from_architecture

SETTINGS = ProfileSettings(bits=(4, 8, 16), kv_bits=(16,), tokens=(1, 8), repeats=1, decode_context=12, group_size=32)


def _snapshot(model) -> dict:
    """Every tensor's values, storage address and strides: a re-laid-out or fused weight changes
    the address or strides even where its values stay equal."""
    return {k: (v.detach().clone(), v.data_ptr(), v.stride()) for k, v in model.state_dict().items()}


def _unchanged(model, snap) -> bool:
    now = model.state_dict()
    return now.keys() == snap.keys() and all(
        torch.equal(now[k], v) and (now[k].data_ptr(), now[k].stride()) == (ptr, stride)
        for k, (v, ptr, stride) in snap.items())


@pytest.mark.parametrize("family, path", [("llama", "fast"), ("qwen2", "fast"), ("gemma2", "eager")])
def test_profile_times_the_path_generate_runs_and_keeps_the_model(monkeypatch, family, path):
    calls = []

    class Counting(measure_fast.FastLayers):
        def __call__(self, *args):
            calls.append(self.end - self.start)
            return super().__call__(*args)

    monkeypatch.setattr(measure_fast, "FastLayers", Counting)
    model = _tiny(family)
    snap = _snapshot(model)
    profile = measure_profile(model, "tiny", SETTINGS, codec_hook=None)
    assert profile.timed_path == path
    assert _unchanged(model, snap), "the profile changed the user's model"
    if path == "fast":
        # one-layer forwards (each layer alone) and whole-stack forwards (4 layers) both ran
        assert 1 in calls and 4 in calls
    else:
        assert calls == []   # gemma2's sliding-window layers: the fast path does not run them
    for layer in profile.layers:
        assert set(layer.decode_ms_by_bits) == {4, 8, 16} and all(v >= 0 for v in layer.decode_ms_by_bits.values())
        assert set(layer.prefill_ms_by_bits[8]) == {1, 8}
    assert profile.embedding.decode_ms > 0 and profile.head.decode_ms > 0


def test_fast_overhead_hand_computed():
    # 4 layers alone at 1.1 ms each (1 ms + 0.1 ms of per-forward cost), the stack 4.1 ms
    assert fast_overhead_ms([1.1] * 4, 4.1) == pytest.approx(0.1)
    assert fast_overhead_ms([1.0, 2.0], 5.0) == 0.0       # a stack slower than its parts: no negative cost
    assert fast_overhead_ms([3.0], 2.0) == 0.0            # one layer: nothing to tell apart


def test_layer_copies_always_copy():
    layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    same = layer_copies(layers, lambda layer: layer)
    assert all(c is not l and torch.equal(c.weight, l.weight) for c, l in zip(same, layers))
    other = torch.nn.Linear(2, 2)
    assert layer_copies(layers, lambda layer: other) == [other, other]   # a variant is already a copy


def _profile(**kw) -> Profile:
    base = profile_from_architecture("synthetic", 2, 64, 2, 16, 1000, 640)
    return dataclasses.replace(base, **kw)


def test_timed_path_round_trips_and_old_profiles_load():
    for path in ("fast", "eager"):
        assert Profile.from_dict(_profile(timed_path=path).to_dict()).timed_path == path
    data = _profile().to_dict()
    assert "timed_path" not in data                       # not recorded: the key is left out
    assert Profile.from_dict(data).timed_path is None     # a profile from before the field
    data["format_version"] = 1
    assert Profile.from_dict(data).timed_path is None
    data["timed_path"] = "fast"                           # version 1 never held it
    with pytest.raises(SplitLLMError, match="unknown keys timed_path"):
        Profile.from_dict(data)


@pytest.mark.parametrize("value", ["gpu", "", 1])
def test_bad_timed_path_is_one_line(value):
    with pytest.raises(SplitLLMError, match="timed_path must be one of fast, eager") as e:
        _profile(timed_path=value)
    assert "\n" not in str(e.value)
