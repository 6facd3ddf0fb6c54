"""Task specs: a task is a small YAML file, not code.

Formats (the ``format`` key):

- ``mc_jsonl``: multiple choice, one shared context per row. ``context`` is a template over the
  row's fields (``"{query}\\nAnswer:"``); ``choices`` names a field holding a list, or lists the
  fields that hold each choice (``[sol1, sol2]``); the gold index comes from the ``gold`` field or
  from ``labels_file`` (one integer per line, PIQA style). ``remove_prefix`` strips a fixed prefix
  from a field before templating (e.g. ``{query: "Passage: "}`` to turn llm-foundry's BoolQ query
  into the harness prompt). Metrics: acc, acc_norm.
- ``hellaswag``: original HellaSwag jsonl with the harness preprocessing. Metrics: acc, acc_norm.
- ``mc_partial_jsonl``: WinoGrande-style partial scoring: ``contexts`` names a list field of
  option-filled contexts, ``continuation`` the shared continuation; the option whose context gives
  the continuation the higher log-likelihood wins. Metric: acc.
- ``cloze_jsonl``: LAMBADA-style ``context`` template + ``continuation`` field. Metrics: ppl
  (exp of minus the mean per-example log-likelihood, as the harness aggregates it) and acc (the
  continuation is the greedy argmax at every position).
- ``text_ppl``: one raw text file, windowed perplexity (GPTQ convention) with ``seqlen``.
  ``normalize_newlines`` (default true) reads CRLF / CR line ends as LF, like Python's text mode.

Every scored continuation is ``target_delimiter + choice`` (default ``" "``).
"""

from __future__ import annotations

import hashlib
import json
import os
import string
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from splitcli.configio import io_reason
from splitcli.errors import SplitLLMError

SPEC_VERSION = 1

FORMAT_METRICS: dict[str, tuple[str, ...]] = {
    "mc_jsonl": ("acc", "acc_norm"),
    "hellaswag": ("acc", "acc_norm"),
    "mc_partial_jsonl": ("acc",),
    "cloze_jsonl": ("ppl", "acc"),
    "text_ppl": ("ppl",),
}

_KNOWN_KEYS = {
    "spec_version", "name", "format", "file", "metric", "description", "context", "choices",
    "gold", "labels_file", "target_delimiter", "remove_prefix", "contexts", "continuation",
    "seqlen", "normalize_newlines",
}


def _template_fields(template: str) -> list[str]:
    """Top-level field names a ``str.format`` template references."""
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        base = name.split(".")[0].split("[")[0]
        if not base:
            raise ValueError(f"template {template!r} uses a positional placeholder; name the field")
        names.append(base)
    return names


@dataclass(frozen=True)
class TaskSpec:
    """A validated task description (see the module docstring for the formats)."""

    name: str
    format: str
    file: str
    metric: str
    description: str = ""
    context: str | None = None
    choices: str | tuple[str, ...] | None = None
    gold: str | None = None
    labels_file: str | None = None
    target_delimiter: str = " "
    remove_prefix: tuple[tuple[str, str], ...] = ()
    contexts: str | None = None
    continuation: str | None = None
    seqlen: int | None = None
    normalize_newlines: bool = True
    spec_version: int = SPEC_VERSION
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        where = f"task spec {self.source or self.name!r}"
        if self.spec_version != SPEC_VERSION:
            raise ValueError(f"{where}: spec_version {self.spec_version} unsupported (want {SPEC_VERSION})")
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"{where}: 'name' must be a non-empty string")
        if self.format not in FORMAT_METRICS:
            raise ValueError(f"{where}: unknown format {self.format!r}; known: {', '.join(FORMAT_METRICS)}")
        if not self.file:
            raise ValueError(f"{where}: 'file' (relative to the data directory) is required")
        if self.metric not in FORMAT_METRICS[self.format]:
            raise ValueError(
                f"{where}: metric {self.metric!r} not available for format {self.format}; "
                f"choose from {', '.join(FORMAT_METRICS[self.format])}"
            )
        if not isinstance(self.target_delimiter, str):
            raise ValueError(f"{where}: target_delimiter must be a string")
        required = {
            "mc_jsonl": ("context", "choices"),
            "mc_partial_jsonl": ("contexts", "continuation"),
            "cloze_jsonl": ("context", "continuation"),
            "text_ppl": ("seqlen",),
            "hellaswag": (),
        }[self.format]
        for key in required:
            if getattr(self, key) in (None, "", ()):
                raise ValueError(f"{where}: format {self.format} needs '{key}'")
        if self.format == "mc_jsonl":
            if (self.gold is None) == (self.labels_file is None):
                raise ValueError(f"{where}: give exactly one of 'gold' (a field) or 'labels_file'")
            if isinstance(self.choices, tuple) and len(self.choices) < 2:
                raise ValueError(f"{where}: 'choices' must list at least two fields")
        if self.format == "mc_partial_jsonl" and self.gold is None:
            raise ValueError(f"{where}: format mc_partial_jsonl needs 'gold'")
        if self.context is not None:
            _template_fields(self.context)
        if not isinstance(self.normalize_newlines, bool):
            raise ValueError(f"{where}: normalize_newlines must be true or false")
        if self.seqlen is not None and (not isinstance(self.seqlen, int) or self.seqlen < 2):
            raise ValueError(f"{where}: seqlen must be an integer >= 2")

    def fingerprint(self) -> str:
        """Hash of everything that changes the task's numbers (not its source path)."""
        body = asdict(self)
        body.pop("source")
        blob = json.dumps(body, sort_keys=True, ensure_ascii=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def task_spec_from_dict(raw: Any, source: str = "") -> TaskSpec:
    """Build a TaskSpec from parsed YAML, turning every problem into a SplitLLMError."""
    where = source or "task spec"
    if not isinstance(raw, dict):
        raise SplitLLMError(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _KNOWN_KEYS)
    if unknown:
        raise SplitLLMError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KNOWN_KEYS))}")
    kw = dict(raw)
    choices = kw.get("choices")
    if isinstance(choices, list):
        if not all(isinstance(c, str) for c in choices):
            raise SplitLLMError(f"{where}: 'choices' must be a field name or a list of field names")
        kw["choices"] = tuple(choices)
    prefix = kw.get("remove_prefix")
    if prefix is not None:
        if not isinstance(prefix, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prefix.items()):
            raise SplitLLMError(f"{where}: 'remove_prefix' must map field names to prefix strings")
        kw["remove_prefix"] = tuple(sorted(prefix.items()))
    for key in ("name", "format", "file", "metric", "context", "gold", "labels_file", "contexts", "continuation"):
        if key in kw and kw[key] is not None and not isinstance(kw[key], str):
            raise SplitLLMError(f"{where}: '{key}' must be a string")
    try:
        return TaskSpec(**kw, source=source)
    except (TypeError, ValueError) as e:
        raise SplitLLMError(str(e) if source in str(e) else f"{where}: {e}") from e


def load_task_spec(path: str | os.PathLike[str]) -> TaskSpec:
    """Load and validate a user's YAML task spec."""
    p = Path(path).expanduser()
    try:
        if not p.is_file():
            raise SplitLLMError(f"task spec {p} not found")
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:  # a name too long, EIO, bad UTF-8 ...
        raise SplitLLMError(f"cannot read task spec {p}: {io_reason(e)}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SplitLLMError(f"task spec {p} is not valid YAML: {str(e).splitlines()[0]}") from e
    except RecursionError as e:  # `[[[[...` nested thousands deep
        raise SplitLLMError(f"cannot read task spec {p}: {io_reason(e)}") from None
    return task_spec_from_dict(raw, source=str(p))


def builtin_task_names() -> list[str]:
    """Names of the specs shipped in ``splitcli/eval/tasks/``."""
    folder = resources.files("splitcli.eval").joinpath("tasks")
    return sorted(f.name[: -len(".yaml")] for f in folder.iterdir() if f.name.endswith(".yaml"))


def get_task_spec(name_or_path: str | os.PathLike[str]) -> TaskSpec:
    """A built-in task by name, or a user's spec by path (anything ending in .yaml/.yml)."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        return load_task_spec(text)
    names = builtin_task_names()
    if text not in names:
        raise SplitLLMError(f"unknown task {text!r}; built-in tasks: {', '.join(names)} (or pass a YAML spec path)")
    res = resources.files("splitcli.eval").joinpath("tasks", f"{text}.yaml")
    raw = yaml.safe_load(res.read_text(encoding="utf-8"))
    return task_spec_from_dict(raw, source=f"builtin:{text}")
