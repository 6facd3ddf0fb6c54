#!/usr/bin/env python3
"""Render the Markdown tables of docs/results.md from the JSON files scripts/results.sh wrote.

Usage: python scripts/results_tables.py [RESULTS_DIR]   (default: results/)
Each row is NAME.zs.json (zero-shot) + NAME.ppl.json (WikiText-2); a missing file leaves its cells
as "not run" rather than failing, so a half-finished sweep still renders.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ZERO_SHOT = ("lambada", "hellaswag", "piqa", "arc_easy", "boolq", "winogrande")
LABELS = {"lambada": "LAMBADA acc", "hellaswag": "HellaSwag acc_norm", "piqa": "PIQA acc_norm",
          "arc_easy": "ARC-e acc_norm", "boolq": "BoolQ acc", "winogrande": "WinoGrande acc"}

TABLE2 = [("fp", "—", "fp (reference, unsplit)"), ("atom-w4a4", "any", "Atom-style W4A4"),
          ("split-l5", "5", "ours (split, Qw1 = 4)"), ("split-l10", "10", "ours (split, Qw1 = 4)"),
          ("split-l15", "15", "ours (split, Qw1 = 4)"), ("split-l20", "20", "ours (split, Qw1 = 4)"),
          ("split-l25", "25", "ours (split, Qw1 = 4)"), ("split-l25-w8", "25", "split, Qw1 = 8 (planner's alternative)")]
TABLE5 = [("fp", "—", "baseline (no compression = fp)"),
          ("ablate-tabq-q6", "6", "TAB-Q alone (τ = ∞)"), ("ablate-ts-tabq-q6", "6", "TS + TAB-Q (ours)"),
          ("ablate-tabq-q4", "4", "TAB-Q alone (τ = ∞)"), ("ablate-ts-tabq-q4", "4", "TS + TAB-Q (ours)")]


def load(directory: Path, name: str, kind: str) -> dict | None:
    path = directory / f"{name}.{kind}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def paired_delta(row: dict, base: dict) -> tuple[float, float] | None:
    """Mean over the six tasks of (row - base) accuracy and its standard error, paired per example:
    both runs scored the same examples, so the per-example differences carry the uncertainty."""
    by_row = {r["task"]: r for r in row["results"]}
    by_base = {r["task"]: r for r in base["results"]}
    deltas, variances = [], []
    for task in ZERO_SHOT:
        if task not in by_row or task not in by_base:
            return None
        metric = by_row[task]["metric"]
        a = by_row[task].get("details", {}).get("correct", {}).get(metric)
        b = by_base[task].get("details", {}).get("correct", {}).get(metric)
        if not a or not b or len(a) != len(b):
            return None
        d = [int(x) - int(y) for x, y in zip(a, b)]
        n = len(d)
        mean = sum(d) / n
        var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
        deltas.append(mean)
        variances.append(var / n)
    return sum(deltas) / len(deltas), math.sqrt(sum(variances)) / len(variances)


def cells(directory: Path, name: str) -> tuple[list[str], float | None, int | None, int | None]:
    """Row cells (ppl, six tasks, mean), the mean accuracy, the zero-shot limit and ppl windows."""
    ppl, zs = load(directory, name, "ppl"), load(directory, name, "zs")
    out = ["not run"] * (len(ZERO_SHOT) + 3)
    windows = limit = mean = None
    if ppl:
        r = ppl["results"][0]
        out[0], windows = f"{r['metrics']['ppl']:.2f}", r["n"]
    if zs:
        by_task = {r["task"]: r for r in zs["results"]}
        values = []
        for i, task in enumerate(ZERO_SHOT):
            if task in by_task:
                r = by_task[task]
                v = r["metrics"][r["metric"]]
                values.append(v)
                out[1 + i] = f"{100 * v:.1f}"
        if len(values) == len(ZERO_SHOT):
            mean = sum(values) / len(values)
            out[-2] = f"**{100 * mean:.1f}**"
        limit = zs["limit"]
        base = load(directory, "fp", "zs")
        delta = paired_delta(zs, base) if base and name != "fp" else None
        out[-1] = "—" if name == "fp" else ("n/a" if delta is None else f"{100 * delta[0]:+.1f} ± {100 * delta[1]:.1f}")
    return out, mean, limit, windows


def table(directory: Path, rows: list[tuple[str, str, str]], first: str) -> str:
    head = [first, "method", "WikiText-2 ppl"] + [LABELS[t] for t in ZERO_SHOT] + ["mean of six", "Δ mean vs fp (paired ± se)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    limits, windows = set(), set()
    for name, key, label in rows:
        row, _, limit, w = cells(directory, name)
        limits.add(limit)
        windows.add(w)
        lines.append("| " + " | ".join([key, label] + row) + " |")
    limits.discard(None)
    windows.discard(None)
    note = (f"Zero-shot: first {', '.join(map(str, sorted(limits)))} examples per task (file order), accuracies in %; "
            f"WikiText-2: first {', '.join(map(str, sorted(windows)))} windows of 2048 tokens.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def stderr_note(directory: Path) -> str:
    fp = load(directory, "fp", "zs")
    if not fp:
        return ""
    errs = [r["stderr"][r["metric"]] for r in fp["results"] if r["stderr"].get(r["metric"]) is not None]
    if not errs:
        return ""
    return (f"One standard error of a single task's accuracy here: {100 * min(errs):.1f}-{100 * max(errs):.1f} points; "
            f"of the mean of six (independent tasks): about {100 * math.sqrt(sum(e * e for e in errs)) / len(errs):.1f}.\n")


def main() -> None:
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else "results")
    print("## Table 2\n")
    print(table(directory, TABLE2, "ℓ"))
    print(stderr_note(directory))
    print("## Table 5\n")
    print(table(directory, TABLE5, "Q̄a"))


if __name__ == "__main__":
    main()
