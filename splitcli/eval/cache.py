"""Resumable result cache: an interrupted sweep picks up where it stopped.

Layout under the cache root::

    <task>/<config_hash>/<limit>-<settings>.json       the finished TaskResult for that limit
    <task>/<config_hash>/<settings>.examples.jsonl     one line per scored example / window

``config_hash`` identifies the pipeline (model, split point, bit widths, codec...): the caller
hashes whatever defines it with ``config_hash()``. ``settings`` fingerprints the task spec and the
scoring settings that change numbers (max_length), so editing a spec never reuses stale results.
Example i (window i) is the same whatever the limit (limits take the first N in file order), so
the per-example store is shared across limits: a run with ``limit=100`` followed by a full run
scores only the remaining examples. The store is append-only and kept after a result is saved; a
torn last line (a kill mid-write) is ignored on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from splitcli.errors import SplitLLMError
from splitcli.eval.results import TaskResult


def config_hash(config: Mapping[str, Any] | str | bytes) -> str:
    """A short stable hash of a pipeline configuration (canonical JSON for mappings)."""
    if isinstance(config, Mapping):
        blob = json.dumps(config, sort_keys=True, default=str, ensure_ascii=True).encode()
    elif isinstance(config, str):
        blob = config.encode()
    else:
        blob = bytes(config)
    return hashlib.sha256(blob).hexdigest()[:16]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


class CacheEntry:
    """Files of one (task, config, limit, settings) run."""

    def __init__(self, folder: Path, limit: int | None, settings: str):
        self.result_path = folder / f"{'all' if limit is None else f'limit{limit}'}-{settings}.json"
        self.partial_path = folder / f"{settings}.examples.jsonl"

    def load_result(self) -> TaskResult | None:
        if not self.result_path.is_file():
            return None
        try:
            return TaskResult.from_json(json.loads(self.result_path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            return None  # unreadable or old format: recompute rather than fail a sweep

    def save_result(self, result: TaskResult) -> None:
        self.result_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.result_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result.to_json(), indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.result_path)

    def load_partial(self) -> dict[int, Any]:
        """Per-example records saved so far, by example index."""
        done: dict[int, Any] = {}
        if not self.partial_path.is_file():
            return done
        with self.partial_path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    obj = json.loads(line)
                    done[int(obj["i"])] = obj["r"]
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue
        return done

    def append_partial(self, records: Mapping[int, Any]) -> None:
        if not records:
            return
        self.partial_path.parent.mkdir(parents=True, exist_ok=True)
        # A torn line from an earlier kill would swallow the first new record: start on a new line.
        needs_newline = False
        if self.partial_path.is_file() and self.partial_path.stat().st_size > 0:
            with self.partial_path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        with self.partial_path.open("a", encoding="utf-8") as f:
            if needs_newline:
                f.write("\n")
            for i, r in records.items():
                f.write(json.dumps({"i": i, "r": r}) + "\n")
            f.flush()
            os.fsync(f.fileno())


class ResultCache:
    """JSON results under ``root``, keyed by task, pipeline config hash, limit and settings."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise SplitLLMError(f"cache directory {self.root} exists and is not a directory")

    def entry(self, task: str, config: str, limit: int | None, settings: str) -> CacheEntry:
        return CacheEntry(self.root / _safe(task) / _safe(config), limit, _safe(settings))
