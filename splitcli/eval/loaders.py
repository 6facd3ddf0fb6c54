"""Turn the benchmark files into scoring requests, one loader per spec format.

Every multiple-choice example becomes ``MCExample``: choice i is scored as the log-likelihood of
``continuations[i]`` given ``contexts[i]``. Ordinary multiple choice repeats one context; partial
scoring (WinoGrande) repeats one continuation. ``choice_texts[i]`` is what acc_norm divides by
(the choice without the target delimiter, as the harness does).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitcli.data import data_file, read_text
from splitcli.errors import SplitLLMError
from splitcli.eval.spec import TaskSpec


@dataclass(frozen=True)
class MCExample:
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choice_texts: tuple[str, ...]
    gold: int

    def __post_init__(self) -> None:
        n = len(self.contexts)
        if n < 2 or len(self.continuations) != n or len(self.choice_texts) != n:
            raise ValueError("a multiple-choice example needs >= 2 aligned choices")
        if not 0 <= self.gold < n:
            raise ValueError(f"gold index {self.gold} outside 0..{n - 1}")


@dataclass(frozen=True)
class ClozeExample:
    context: str
    continuation: str


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness ``hellaswag.utils.preprocess``, verbatim in behaviour.

    Note the single pass of ``"  " -> " "``: runs of 3+ spaces are only partly collapsed, as in
    the harness; matching it keeps prompts (and numbers) comparable.
    """
    text = text.strip()
    # Brackets are artifacts of the WikiHow part of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_example(row: dict[str, Any]) -> MCExample:
    """Harness ``_process_doc``: query = activity_label + ": " + ctx_a + " " + ctx_b.capitalize()."""
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    query = hellaswag_preprocess(row["activity_label"] + ": " + ctx)
    choices = tuple(hellaswag_preprocess(e) for e in row["endings"])
    return MCExample((query,) * len(choices), tuple(" " + c for c in choices), choices, int(row["label"]))


def read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SplitLLMError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise SplitLLMError(f"{path}:{lineno}: expected a JSON object per line")
            rows.append(row)
    return rows


def read_labels(path: Path) -> list[int]:
    labels = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            labels.append(int(line.strip()))
        except ValueError as e:
            raise SplitLLMError(f"{path}:{lineno}: label {line.strip()!r} is not an integer") from e
    return labels


def _field(row: dict[str, Any], name: str, where: str) -> Any:
    if name not in row:
        raise SplitLLMError(f"{where}: field {name!r} missing (fields: {', '.join(sorted(row))})")
    return row[name]


def _fill(template: str, row: dict[str, Any], where: str) -> str:
    try:
        return template.format_map(row)
    except (KeyError, IndexError, AttributeError) as e:
        raise SplitLLMError(f"{where}: template {template!r} needs {e} (fields: {', '.join(sorted(row))})") from e


def _strip_prefixes(spec: TaskSpec, row: dict[str, Any], where: str) -> dict[str, Any]:
    if not spec.remove_prefix:
        return row
    row = dict(row)
    for name, prefix in spec.remove_prefix:
        value = _field(row, name, where)
        if isinstance(value, str) and value.startswith(prefix):
            row[name] = value[len(prefix):]
    return row


def _mc_example(spec: TaskSpec, row: dict[str, Any], gold: Any, where: str) -> MCExample:
    row = _strip_prefixes(spec, row, where)
    context = _fill(spec.context or "", row, where)
    if isinstance(spec.choices, tuple):
        choices = [_field(row, c, where) for c in spec.choices]
    else:
        choices = _field(row, spec.choices or "", where)
    if not isinstance(choices, list | tuple) or not all(isinstance(c, str) for c in choices):
        raise SplitLLMError(f"{where}: choices must be a list of strings")
    try:
        gold_index = int(gold)
    except (TypeError, ValueError) as e:
        raise SplitLLMError(f"{where}: gold {gold!r} is not an integer index") from e
    if not 0 <= gold_index < len(choices):
        raise SplitLLMError(f"{where}: gold index {gold_index} outside 0..{len(choices) - 1}")
    if len(choices) < 2:
        raise SplitLLMError(f"{where}: needs at least two choices")
    d = spec.target_delimiter
    return MCExample((context,) * len(choices), tuple(d + c for c in choices), tuple(choices), gold_index)


def _partial_example(spec: TaskSpec, row: dict[str, Any], where: str) -> MCExample:
    row = _strip_prefixes(spec, row, where)
    contexts = _field(row, spec.contexts or "", where)
    cont = _field(row, spec.continuation or "", where)
    if not isinstance(contexts, list) or len(contexts) < 2 or not all(isinstance(c, str) for c in contexts):
        raise SplitLLMError(f"{where}: {spec.contexts!r} must be a list of >= 2 strings")
    if not isinstance(cont, str):
        raise SplitLLMError(f"{where}: {spec.continuation!r} must be a string")
    gold = _field(row, spec.gold or "", where)
    if not isinstance(gold, int) or not 0 <= gold < len(contexts):
        raise SplitLLMError(f"{where}: gold {gold!r} is not an index into {len(contexts)} contexts")
    n = len(contexts)
    return MCExample(tuple(contexts), (spec.target_delimiter + cont,) * n, (cont,) * n, gold)


def load_examples(
    spec: TaskSpec, data_dir: str | os.PathLike[str] | None = None, limit: int | None = None
) -> list[MCExample] | list[ClozeExample]:
    """The first ``limit`` examples of a multiple-choice or cloze task, in file order."""
    if spec.format == "text_ppl":
        raise ValueError("text_ppl tasks have no examples; use load_text")
    path = data_file(spec.file, data_dir)
    rows = read_jsonl(path, limit)
    wheres = [f"{path}:{i + 1}" for i in range(len(rows))]
    if spec.format == "hellaswag":
        try:
            return [hellaswag_example(r) for r in rows]
        except KeyError as e:
            raise SplitLLMError(f"{path}: HellaSwag row lacks field {e}") from e
    if spec.format == "mc_jsonl":
        if spec.labels_file is not None:
            labels_path = data_file(spec.labels_file, data_dir)
            golds: list[Any] = read_labels(labels_path)
            n_rows = len(rows) if limit is None else len(read_jsonl(path))
            if len(golds) != n_rows:
                raise SplitLLMError(f"{labels_path} has {len(golds)} labels for {n_rows} rows of {path}")
        else:
            golds = [_field(r, spec.gold or "", w) for r, w in zip(rows, wheres)]
        return [_mc_example(spec, r, g, w) for r, g, w in zip(rows, golds, wheres)]
    if spec.format == "mc_partial_jsonl":
        return [_partial_example(spec, r, w) for r, w in zip(rows, wheres)]
    # cloze_jsonl
    out = []
    for r, w in zip(rows, wheres):
        r = _strip_prefixes(spec, r, w)
        cont = _field(r, spec.continuation or "", w)
        if not isinstance(cont, str):
            raise SplitLLMError(f"{w}: {spec.continuation!r} must be a string")
        out.append(ClozeExample(_fill(spec.context or "", r, w), spec.target_delimiter + cont))
    return out


def load_text(spec: TaskSpec, data_dir: str | os.PathLike[str] | None = None) -> str:
    """The raw text of a perplexity task, line ends read as LF unless the spec sets
    ``normalize_newlines: false`` (see `splitcli.data.read_text` for why)."""
    return read_text(data_file(spec.file, data_dir), spec.normalize_newlines)
