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

import contextlib
import copy
import os
import secrets
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


def io_reason(exc: BaseException) -> str:
    """The one-line cause of a failed read or write: an OSError's strerror ("Not a directory"),
    else the first line of the message (RecursionError and friends have no strerror)."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return text.splitlines()[0]


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SplitLLMError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        # any OSError: a parent that is a file (ENOTDIR), a name too long, EIO, a directory...
        raise SplitLLMError(f"cannot read config file {path}: {io_reason(exc)}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or "syntax error"
        raise SplitLLMError(f"invalid YAML in {path}{where}: {problem}") from None
    except RecursionError as exc:
        # the YAML composer recurses per nesting level: `[[[[...` a few thousand deep
        raise SplitLLMError(f"cannot read config file {path}: {io_reason(exc)}") from None
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


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except RuntimeError:
        # py3.11's pathlib raises RuntimeError("Symlink loop from ...") rather than an OSError
        raise SplitLLMError(f"cannot read config file {path}: symlink loop") from None
    except OSError as exc:
        raise SplitLLMError(f"cannot read config file {path}: {io_reason(exc)}") from None


def _load(path: Path, stack: tuple[Path, ...]) -> dict[str, Any]:
    resolved = _resolve(path)
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
    path = Path(os.path.expanduser(os.fspath(path)))
    try:
        return _load(path, ())
    except RecursionError as exc:
        # YAML that parses but nests deeper than deep_merge's copy can follow
        raise SplitLLMError(f"cannot read config file {path}: {io_reason(exc)}") from None


def dump_yaml(data: Mapping[str, Any]) -> str:
    """YAML text for a plain mapping, keys in insertion order, block style."""
    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False, allow_unicode=True)


def write_yaml(
    path: str | os.PathLike[str], data: Mapping[str, Any], *, overwrite: bool = False
) -> Path:
    """Write `data` as YAML to `path`; refuse to replace an existing file unless `overwrite`.

    The text goes to a temporary file in the same directory first and is renamed into place, so
    a crash never leaves a half-written file behind (`write_text_file`). Returns the path written.
    """
    target = Path(os.path.expanduser(os.fspath(path)))
    if target.exists() and not overwrite:
        raise SplitLLMError(f"{target} already exists; pass --force to overwrite it")
    if target.exists() and target.is_dir():
        raise SplitLLMError(f"{target} is a directory, not a file")
    text = dump_yaml(data)
    if not target.parent.is_dir():
        raise SplitLLMError(f"cannot write {target}: directory {target.parent} does not exist")
    return write_text_file(target, text, overwrite=overwrite)


def _create_temp(target: Path) -> tuple[int, Path]:
    """A new, uniquely named file beside `target`, opened for writing: (fd, path).

    Like tempfile.mkstemp(dir=...), but created with mode 0o666 so the umask applies: the
    output gets the permissions a plain open() would give it, not mkstemp's 0o600.
    """
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise SplitLLMError(f"cannot write {target}: no free temporary name in {target.parent}")


def write_text_file(path: str | os.PathLike[str], text: str, *, overwrite: bool = False) -> Path:
    """Write `text` to `path` through a temporary file of its own in the same directory.

    A user's file (e.g. `<path>.tmp`) is never touched, and two writers never share a temporary.
    Without `overwrite` the file is linked into place only if `path` is still absent (it may have
    appeared since the caller checked, e.g. during a long run). Every OSError is a one-line
    SplitLLMError; the temporary is removed whatever happens. Returns the path written.
    """
    target = Path(os.path.expanduser(os.fspath(path)))
    tmp: Path | None = None
    try:
        fd, tmp = _create_temp(target)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # fails with FileExistsError if it appeared meanwhile
            except FileExistsError:
                raise SplitLLMError(f"{target} already exists; pass --force to overwrite it") from None
            except OSError:
                # Filesystems without hard links: check again, then a plain rename (a small race).
                if os.path.lexists(target):
                    raise SplitLLMError(f"{target} already exists; pass --force to overwrite it") from None
                os.replace(tmp, target)
    except OSError as exc:
        raise SplitLLMError(f"cannot write {target}: {io_reason(exc)}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
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
