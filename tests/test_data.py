"""Data directory resolution: explicit > $SPLITLLM_DATA > ../shared/data (cwd, then repo root)."""

from pathlib import Path

import pytest

import splitcli.data as data
from splitcli.data import DATA_ENV, data_file, default_data_dirs, resolve_data_dir
from splitcli.errors import SplitLLMError


def test_explicit_beats_env(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    monkeypatch.setenv(DATA_ENV, str(b))
    assert resolve_data_dir(a) == a
    assert resolve_data_dir() == b


def test_explicit_missing_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    good = tmp_path / "good"
    good.mkdir()
    monkeypatch.setenv(DATA_ENV, str(good))
    with pytest.raises(SplitLLMError, match="does not exist") as e:
        resolve_data_dir(tmp_path / "nope")
    assert "SPLITLLM_DATA" in str(e.value) and "--data-dir" in str(e.value)
    assert e.value.exit_code == 2


def test_env_missing_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nope"))
    with pytest.raises(SplitLLMError, match="is not a directory"):
        resolve_data_dir()


def test_cwd_relative_default(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    project = tmp_path / "proj"
    project.mkdir()
    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    monkeypatch.chdir(project)
    assert resolve_data_dir() == shared.resolve()


def test_repo_root_default_is_second_candidate(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    cands = default_data_dirs()
    repo_root = Path(data.__file__).resolve().parent.parent
    assert cands[0] == (tmp_path / ".." / "shared" / "data").resolve()
    assert cands[-1] == (repo_root / ".." / "shared" / "data").resolve()


def test_no_candidate_lists_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "default_data_dirs", lambda: [tmp_path / "x" / "shared" / "data"])
    with pytest.raises(SplitLLMError, match="no evaluation data directory found") as e:
        resolve_data_dir()
    assert str(tmp_path / "x" / "shared" / "data") in str(e.value)


def test_data_file_missing_names_the_full_path(tmp_path):
    with pytest.raises(SplitLLMError) as e:
        data_file("hellaswag/hellaswag_val_1000.jsonl", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "hellaswag" / "hellaswag_val_1000.jsonl") in msg
    assert "SPLITLLM_DATA" in msg and "README" in msg


def test_data_file_found_and_absolute_paths(tmp_path):
    f = tmp_path / "sub" / "x.jsonl"
    f.parent.mkdir()
    f.write_text("{}\n")
    assert data_file("sub/x.jsonl", tmp_path) == f
    assert data_file(f, tmp_path / "ignored-for-absolute") == f
