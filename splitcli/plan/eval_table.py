"""Turn `splitllm eval` result files into the planner's accuracy table (eq. 8b from measured accuracy).

The files must come from one model, share one task list and limit, and include exactly one `fp`
run (the baseline). Each `split` run becomes a row keyed by what it fixes: ℓ, the weight bits of
its edge layers, the codec's q̄, τ quantile and recipe (rotation, channel α; eval records them
only when on, so a run without them is the paper's recipe), and Qa = 16 (the evaluator keeps the
KV cache in float, so only Qa = 16 candidates are measured by it). The value is the mean of the tasks'
headline metrics (acc_norm for HellaSwag/PIQA/ARC, acc for the rest); when every task is a
perplexity task it is their mean perplexity instead (lower is better). Other pipelines (local,
baselines), split runs on a raw or fp16 wire, and runs whose codec calibrated itself to a
`target_rel_error` (--target-error) do not correspond to a plan candidate and are refused, so a
table never silently mixes in numbers that mean something else. A split on the predictive wire
(its default fit: what a plan deploys) is a row keyed by ℓ, edge bits, Qa and `wire: predictive`;
TAB-Q rows carry `wire: tabq`, so neither stands in for the other.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping

from splitcli.data import WIKITEXT2_TEST
from splitcli.errors import SplitLLMError
from splitcli.plan.accuracy import AccuracyTable, read_json
from splitcli.plan.codec_settings import DEFAULT_PREDICTIVE_TARGET_REL_ERROR, DEFAULT_TAU_QUANTILE
from splitcli.plan.schema import PREDICTIVE_TABLE


def is_eval_result(data: Any) -> bool:
    """True for the JSON `splitllm eval --json` writes (as opposed to a hand-made accuracy table)."""
    return isinstance(data, Mapping) and "pipeline" in data and "results" in data and "model_sha256" in data


def headline(results: list[Mapping[str, Any]], where: str) -> tuple[float, bool, tuple[str, ...]]:
    """(value, higher_is_better, tasks) of one eval file: mean accuracy, or mean ppl if only ppl."""
    accuracy = [r for r in results if r.get("metric") != "ppl"]
    chosen, higher = (accuracy, True) if accuracy else (list(results), False)
    values = []
    for r in chosen:
        value = (r.get("metrics") or {}).get(r.get("metric"))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SplitLLMError(f"{where}: task {r.get('task')!r} has no finite {r.get('metric')!r}")
        values.append(float(value))
    if not values:
        raise SplitLLMError(f"{where} holds no task results")
    return sum(values) / len(values), higher, tuple(sorted(str(r.get("task")) for r in chosen))


def _row(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    pipe = data["pipeline"]
    if pipe.get("codec") == "predictive":
        return _predictive_row(data, where)
    if pipe.get("codec") != "tabq":
        raise SplitLLMError(f"{where}: a split on the {pipe.get('codec')!r} wire is not a plan candidate "
                            "(plans run the TS + TAB-Q codec or the predictive one)")
    if pipe.get("tau") is not None:
        raise SplitLLMError(f"{where}: an absolute --tau is not a plan candidate (plans use a τ quantile)")
    if pipe.get("target_rel_error"):
        raise SplitLLMError(f"{where}: a run with --target-error is not a plan candidate "
                            "(calibration chose its own τ and q̄; plans fix them)")
    ell, bits = _edge(data, where)
    return {"split_layer": ell, "edge_bits": bits, "qa": pipe.get("qa", 16), "wire": "tabq", "q_bar": pipe.get("q_bar"),
            "tau": pipe.get("tau_quantile") or DEFAULT_TAU_QUANTILE,
            # eval records the codec recipe only when it is on; off is the paper's recipe. Keyed
            # always, so one recipe's accuracy never stands in for another's.
            "rotation": pipe.get("rotation", "none"), "channel_alpha": float(pipe.get("channel_alpha", 0.0))}


def _edge(data: Mapping[str, Any], where: str) -> tuple[int, list]:
    """(ℓ, the weight bits of the edge layers [0, ℓ)) a split run recorded."""
    bits = (data.get("info") or {}).get("weight_bits")
    ell = data["pipeline"].get("split_layer")
    if not isinstance(bits, list) or not isinstance(ell, int) or not 1 <= ell < len(bits):
        raise SplitLLMError(f"{where}: no per-layer weight bits or split layer recorded")
    return ell, bits[:ell]


def _predictive_row(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A predictive split's row: keyed by ℓ, edge bits, Qa and the wire (its q̄ and τ in a plan
    are nominal). Only the fit a plan deploys (the default error target) is a plan candidate."""
    key = str(data["pipeline"].get("predictive", ""))
    if f"bulk target {DEFAULT_PREDICTIVE_TARGET_REL_ERROR}," not in key or WIKITEXT2_TEST not in key:
        raise SplitLLMError(f"{where}: a predictive run fitted for another error or on another text "
                            f"({key or 'unrecorded'}) is not a plan candidate (plans deploy the default fit: "
                            f"bulk target {DEFAULT_PREDICTIVE_TARGET_REL_ERROR} on WikiText-2)")
    if f"table {PREDICTIVE_TABLE}" not in key:
        raise SplitLLMError(f"{where}: this predictive run predicted from the exact input embeddings, and plans "
                            f"deploy the codec that predicts from their 8-bit rows: re-run `splitllm eval`")
    ell, bits = _edge(data, where)
    return {"split_layer": ell, "edge_bits": bits, "qa": data["pipeline"].get("qa", 16), "wire": "predictive"}


def table_from_eval_results(paths: Iterable[str | os.PathLike[str]]) -> AccuracyTable:
    """An AccuracyTable from `splitllm eval --json` files (module docstring)."""
    baseline: float | None = None
    rows: list[dict[str, Any]] = []
    common: tuple | None = None
    n_layers = None
    for path in paths:
        where = f"eval results {path}"
        data = read_json(path, "accuracy table")
        if not is_eval_result(data):
            raise SplitLLMError(f"{where} is not a `splitllm eval --json` file (mixing table kinds is not supported)")
        value, higher, tasks = headline(list(data["results"]), where)
        key = (data["model_sha256"], data.get("limit"), tasks, higher)
        if common is not None and key != common:
            raise SplitLLMError(f"{where} covers another model, task list or --limit than the first file: "
                                "compare like with like")
        common = key
        kind = data["pipeline"].get("pipeline")
        if kind == "fp":
            if baseline is not None:
                raise SplitLLMError(f"{where}: more than one fp (baseline) result")
            baseline = value
        elif kind == "split":
            rows.append({**_row(data, where), "value": value})
            n_layers = n_layers or (data.get("info") or {}).get("n_layers")
        else:
            raise SplitLLMError(f"{where}: pipeline {kind!r} is not a plan candidate (give fp and split results)")
    if common is None:
        raise SplitLLMError("no eval result files given")
    if baseline is None:
        raise SplitLLMError("the eval results need one fp run as the baseline (`splitllm eval --pipeline fp`)")
    if not rows:
        raise SplitLLMError("the eval results hold no split run to plan with")
    _, limit, tasks, higher = common
    metric = (f"mean {'accuracy' if higher else 'perplexity'} over {', '.join(tasks)}"
              f"{f' (first {limit} each)' if limit else ''}")
    return AccuracyTable({"format_version": 1, "metric": metric, "higher_is_better": higher,
                          "baseline": baseline, "n_layers": n_layers, "results": rows}, "eval results")


def load_accuracy_table(paths: list[str | os.PathLike[str]]) -> AccuracyTable:
    """--accuracy-table: one hand-made table file, or one or more `splitllm eval --json` files."""
    if not paths:
        raise SplitLLMError("no accuracy table given")
    if len(paths) == 1:
        data = read_json(paths[0], "accuracy table")
        if not is_eval_result(data):
            return AccuracyTable(data, f"accuracy table {paths[0]}")
    return table_from_eval_results(paths)
