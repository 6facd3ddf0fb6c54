"""Small checks shared by the persisted schemas (Profile, Plan): one-line SplitLLMError messages."""

from __future__ import annotations

import math
from typing import Any, Mapping

from splitcli.errors import SplitLLMError


def require_mapping(data: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise SplitLLMError(f"{where} must be a mapping, got {type(data).__name__}")
    return data


def check_keys(data: Mapping[str, Any], required: set[str], optional: set[str], where: str) -> None:
    missing = sorted(required - set(data))
    if missing:
        raise SplitLLMError(f"{where} is missing {', '.join(missing)}")
    unknown = sorted(set(data) - required - optional, key=str)
    if unknown:
        raise SplitLLMError(f"{where} has unknown keys {', '.join(map(str, unknown))}")


def check_int(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SplitLLMError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise SplitLLMError(f"{name} must lie in [{lo}, {hi}], got {value}")
    return value


def check_number(value: Any, name: str, low: float = 0.0, strict: bool = False) -> float:
    """A finite number >= low (or > low when `strict`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SplitLLMError(f"{name} must be a finite number, got {value!r}")
    if value < low or (strict and value == low):
        raise SplitLLMError(f"{name} must be {'>' if strict else '>='} {low}, got {value}")
    return value


def check_table(value: Any, name: str, key_low: int = 1) -> dict[int, float]:
    """A {int: number >= 0} mapping (e.g. weight bytes per bit width), copied."""
    table = require_mapping(value, name)
    if not table:
        raise SplitLLMError(f"{name} must not be empty")
    out: dict[int, float] = {}
    for key, item in table.items():
        out[check_int(key, f"key of {name}", key_low)] = check_number(item, f"{name}[{key}]")
    return out


def check_version(data: Mapping[str, Any], supported: int, where: str) -> int:
    version = data.get("format_version")
    if version != supported:
        raise SplitLLMError(
            f"{where} has format_version {version!r}; this splitllm reads version {supported}"
        )
    return supported
