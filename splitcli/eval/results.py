"""The result of evaluating one task, and its JSON form (what the cache stores)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

RESULT_FORMAT_VERSION = 1


@dataclass(frozen=True)
class TaskResult:
    """Metric values for one task run.

    ``n`` is the number of examples (windows for perplexity) actually scored; ``limit`` is the
    limit that was asked for (None = all). ``stderr`` maps a metric to its standard error, None
    where undefined (perplexity, n < 2). ``details`` holds format-specific numbers such as
    ``seqlen``, ``windows`` and ``tokens`` for perplexity.
    """

    task: str
    metric: str  # the headline metric of the task spec
    metrics: Mapping[str, float]
    stderr: Mapping[str, float | None]
    n: int
    limit: int | None
    details: Mapping[str, Any] = field(default_factory=dict)
    format_version: int = RESULT_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.metric not in self.metrics:
            raise ValueError(f"headline metric {self.metric!r} not among {sorted(self.metrics)}")
        if self.n < 0:
            raise ValueError("n must be >= 0")

    @property
    def value(self) -> float:
        return self.metrics[self.metric]

    def to_json(self) -> dict[str, Any]:
        def clean(x: Any) -> Any:  # strict JSON has no NaN/Infinity; "inf"/"nan" parse back via float()
            return str(x) if isinstance(x, float) and not math.isfinite(x) else x

        return {
            "format_version": self.format_version,
            "task": self.task,
            "metric": self.metric,
            "metrics": {k: clean(v) for k, v in self.metrics.items()},
            "stderr": {k: clean(v) for k, v in self.stderr.items()},
            "n": self.n,
            "limit": self.limit,
            "details": {k: clean(v) for k, v in self.details.items()},
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TaskResult:
        if obj.get("format_version") != RESULT_FORMAT_VERSION:
            raise ValueError(f"unsupported result format_version {obj.get('format_version')!r}")
        return cls(
            task=obj["task"],
            metric=obj["metric"],
            metrics={k: float(v) for k, v in obj["metrics"].items()},
            stderr={k: None if v is None else float(v) for k, v in obj["stderr"].items()},
            n=int(obj["n"]),
            limit=obj["limit"],
            details=dict(obj["details"]),
        )
