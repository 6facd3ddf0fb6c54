import os

import pytest
import yaml

from splitcli.configio import deep_merge, load_config, write_yaml
from splitcli.errors import SplitLLMError


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_plain_load(tmp_path):
    cfg = _write(tmp_path / "a.yaml", "a: 1\nb: {c: 2}\n")
    assert load_config(cfg) == {"a": 1, "b": {"c": 2}}


def test_empty_file_is_empty_mapping(tmp_path):
    assert load_config(_write(tmp_path / "e.yaml", "")) == {}


def test_include_relative_and_local_wins(tmp_path):
    _write(tmp_path / "sub" / "base.yaml", "link: {snr: 10dB, bandwidth: 1MHz}\nmodel: m\nlist: [1, 2]\n")
    cfg = _write(tmp_path / "sub" / "run.yaml",
                 "include: base.yaml\nlink: {snr: 3dB}\nlist: [9]\nextra: true\n")
    assert load_config(cfg) == {
        "link": {"snr": "3dB", "bandwidth": "1MHz"}, "model": "m", "list": [9], "extra": True,
    }


def test_include_list_order_later_wins(tmp_path):
    _write(tmp_path / "a.yaml", "x: a\ny: a\nz: a\n")
    _write(tmp_path / "b.yaml", "y: b\nz: b\n")
    cfg = _write(tmp_path / "c.yaml", "include: [a.yaml, b.yaml]\nz: c\n")
    assert load_config(cfg) == {"x": "a", "y": "b", "z": "c"}


def test_nested_includes_resolve_relative_to_each_file(tmp_path):
    _write(tmp_path / "deep" / "leaf.yaml", "leaf: 1\n")
    _write(tmp_path / "deep" / "mid.yaml", "include: leaf.yaml\nmid: 2\n")
    cfg = _write(tmp_path / "top.yaml", "include: deep/mid.yaml\ntop: 3\n")
    assert load_config(cfg) == {"leaf": 1, "mid": 2, "top": 3}


def test_diamond_is_not_a_cycle(tmp_path):
    _write(tmp_path / "base.yaml", "v: 0\n")
    _write(tmp_path / "l.yaml", "include: base.yaml\nl: 1\n")
    _write(tmp_path / "r.yaml", "include: base.yaml\nr: 1\n")
    cfg = _write(tmp_path / "top.yaml", "include: [l.yaml, r.yaml]\n")
    assert load_config(cfg) == {"v": 0, "l": 1, "r": 1}


def test_cycle_is_named(tmp_path):
    _write(tmp_path / "a.yaml", "include: b.yaml\n")
    _write(tmp_path / "b.yaml", "include: a.yaml\n")
    with pytest.raises(SplitLLMError, match="cycle") as info:
        load_config(tmp_path / "a.yaml")
    message = str(info.value)
    assert "a.yaml -> " in message and "b.yaml" in message and message.count("a.yaml") == 2


def test_self_include_is_a_cycle(tmp_path):
    cfg = _write(tmp_path / "self.yaml", "include: self.yaml\n")
    with pytest.raises(SplitLLMError, match="cycle"):
        load_config(cfg)


def test_missing_file_and_missing_include(tmp_path):
    with pytest.raises(SplitLLMError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    cfg = _write(tmp_path / "a.yaml", "include: gone.yaml\n")
    with pytest.raises(SplitLLMError, match="gone.yaml"):
        load_config(cfg)


def test_bad_yaml_and_non_mapping(tmp_path):
    with pytest.raises(SplitLLMError, match="invalid YAML.*line"):
        load_config(_write(tmp_path / "bad.yaml", "a: [1, 2\n"))
    with pytest.raises(SplitLLMError, match="mapping"):
        load_config(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(SplitLLMError, match="include"):
        load_config(_write(tmp_path / "inc.yaml", "include: 3\n"))


def test_safe_load_refuses_python_tags(tmp_path):
    cfg = _write(tmp_path / "evil.yaml", "a: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(SplitLLMError, match="invalid YAML"):
        load_config(cfg)


def test_deep_merge_does_not_mutate():
    base = {"a": {"b": 1, "c": [1]}, "d": 1}
    over = {"a": {"b": 2}, "e": {"f": 1}}
    merged = deep_merge(base, over)
    assert merged == {"a": {"b": 2, "c": [1]}, "d": 1, "e": {"f": 1}}
    merged["a"]["c"].append(2)
    assert base == {"a": {"b": 1, "c": [1]}, "d": 1}
    assert deep_merge({}, {}) == {}
    assert deep_merge({"a": {"x": 1}}, {"a": 5}) == {"a": 5}


def test_write_yaml_no_overwrite(tmp_path):
    target = tmp_path / "plan.yaml"
    write_yaml(target, {"b": 2, "a": {1: 3.5}})
    assert yaml.safe_load(target.read_text()) == {"b": 2, "a": {1: 3.5}}
    assert list(yaml.safe_load(target.read_text())) == ["b", "a"]  # insertion order kept
    with pytest.raises(SplitLLMError, match="--force"):
        write_yaml(target, {"c": 1})
    assert yaml.safe_load(target.read_text()) == {"b": 2, "a": {1: 3.5}}
    write_yaml(target, {"c": 1}, overwrite=True)
    assert yaml.safe_load(target.read_text()) == {"c": 1}
    assert sorted(os.listdir(tmp_path)) == ["plan.yaml"]  # no temp files left


def test_write_yaml_missing_dir(tmp_path):
    with pytest.raises(SplitLLMError, match="does not exist"):
        write_yaml(tmp_path / "no" / "x.yaml", {"a": 1})
