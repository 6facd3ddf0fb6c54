"""Shared CLI plumbing: the error boundary, console, model loading with a status line, output files."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import typer
from rich.console import Console

from ..errors import SplitLLMError

console = Console()
err_console = Console(stderr=True)


def cli_errors(fn):
    """Turn SplitLLMError into a one-line message + its exit code (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SplitLLMError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def load_model_with_status(spec: str):
    from ..model.loader import load_model

    with err_console.status(f"loading model {spec} ..."):
        return load_model(spec, progress=lambda msg: err_console.print(msg))


def check_output_path(path: Path | None, force: bool) -> None:
    """Refuse to overwrite a user's file unless --force; check before doing long work."""
    if path is None:
        return
    if path.exists() and not force:
        raise SplitLLMError(f"{path} already exists: pass --force to overwrite it")
    if path.exists() and path.is_dir():
        raise SplitLLMError(f"{path} is a directory, expected a file path")
    if not path.parent.exists():
        raise SplitLLMError(f"directory {path.parent} does not exist")


def write_json(path: Path, data: dict, force: bool) -> None:
    check_output_path(path, force)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    """'4,8,16' -> (4, 8, 16); anything else is a one-line error naming the option."""
    items = [t.strip() for t in text.split(",")] if text else []
    try:
        values = tuple(int(t) for t in items)
    except ValueError:
        values = ()
    if not values:
        raise SplitLLMError(f"{option} expects comma-separated integers like 4,8,16, got {text!r}")
    return values
