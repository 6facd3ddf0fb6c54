"""Accuracy drops for the planner's eq. (8b): from a results table, or a quick perplexity proxy.

Drop = how much worse a candidate is than the unquantized model, as a fraction of the baseline:
(value - baseline) / baseline for lower-is-better metrics (perplexity), (baseline - value) /
baseline for higher-is-better ones (task accuracy).

The proxy (used when no results table is given; it runs the model, so it lives in
`splitcli.deploy.proxy`) is WikiText-2 perplexity on a short calibration slice (by default 1 window of 512 tokens from the start of the test split), with the candidate's
edge layers [0, l) fake-quantized to their OPSC weight bits (group-wise RTN, dequantized back to
fp32) and, when Qa < 16, the edge layers' keys and values stored in a Qa-bit cache. What it does
not model: the codec (q_bar, tau, recipe) on the hidden state; the planner bounds the codec's
own measured error instead (`splitcli.plan.recipes`). It is a proxy: a few hundred tokens rank
configurations, they do not measure task accuracy; the planner says so in its output.

Cost control: each layer's quantized codes are computed once per bit width and reused; perplexity
is cached per distinct effective configuration (edge weight bits, and Qa with the layers it
covers), so the many candidates that share one (e.g. every l_w >= l) cost one evaluation.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from splitcli.cost.memory import KEEP_BITS, layer_weight_bits
from splitcli.configio import io_reason
from splitcli.errors import SplitLLMError
from splitcli.plan.enumerate import Candidate

TABLE_FORMAT_VERSION = 1
_CANDIDATE_KEYS = ("split_layer", "l_w", "method", "q_w1", "q_w2", "qa", "q_bar", "tau", "rotation", "channel_alpha",
                   "wire")
_MATCH_KEYS = _CANDIDATE_KEYS + ("edge_bits",)


def edge_bits(candidate: Candidate, n_layers: int) -> tuple[int | None, ...]:
    """Weight bits of the candidate's edge layers [0, l) (the cloud keeps full precision)."""
    bits = layer_weight_bits(n_layers, candidate.l_w, candidate.q_w1, candidate.q_w2, candidate.method)  # type: ignore[arg-type]
    return bits[: candidate.split_layer]


class AccuracyTable:
    """Measured accuracy per configuration, read from a JSON results file.

    {"format_version": 1, "metric": "wikitext2_ppl", "higher_is_better": false, "baseline": 21.4,
     "results": [{"split_layer": 15, "l_w": 15, "method": "front", "q_w1": 4, "q_w2": null,
                  "qa": 16, "value": 25.7}, {"q_w1": 8, "drop": 0.002}, ...]}
    Each result gives `value` (turned into a drop against `baseline`) or `drop` directly. Keys it
    leaves out (any of split_layer, l_w, method, q_w1, q_w2, qa, q_bar, tau, the codec
    recipe's rotation and channel_alpha, and `wire`: tabq or predictive) match every
    candidate; the first matching result wins. A candidate no result matches counts as not
    measured, which the planner rejects. A result may also give `edge_bits` (the weight bits of
    edge layers [0, l), 16 = unquantized), which matches every (l_w, method, q_w1, q_w2) that puts
    those bits on the edge; the table then needs `n_layers`.
    """

    def __init__(self, data: Any, where: str = "accuracy table"):
        if not isinstance(data, Mapping):
            raise SplitLLMError(f"{where} must be a JSON object")
        if data.get("format_version") != TABLE_FORMAT_VERSION:
            raise SplitLLMError(f"{where} has format_version {data.get('format_version')!r}; expected {TABLE_FORMAT_VERSION}")
        results = data.get("results")
        if not isinstance(results, list) or not results:
            raise SplitLLMError(f"{where} needs a non-empty 'results' list")
        self.metric = str(data.get("metric", "accuracy"))
        self.higher_is_better = bool(data.get("higher_is_better", True))
        baseline = data.get("baseline")
        self.n_layers = data.get("n_layers")
        self.rows: list[tuple[dict[str, Any], float]] = []
        for i, row in enumerate(results):
            if not isinstance(row, Mapping):
                raise SplitLLMError(f"{where} result {i} must be an object")
            unknown = set(row) - set(_MATCH_KEYS) - {"value", "drop"}
            if unknown:
                raise SplitLLMError(f"{where} result {i} has unknown keys {', '.join(sorted(unknown))}")
            keys = {k: row[k] for k in _MATCH_KEYS if k in row}
            if "edge_bits" in keys:
                if not isinstance(self.n_layers, int) or isinstance(self.n_layers, bool) or self.n_layers < 1:
                    raise SplitLLMError(f"{where} uses edge_bits but gives no positive integer n_layers")
                keys["edge_bits"] = _bits_tuple(keys["edge_bits"], f"{where} result {i} edge_bits")
            self.rows.append((keys, self._drop(row, baseline, f"{where} result {i}")))

    def _drop(self, row: Mapping[str, Any], baseline: Any, where: str) -> float:
        if "drop" in row:
            drop = row["drop"]
        elif "value" in row:
            if not isinstance(baseline, (int, float)) or not math.isfinite(baseline) or baseline == 0:
                raise SplitLLMError(f"{where} gives a value but the table has no usable 'baseline'")
            value = row["value"]
            if not isinstance(value, (int, float)):
                raise SplitLLMError(f"{where} value must be a number")
            drop = (baseline - value) / baseline if self.higher_is_better else (value - baseline) / baseline
        else:
            raise SplitLLMError(f"{where} needs 'value' or 'drop'")
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or math.isnan(drop):
            raise SplitLLMError(f"{where} drop must be a number")
        return float(drop)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "AccuracyTable":
        return cls(read_json(path, "accuracy table"), f"accuracy table {path}")

    def drop(self, candidate: Candidate) -> float:
        for keys, drop in self.rows:
            if all(self._field(candidate, k) == v for k, v in keys.items()):
                return drop
        return math.nan

    def _field(self, candidate: Candidate, key: str) -> Any:
        if key != "edge_bits":
            return getattr(candidate, key)
        # None (a layer the edge does not keep) cannot occur for edge layers of a valid candidate.
        return tuple(KEEP_BITS if b is None or b >= KEEP_BITS else b
                     for b in edge_bits(candidate, self.n_layers))  # type: ignore[arg-type]


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """A JSON file's content, or a one-line error naming `what` and the path."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SplitLLMError(f"{what} not found: {path}") from None
    except (OSError, ValueError, RecursionError) as exc:
        # ValueError: bad JSON, bad UTF-8, an integer over Python's 4300-digit limit;
        # RecursionError: `[[[[...` nested thousands deep
        raise SplitLLMError(f"cannot read {what} {path}: {io_reason(exc)}") from None


def _bits_tuple(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise SplitLLMError(f"{where} must be a non-empty list of bit widths")
    out = []
    for b in value:
        if b is None:
            b = KEEP_BITS
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise SplitLLMError(f"{where} must hold positive integers (or null = unquantized), got {b!r}")
        out.append(min(b, KEEP_BITS))
    return tuple(out)
