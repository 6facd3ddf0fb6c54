"""Hostile or broken input files and output paths: each is one line (a SplitLLMError), never a
traceback. Serve config keys set to null, config / accuracy-table / task-spec files that cannot be
read (a parent that is a file, a name too long, a symlink loop, EIO, nesting thousands deep, an
integer over Python's digit limit), and result files that cannot be written or must not be
overwritten (a user's `<out>.tmp`, an output that appears during the run)."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import splitcli.configio as configio
from splitcli.cli import app
from splitcli.cli.common import write_json
from splitcli.configio import load_config, write_text_file, write_yaml
from splitcli.errors import SplitLLMError
from splitcli.eval.spec import load_task_spec
from splitcli.plan.accuracy import read_json
from splitcli.serve.config import CloudConfig, EdgeConfig, ServeConfig

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "base.yaml"
EXAMPLE = ROOT / "configs" / "serve.yaml"
DEEP = 5000  # `[` nesting: far beyond Python's default recursion limit of 1000


def clean_error(result, fragment: str) -> None:
    """Exit 2 (SplitLLMError's code), the one line, no traceback (an uncaught error exits 1)."""
    assert result.exit_code == 2, result.output
    assert fragment in result.output, result.output
    assert "Traceback" not in result.output, result.output


def synthetic_profile(tmp_path: Path) -> Path:
    from splitcli.plan.profile import profile_from_architecture

    profile = profile_from_architecture(
        model_id="synthetic", n_layers=4, hidden_size=64, n_kv_heads=2, head_dim=16,
        params_per_layer=40_960, embedding_params=64 * 1000, weight_bits=(4, 8, 16), kv_bits=(4, 8, 16),
        group_size=32, activation_peak_bytes=1000.0, decode_ms_per_layer=2.0,
    )
    return write_yaml(tmp_path / "profile.yaml", profile.to_dict())


def _serve_file(tmp_path: Path, section: str, key: str, value) -> Path:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"include": str(BASE), "serve": {"format_version": 1, section: {key: value}}}))
    return path


# -- 4. serve config: null for a key whose default is not null ---------------------------------

NOT_NULL = [("cloud", "batch_window", "a time"), ("cloud", "max_message", "a size"), ("cloud", "kv_budget", "a size"),
            ("cloud", "idle_timeout", "a time"), ("cloud", "drain_timeout", "a time"), ("cloud", "port", "an integer"),
            ("cloud", "max_sessions", "an integer"), ("cloud", "max_batch", "an integer"),
            ("cloud", "host", "a string"), ("cloud", "api_key_env", "a string"), ("edge", "host", "a string"),
            ("edge", "port", "an integer"), ("edge", "cloud", "a string"), ("edge", "api_key_env", "a string"),
            ("edge", "max_running", "an integer"), ("edge", "eps", "a number")]


@pytest.mark.parametrize("section,key,kind", NOT_NULL)
def test_serve_null_for_a_key_with_a_default_is_one_line(tmp_path, section, key, kind):
    with pytest.raises(SplitLLMError) as info:
        ServeConfig.load(_serve_file(tmp_path, section, key, None))
    assert str(info.value).startswith(f"serve.{section}.{key}: must be {kind}, got null")
    assert "\n" not in str(info.value)


def test_serve_every_key_is_covered_and_null_still_means_off_where_the_default_is_null(tmp_path):
    from splitcli.serve.config import _CLOUD_KEYS, _EDGE_KEYS

    nullable = {("cloud", "metrics_port"), ("cloud", "tls_cert"), ("cloud", "tls_key"), ("edge", "cloud_api_key_env"),
                ("edge", "cloud_ca"), ("edge", "model_name"), ("edge", "deadline")}
    every = {("cloud", k) for k in _CLOUD_KEYS} | {("edge", k) for k in _EDGE_KEYS}
    assert every == nullable | {(s, k) for s, k, _ in NOT_NULL}  # a new key must be listed in one of them
    for section, key in sorted(nullable):
        cfg = ServeConfig.load(_serve_file(tmp_path, section, key, None))
        field = {"cloud": _CLOUD_KEYS, "edge": _EDGE_KEYS}[section][key][0]
        assert getattr(getattr(cfg, section), field) is None
    # the example spells "off" as null for some keys and must keep loading
    example = ServeConfig.load(EXAMPLE)
    assert example.cloud.tls_cert is None and example.edge.cloud_ca is None and example.edge.model_name is None
    assert dataclasses.replace(example.cloud, metrics_port=None) == dataclasses.replace(CloudConfig(), metrics_port=None)
    assert dataclasses.replace(example.edge, deadline_s=None) == EdgeConfig()


def test_serve_cloud_cli_null_batch_window_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITLLM_API_KEY", "k")
    r = CliRunner().invoke(app, ["serve-cloud", "--config", str(_serve_file(tmp_path, "cloud", "batch_window", None)),
                                 "--port", "0"])
    clean_error(r, "serve.cloud.batch_window: must be a time, got null")


# -- 5. unreadable config / accuracy table / task spec -----------------------------------------

def _unreadable(tmp_path: Path, suffix: str) -> dict[str, tuple[Path, str]]:
    """name -> (path, the reason the one-line error gives)."""
    (tmp_path / f"file{suffix}").write_text("a: 1\n")
    os.symlink(tmp_path / f"loop2{suffix}", tmp_path / f"loop1{suffix}")
    os.symlink(tmp_path / f"loop1{suffix}", tmp_path / f"loop2{suffix}")
    (tmp_path / f"deep{suffix}").write_text("[" * DEEP)
    return {"parent is a file": (tmp_path / f"file{suffix}" / f"x{suffix}", "Not a directory"),
            "name too long": (tmp_path / ("x" * 300 + suffix), "File name too long"),
            "directory": (tmp_path, "Is a directory"),
            "deep": (tmp_path / f"deep{suffix}", "nested too deeply")}


@pytest.mark.parametrize("case", ["parent is a file", "name too long", "directory", "deep"])
def test_config_unreadable_is_one_line(tmp_path, case):
    path, reason = _unreadable(tmp_path, ".yaml")[case]
    with pytest.raises(SplitLLMError, match="^cannot read config file ") as info:
        load_config(path)
    assert str(info.value) == f"cannot read config file {path}: {reason}"


def test_config_symlink_loop_eio_and_missing(tmp_path):
    _unreadable(tmp_path, ".yaml")
    loop = tmp_path / "loop1.yaml"
    with pytest.raises(SplitLLMError) as info:
        load_config(loop)
    assert str(info.value) == f"cannot read config file {loop}: symlink loop"
    with pytest.raises(SplitLLMError, match=r"^cannot read config file /proc/\d+/mem: Input/output error$"):
        load_config("/proc/self/mem")
    with pytest.raises(SplitLLMError, match="^config file not found: "):  # today's message kept
        load_config(tmp_path / "absent.yaml")
    # an include that cannot be read names the included file
    top = tmp_path / "top.yaml"
    top.write_text(f"include: {tmp_path / 'deep.yaml'}\n")
    with pytest.raises(SplitLLMError, match=f"^cannot read config file {tmp_path / 'deep.yaml'}: nested too deeply"):
        load_config(top)


def test_config_deep_but_parsable_loads_and_a_merge_too_deep_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "nested.yaml"
    depth = 450  # parses (the YAML composer gives up near 500 block levels) and merges
    path.write_text("".join(f"{'  ' * i}k:\n" for i in range(depth)) + "  " * depth + "v: 1\n")
    node = load_config(path)
    for _ in range(depth):
        node = node["k"]
    assert node == {"v": 1}

    # load_config's fallback: a RecursionError from the include merge (nesting the YAML parser
    # accepted but deep_merge's copy cannot follow, e.g. under a deeper call stack) is one line too
    def too_deep(base, override):
        raise RecursionError("maximum recursion depth exceeded")
    monkeypatch.setattr(configio, "deep_merge", too_deep)
    with pytest.raises(SplitLLMError) as info:
        load_config(path)
    assert str(info.value) == f"cannot read config file {path}: nested too deeply"


def test_cli_config_unreadable_is_one_line(tmp_path):
    cases = _unreadable(tmp_path, ".yaml")
    for path, reason in [cases["parent is a file"], cases["deep"], (tmp_path / "loop1.yaml", "symlink loop")]:
        r = CliRunner().invoke(app, ["generate", "-m", "/nonexistent-model", "--config", str(path), "-p", "hi"])
        clean_error(r, reason)
        assert "cannot read config file" in r.output


def test_accuracy_table_unreadable_is_one_line(tmp_path):
    cases = _unreadable(tmp_path, ".json")
    for path, reason in cases.values():
        with pytest.raises(SplitLLMError) as info:
            read_json(path, "accuracy table")
        assert str(info.value) == f"cannot read accuracy table {path}: {reason}"
    big = tmp_path / "bigint.json"
    big.write_text('{"a": ' + "9" * 5000 + "}")
    with pytest.raises(SplitLLMError, match=r"^cannot read accuracy table .*bigint.json: Exceeds the limit \(4300"):
        read_json(big, "accuracy table")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(SplitLLMError, match=r"^cannot read accuracy table .*bad.json: Expecting property name"):
        read_json(bad, "accuracy table")
    with pytest.raises(SplitLLMError, match="^accuracy table not found: "):  # today's message kept
        read_json(tmp_path / "absent.json", "accuracy table")


def test_cli_plan_accuracy_table_unreadable_is_one_line(tmp_path):
    profile = synthetic_profile(tmp_path)
    deep, big = tmp_path / "deep.json", tmp_path / "big.json"
    deep.write_text("[" * DEEP)
    big.write_text('{"a": ' + "9" * 5000 + "}")
    for table, reason in ((deep, "nested too deeply"), (big, "Exceeds the limit (4300")):
        r = CliRunner().invoke(app, ["plan", "--profile", str(profile), "--mem", "10MB", "--accuracy-table", str(table)])
        clean_error(r, reason)
        assert "cannot read accuracy table" in r.output


def test_task_spec_unreadable_is_one_line(tmp_path):
    cases = _unreadable(tmp_path, ".yaml")
    path, _ = cases["deep"]
    with pytest.raises(SplitLLMError) as info:
        load_task_spec(path)
    assert str(info.value) == f"cannot read task spec {path}: nested too deeply"
    path, _ = cases["name too long"]
    with pytest.raises(SplitLLMError) as info:
        load_task_spec(path)
    assert str(info.value) == f"cannot read task spec {path}: File name too long"
    for missing in (cases["parent is a file"][0], tmp_path / "loop1.yaml", tmp_path / "absent.yaml"):
        with pytest.raises(SplitLLMError, match=f"^task spec {missing} not found$"):  # today's message kept
            load_task_spec(missing)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(SplitLLMError, match="^cannot read task spec .*bin.yaml: 'utf-8' codec can't decode"):
        load_task_spec(binary)


# -- 6. writing results -------------------------------------------------------------------------

def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("."))


def test_write_json_leaves_a_users_tmp_alone(tmp_path):
    (tmp_path / "res.json.tmp").write_text("my precious notes\n")
    write_json(tmp_path / "res.json", {"a": 1}, force=False)
    assert (tmp_path / "res.json.tmp").read_text() == "my precious notes\n"
    assert json.loads((tmp_path / "res.json").read_text()) == {"a": 1}
    write_json(tmp_path / "res.json", {"a": 2}, force=True)  # --force still replaces the output
    assert json.loads((tmp_path / "res.json").read_text()) == {"a": 2}
    assert (tmp_path / "res.json.tmp").read_text() == "my precious notes\n"
    assert _leftovers(tmp_path) == []
    with pytest.raises(SplitLLMError, match="already exists: pass --force"):
        write_json(tmp_path / "res.json", {"a": 3}, force=False)


def test_written_files_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "res.json", {"a": 1}, force=False)
        write_yaml(tmp_path / "p.yaml", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "res.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "p.yaml").stat().st_mode & 0o777 == 0o644


def _appears_during_the_run(monkeypatch, target: Path) -> None:
    """Someone writes `target` after the up-front check, while the temporary is being made."""
    real = configio._create_temp

    def create(t):
        out = real(t)
        target.write_text("theirs\n")
        return out

    monkeypatch.setattr(configio, "_create_temp", create)


@pytest.mark.parametrize("links", [True, False])
def test_an_output_that_appears_mid_run_is_not_overwritten_without_force(tmp_path, monkeypatch, links):
    if not links:  # a filesystem without hard links: the fallback re-checks before renaming
        def no_link(src, dst):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "res.json"
    _appears_during_the_run(monkeypatch, out)
    with pytest.raises(SplitLLMError, match="already exists; pass --force"):
        write_json(out, {"a": 1}, force=False)
    assert out.read_text() == "theirs\n" and _leftovers(tmp_path) == []
    y = tmp_path / "p.yaml"
    _appears_during_the_run(monkeypatch, y)
    with pytest.raises(SplitLLMError, match="already exists; pass --force"):
        write_yaml(y, {"a": 1})
    assert y.read_text() == "theirs\n" and _leftovers(tmp_path) == []
    # with --force the run's result wins, as before
    write_json(out, {"a": 1}, force=True)
    assert json.loads(out.read_text()) == {"a": 1} and _leftovers(tmp_path) == []


def test_no_hard_links_still_writes(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_link)
    write_json(tmp_path / "res.json", {"a": 1}, force=False)
    assert json.loads((tmp_path / "res.json").read_text()) == {"a": 1} and _leftovers(tmp_path) == []


def test_unwritable_targets_are_one_line():
    with pytest.raises(SplitLLMError) as info:
        write_json(Path("/proc/res.json"), {"a": 1}, force=False)
    assert str(info.value) == "cannot write /proc/res.json: No such file or directory"
    with pytest.raises(SplitLLMError) as info:
        write_yaml("/proc/res.yaml", {"a": 1})
    assert str(info.value) == "cannot write /proc/res.yaml: No such file or directory"


@pytest.mark.parametrize("where", ["write", "rename"])
def test_a_failed_write_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch, where):
    """ENOSPC while writing, EROFS at the rename: one line, the temporary removed, no output."""
    if where == "write":
        real_fdopen = os.fdopen

        class Full:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, text):
                raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))
        reason = "No space left on device"
    else:
        def ro(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")
        monkeypatch.setattr(os, "replace", ro)
        reason = "Read-only file system"
    out = tmp_path / "res.json"
    with pytest.raises(SplitLLMError) as info:
        write_json(out, {"a": 1}, force=True)
    assert str(info.value) == f"cannot write {out}: {reason}"
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(SplitLLMError, match=f"^cannot write {tmp_path / 'x.txt'}: {reason}$"):
        write_text_file(tmp_path / "x.txt", "t", overwrite=True)
    assert list(tmp_path.iterdir()) == []


def test_cli_plan_write_failure_is_one_line(tmp_path, monkeypatch):
    """`plan -o` that cannot be written at the end of the run: exit 2, one line, no traceback."""
    profile = synthetic_profile(tmp_path)

    def ro(target):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(configio, "_create_temp", ro)
    table = tmp_path / "acc.json"
    table.write_text(json.dumps({"format_version": 1, "metric": "ppl", "higher_is_better": False,
                                 "baseline": 10.0, "results": [{"drop": 0.0}]}))
    out = tmp_path / "plan.yaml"
    r = CliRunner().invoke(app, ["plan", "--profile", str(profile), "--mem", "10MB", "--accuracy-table", str(table),
                                 "-o", str(out)])
    clean_error(r, "Read-only file system")
    assert "cannot write" in r.output and not out.exists()


def test_cli_generate_json_keeps_a_users_tmp_and_write_failure_is_one_line(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "gen.json"
    (tmp_path / "gen.json.tmp").write_text("my precious notes\n")
    args = ["generate", "-m", str(tiny_model_dir), "-l", "2", "-p", "Hello", "-n", "2", "--json", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["split_layer"] == 2
    assert (tmp_path / "gen.json.tmp").read_text() == "my precious notes\n" and _leftovers(tmp_path) == []

    def ro(target):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(configio, "_create_temp", ro)
    r = CliRunner().invoke(app, [*args, "--force"])
    clean_error(r, "Read-only file system")
    assert "cannot write" in r.output


# -- a shard directory's manifest ------------------------------------------------------------

def test_shard_manifest_unreadable_is_one_line(tmp_path):
    from splitcli.model.shards import MANIFEST_FILE, read_manifest

    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / MANIFEST_FILE).write_text("[" * DEEP)
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / MANIFEST_FILE).write_bytes(b"\xff\xfe\x00 not text")
    long_dir = tmp_path / ("x" * 300)
    for shard_dir, fragment in [(deep, "is not a splitllm manifest: nested too deeply"),
                                (binary, "is not valid YAML"),
                                (long_dir, "File name too long"),
                                (tmp_path / "absent", "holds no")]:
        with pytest.raises(SplitLLMError, match=fragment) as info:
            read_manifest(shard_dir)
        assert "\n" not in str(info.value)
    result = CliRunner().invoke(app, ["generate", "--shards", str(deep), "--prompt", "hi", "--max-new-tokens", "2"])
    clean_error(result, "nested too deeply")
