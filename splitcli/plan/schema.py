"""The persisted plan: everything the edge and cloud runtimes need to run one split configuration.

Layers are 0-based: the edge runs decoder layers [0, split_layer), the cloud [split_layer, L).
OPSC (eq. 1): with method "front", layers [0, l_w) hold q_w1-bit weights and the rest q_w2; with
"back", the last l_w layers hold q_w1 and the rest q_w2. q_w2 = None means those layers are not
kept on the edge, which is only valid when every edge layer falls in the q_w1 segment.
Weight bits of 16 or more mean "not quantized" (kept in the model's float type).

`wire` (format 2) is the codec the split runs: "tabq" (the TS + TAB-Q codec of `codec`) or
"predictive" (the token-predictive codec, frame format 4, fitted at deployment for
`codec.target_rel_error`). A TAB-Q plan is still written as format 1, so an older splitllm reads
it; a predictive plan is format 2, which an older splitllm refuses by its version.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from splitcli.configio import load_config, write_yaml
from splitcli.plan.codec_settings import CodecSettings
from splitcli.cost.memory import MAX_LAYERS, layer_weight_bits
from splitcli.errors import SplitLLMError
from splitcli.plan._validate import (
    check_int, check_keys, check_number, require_mapping,
)

PLAN_FORMAT_VERSION = 2
#: Versions this splitllm reads (1: no `wire`, always TAB-Q).
READABLE_PLAN_VERSIONS = (1, 2)
PLAN_WIRES = ("tabq", "predictive")
#: The predictive codec predicts from 8-bit rows of the input embeddings (splitcli.deploy.predictive):
#: an edge storing its embedding at these bits holds them already, any other also holds them.
PREDICTIVE_TABLE_BITS = 8
#: The name a predictive codec records for that table (its other one, "exact", is the float table).
PREDICTIVE_TABLE = "rows8"


@dataclass(frozen=True)
class Budgets:
    """The constraints the plan was made for: edge memory (eq. 8c), accuracy drop (8b), deadline."""

    memory_bytes: int
    max_accuracy_drop: float
    deadline_s: float | None = None

    def __post_init__(self) -> None:
        check_int(self.memory_bytes, "budget memory_bytes", 1)
        check_number(self.max_accuracy_drop, "budget max_accuracy_drop")
        if self.deadline_s is not None:
            check_number(self.deadline_s, "budget deadline_s", strict=True)

    def to_dict(self) -> dict[str, Any]:
        return {"memory_bytes": self.memory_bytes, "max_accuracy_drop": self.max_accuracy_drop,
                "deadline_s": self.deadline_s}

    @classmethod
    def from_dict(cls, data: Any) -> "Budgets":
        data = require_mapping(data, "plan budgets")
        check_keys(data, {"memory_bytes", "max_accuracy_drop"}, {"deadline_s"}, "plan budgets")
        return cls(**data)


@dataclass(frozen=True)
class Plan:
    """One split configuration (the solution of eq. 8) plus the budgets it was chosen under."""

    model_id: str
    n_layers: int
    split_layer: int
    l_w: int
    method: str
    q_w1: int
    q_w2: int | None
    qa: int
    codec: CodecSettings
    group_size: int
    max_tokens: int
    budgets: Budgets
    i_kv: int = 1
    embed_bits: int = 8  # the edge's embedding table: 8-bit rows (quantize's default) or 16 = as loaded
    # the input width of the edge's 4-bit products at decode (splitllm's kernel): 16, or 8 (opt-in:
    # ~1.35x faster products, +0.21% WikiText-2 perplexity on SmolLM2-135M's int4 edge at ℓ = 15)
    edge_act_bits: int = 16
    wire: str = "tabq"
    format_version: int | None = None   # None: the lowest version that holds this plan (module docstring)
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id:
            raise SplitLLMError("plan model_id must be a non-empty string")
        if self.wire not in PLAN_WIRES:
            raise SplitLLMError(f"plan wire must be one of {', '.join(PLAN_WIRES)}, got {self.wire!r}")
        if self.format_version is None:
            object.__setattr__(self, "format_version", 1 if self.wire == "tabq" else PLAN_FORMAT_VERSION)
        if self.format_version not in READABLE_PLAN_VERSIONS or isinstance(self.format_version, bool):
            raise SplitLLMError(f"plan format_version must be one of {', '.join(map(str, READABLE_PLAN_VERSIONS))}")
        if self.wire != "tabq" and self.format_version < 2:
            raise SplitLLMError("a plan with wire predictive needs format_version 2")
        check_int(self.n_layers, "plan n_layers", 1, MAX_LAYERS)
        check_int(self.split_layer, "plan split_layer", 1, self.n_layers)
        check_int(self.l_w, "plan l_w", 0, self.n_layers)
        if self.method not in ("front", "back"):
            raise SplitLLMError(f"plan method must be 'front' or 'back', got {self.method!r}")
        check_int(self.q_w1, "plan q_w1", 1, 32)
        if self.q_w2 is not None:
            check_int(self.q_w2, "plan q_w2", 1, 32)
        check_int(self.qa, "plan qa", 1, 32)
        check_int(self.group_size, "plan group_size", 1)
        check_int(self.max_tokens, "plan max_tokens", 1)
        if self.embed_bits not in (8, 16) or isinstance(self.embed_bits, bool):
            raise SplitLLMError(f"plan embed_bits must be 8 or 16, got {self.embed_bits!r}")
        if self.edge_act_bits not in (8, 16) or isinstance(self.edge_act_bits, bool):
            raise SplitLLMError(f"plan edge_act_bits must be 8 or 16, got {self.edge_act_bits!r}")
        if self.i_kv not in (0, 1) or isinstance(self.i_kv, bool):
            raise SplitLLMError(f"plan i_kv must be 0 or 1, got {self.i_kv!r}")
        if not isinstance(self.codec, CodecSettings) or not isinstance(self.budgets, Budgets):
            raise SplitLLMError("plan codec and budgets must be CodecSettings and Budgets")
        if not isinstance(self.notes, dict):
            raise SplitLLMError("plan notes must be a mapping")
        missing = [k for k, b in enumerate(self.edge_weight_bits) if b is None]
        if missing:
            raise SplitLLMError(
                f"plan keeps no weights (q_w2 is None) for edge layers {missing[0]}..{missing[-1]};"
                f" raise l_w or set q_w2"
            )

    @property
    def edge_weight_bits(self) -> tuple[int | None, ...]:
        """Weight bits of each edge layer [0, split_layer)."""
        method = self.method  # validated in __post_init__
        bits = layer_weight_bits(self.n_layers, self.l_w, self.q_w1, self.q_w2, method)  # type: ignore[arg-type]
        return bits[: self.split_layer]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version, "model_id": self.model_id,
            "n_layers": self.n_layers, "split_layer": self.split_layer, "l_w": self.l_w,
            "method": self.method, "q_w1": self.q_w1, "q_w2": self.q_w2, "qa": self.qa,
            "i_kv": self.i_kv, "embed_bits": self.embed_bits, "edge_act_bits": self.edge_act_bits,
            **({"wire": self.wire} if self.format_version >= 2 else {}),
            "group_size": self.group_size, "max_tokens": self.max_tokens,
            "codec": self.codec.to_dict(), "budgets": self.budgets.to_dict(),
            "notes": dict(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        data = require_mapping(data, "plan")
        version = data.get("format_version")
        if version not in READABLE_PLAN_VERSIONS or isinstance(version, bool):
            raise SplitLLMError(f"plan has format_version {version!r}; this splitllm reads versions "
                                f"{', '.join(map(str, READABLE_PLAN_VERSIONS))}")
        required = {"format_version", "model_id", "n_layers", "split_layer", "l_w", "method",
                    "q_w1", "q_w2", "qa", "group_size", "max_tokens", "codec", "budgets"}
        optional = {"i_kv", "embed_bits", "edge_act_bits", "notes"} | ({"wire"} if version >= 2 else set())
        check_keys(data, required, optional, "plan")
        fields = {k: v for k, v in data.items() if k not in ("codec", "budgets")}
        fields["notes"] = dict(require_mapping(fields.get("notes") or {}, "plan notes"))
        return cls(codec=CodecSettings.from_dict(data["codec"], "plan codec"),
                   budgets=Budgets.from_dict(data["budgets"]), **fields)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        write_yaml(path, self.to_dict(), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Plan":
        return cls.from_dict(load_config(path))
