"""Load YAML configs (with ``include:``) and write YAML files without clobbering.

Include semantics:
- ``include: base.yaml`` or ``include: [a.yaml, b.yaml]``; paths are relative to the including
  file's directory (absolute paths and ``~`` are honoured).
- Included files are merged in list order (a later include wins over an earlier one), then the
  including file's own keys are merged on top (local keys win). Merging is deep for mappings;
  any other value (lists included) is replaced, not concatenated, so a user can always override
  a list wholesale.
- Includes nest; a file that includes itself directly or indirectly is an error naming the cycle.
  Including the same file twice from different branches (a diamond) is fine.
- The ``include`` key never appears in the result.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from splitcli.errors import SplitLLMError

INCLUDE_KEY = "include"


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: `base` with `override` merged in; nested mappings merge, other values replace."""
    merged: dict[str, Any] = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SplitLLMError(f"config file not found: {path}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise SplitLLMError(f"cannot read config file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or "syntax error"
        raise SplitLLMError(f"invalid YAML in {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SplitLLMError(
            f"config file {path} must hold a mapping (key: value), not a {type(data).__name__}"
        )
    return data


def _include_list(raw: Any, path: Path) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
        return list(raw)
    raise SplitLLMError(f"'{INCLUDE_KEY}' in {path} must be a file name or a list of file names")


def _load(path: Path, stack: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in stack:
        cycle = " -> ".join(str(p) for p in (*stack[stack.index(resolved):], resolved))
        raise SplitLLMError(f"config include cycle: {cycle}")
    data = _read_mapping(resolved)
    includes = _include_list(data.pop(INCLUDE_KEY, None), resolved)
    merged: dict[str, Any] = {}
    for name in includes:
        child = Path(os.path.expanduser(name))
        if not child.is_absolute():
            child = resolved.parent / child
        merged = deep_merge(merged, _load(child, (*stack, resolved)))
    return deep_merge(merged, data)


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a YAML mapping from `path`, resolving `include:` recursively (see module docstring)."""
    return _load(Path(os.path.expanduser(os.fspath(path))), ())


def dump_yaml(data: Mapping[str, Any]) -> str:
    """YAML text for a plain mapping, keys in insertion order, block style."""
    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False, allow_unicode=True)


def write_yaml(
    path: str | os.PathLike[str], data: Mapping[str, Any], *, overwrite: bool = False
) -> Path:
    """Write `data` as YAML to `path`; refuse to replace an existing file unless `overwrite`.

    The text goes to a temporary file in the same directory first and is renamed into place, so
    a crash never leaves a half-written file behind. Returns the path written.
    """
    target = Path(os.path.expanduser(os.fspath(path)))
    if target.exists() and not overwrite:
        raise SplitLLMError(f"{target} already exists; pass --force to overwrite it")
    if target.exists() and target.is_dir():
        raise SplitLLMError(f"{target} is a directory, not a file")
    text = dump_yaml(data)
    if not target.parent.is_dir():
        raise SplitLLMError(f"cannot write {target}: directory {target.parent} does not exist")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        if not overwrite:
            # Re-check right before the rename: another process may have created it meanwhile.
            try:
                os.link(tmp, target)
            except FileExistsError:
                raise SplitLLMError(f"{target} already exists; pass --force to overwrite it") from None
            except OSError:
                # Filesystems without hard links: fall back to a plain rename.
                os.replace(tmp, target)
        else:
            os.replace(tmp, target)
    except PermissionError as exc:
        raise SplitLLMError(f"cannot write {target}: {exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def overlay(base, /, **given):
    """`base` (a frozen dataclass, e.g. from a plan) with every `given` value that is not None.

    The one rule for "the plan sets the defaults, explicit flags win". A dataclass may name
    `EXCLUSIVE` pairs of fields that are one choice (a codec's τ is absolute or a quantile):
    giving one of a pair clears the other, so a flag never collides with the plan's choice.
    The result is re-validated by the dataclass's own constructor.
    """
    import dataclasses

    changes = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(base)})
    if unknown:
        raise SplitLLMError(f"{type(base).__name__} has no setting {', '.join(unknown)}")
    for pair in getattr(base, "EXCLUSIVE", ()):
        given_here = [name for name in pair if name in changes]
        if len(given_here) == 1:
            changes.update({name: None for name in pair if name not in changes})
    return dataclasses.replace(base, **changes)
