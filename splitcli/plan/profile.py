"""The persisted profile: measured per-layer costs of one model on one edge device.

`splitllm profile` writes it (YAML via `splitcli.configio`), `splitllm plan` reads it. Units in the
names: `_ms` milliseconds, `_bytes` bytes. Layer k is decoder layer k (0-based). Table keys:
- prefill_ms: {token count: ms to prefill that many tokens through the layer}
- weight_bytes: {bits: bytes of the layer's weights at that bit width} (eq. 1's B_w(k; Q))
- kv_bytes_per_token: {Qa bits: bytes one token adds to the layer's KV cache, overhead included}
- codec points (`splitcli.plan.codec_profile`): bytes per token the TS + TAB-Q + rANS codec
  produced at (q_bar, tau, recipe, split layer), the recipe being the rotation and channel α
  (`splitcli.plan.recipes`), and the distortion it left (`rel_error`, mean per-token relative L2
  error of the non-massive channels; format 2)
- decode_ms_by_bits / prefill_ms_by_bits (optional): the same timings with the layer's weights at
  that bit width (16 = not quantized), since a 4-bit kernel runs at another speed than fp32;
  `decode_ms` / `prefill_ms` stay the timings of the layer as loaded.
- embedding weight_bytes_by_bits (optional): the embedding table's bytes as the edge shard stores
  it ({8: per-row 8-bit codes + scales}); the planner costs the edge's embedding at the plan's
  embed_bits, since `splitllm quantize` writes it at 8 bits by default.
- timed_path (optional, format 2): "fast" when the timings were taken on the fast decode path
  `splitllm generate` runs (`splitcli.model.fast`), "eager" on the Hugging Face modules; absent:
  not recorded (profiles written before it was, all timed eagerly).
- codec_source (optional, format 3): the tokens whose hidden states the codec points were
  measured on: "calibration text" (the tail of WikiText-2's wiki.test.raw, the slice deployment
  calibrates on) or "random tokens" (no data directory or no tokenizer); absent: "random tokens"
  (profiles written before it was recorded all measured random tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from splitcli.cost.memory import KEEP_BITS, hidden_token_bytes
from splitcli.errors import SplitLLMError
from splitcli.plan._validate import (
    check_int, check_keys, check_number, check_table, require_mapping,
)
from splitcli.plan.codec_profile import PROFILE_FORMAT_VERSION, READABLE_PROFILE_VERSIONS, CodecCost, CodecPoint
from splitcli.plan.recipes import PAPER_RECIPE, Recipe

#: Decode paths a profile's timings can come from (`Profile.timed_path`).
TIMED_PATHS: tuple[str, ...] = ("fast", "eager")
#: Token sources a profile's codec points can be measured on (`Profile.codec_source`); the first
#: is what a profile without the field measured.
CODEC_SOURCES: tuple[str, ...] = ("random tokens", "calibration text")

__all__ = ["CODEC_SOURCES", "PROFILE_FORMAT_VERSION", "TIMED_PATHS", "READABLE_PROFILE_VERSIONS", "CodecCost", "CodecPoint", "DeviceInfo",
           "LayerCost", "Profile", "StageCost", "profile_from_architecture"]


@dataclass(frozen=True)
class DeviceInfo:
    """Where the profile was measured (free-form except memory, which the planner may default to)."""

    name: str
    cpu: str = ""
    threads: int = 0
    memory_bytes: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SplitLLMError("device name must be a non-empty string")
        check_int(self.threads, "device threads", 0)
        check_int(self.memory_bytes, "device memory_bytes", 0)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "cpu": self.cpu, "threads": self.threads,
                "memory_bytes": self.memory_bytes}

    @classmethod
    def from_dict(cls, data: Any) -> "DeviceInfo":
        data = require_mapping(data, "profile device")
        check_keys(data, {"name"}, {"cpu", "threads", "memory_bytes"}, "profile device")
        return cls(**data)


@dataclass(frozen=True)
class LayerCost:
    """Measured costs of one decoder layer."""

    prefill_ms: dict[int, float]
    decode_ms: float
    weight_bytes: dict[int, float]
    kv_bytes_per_token: dict[int, float]
    activation_peak_bytes: float
    decode_ms_by_bits: dict[int, float] = field(default_factory=dict)
    prefill_ms_by_bits: dict[int, dict[int, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefill_ms", check_table(self.prefill_ms, "layer prefill_ms"))
        if self.decode_ms_by_bits:
            object.__setattr__(self, "decode_ms_by_bits",
                               check_table(self.decode_ms_by_bits, "layer decode_ms_by_bits"))
        by_bits = require_mapping(self.prefill_ms_by_bits, "layer prefill_ms_by_bits")
        object.__setattr__(self, "prefill_ms_by_bits", {
            check_int(b, "key of layer prefill_ms_by_bits", 1):
                check_table(t, f"layer prefill_ms_by_bits[{b}]") for b, t in by_bits.items()})
        check_number(self.decode_ms, "layer decode_ms")
        object.__setattr__(self, "weight_bytes", check_table(self.weight_bytes, "layer weight_bytes"))
        object.__setattr__(
            self, "kv_bytes_per_token", check_table(self.kv_bytes_per_token, "layer kv_bytes_per_token")
        )
        check_number(self.activation_peak_bytes, "layer activation_peak_bytes")

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefill_ms": dict(self.prefill_ms), "decode_ms": self.decode_ms,
            "weight_bytes": dict(self.weight_bytes),
            "kv_bytes_per_token": dict(self.kv_bytes_per_token),
            "activation_peak_bytes": self.activation_peak_bytes,
            "decode_ms_by_bits": dict(self.decode_ms_by_bits),
            "prefill_ms_by_bits": {b: dict(t) for b, t in self.prefill_ms_by_bits.items()},
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "profile layer") -> "LayerCost":
        data = require_mapping(data, where)
        keys = {"prefill_ms", "decode_ms", "weight_bytes", "kv_bytes_per_token",
                "activation_peak_bytes"}
        check_keys(data, keys, {"decode_ms_by_bits", "prefill_ms_by_bits"}, where)
        return cls(**data)

    def decode_ms_at(self, bits: int | None) -> float:
        """Decode time with weights at `bits` (the as-loaded time when that width is unmeasured)."""
        return self.decode_ms_by_bits.get(bits, self.decode_ms) if bits is not None else self.decode_ms

    def prefill_ms_at(self, bits: int | None) -> dict[int, float]:
        return self.prefill_ms_by_bits.get(bits, self.prefill_ms) if bits is not None else self.prefill_ms


@dataclass(frozen=True)
class StageCost:
    """Costs of a non-layer stage: the embedding (edge) or the final norm + LM head (cloud)."""

    weight_bytes: float  # as loaded (float)
    decode_ms: float = 0.0
    prefill_ms: dict[int, float] = field(default_factory=dict)
    # Bytes when stored at a bit width (the edge's 8-bit embedding); 16 = kept as loaded.
    weight_bytes_by_bits: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_number(self.weight_bytes, "stage weight_bytes")
        check_number(self.decode_ms, "stage decode_ms")
        if self.prefill_ms:
            object.__setattr__(self, "prefill_ms", check_table(self.prefill_ms, "stage prefill_ms"))
        if self.weight_bytes_by_bits:
            object.__setattr__(self, "weight_bytes_by_bits",
                               check_table(self.weight_bytes_by_bits, "stage weight_bytes_by_bits"))

    def weight_bytes_at(self, bits: int) -> float:
        """Bytes stored at `bits`; as loaded for 16+ bits. An unmeasured width is an error so a
        plan is never costed with a number nobody measured."""
        if bits >= KEEP_BITS:
            return self.weight_bytes_by_bits.get(bits, self.weight_bytes)
        if bits not in self.weight_bytes_by_bits:
            raise SplitLLMError(f"profile has no embedding size at {bits} bits (re-run `splitllm profile`)")
        return self.weight_bytes_by_bits[bits]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"weight_bytes": self.weight_bytes, "decode_ms": self.decode_ms,
                               "prefill_ms": dict(self.prefill_ms)}
        if self.weight_bytes_by_bits:
            out["weight_bytes_by_bits"] = dict(self.weight_bytes_by_bits)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "StageCost":
        data = require_mapping(data, where)
        check_keys(data, {"weight_bytes"}, {"decode_ms", "prefill_ms", "weight_bytes_by_bits"}, where)
        return cls(**data)


@dataclass(frozen=True)
class Profile:
    """Per-layer measured costs of `model_id` on `device` (see module docstring for units)."""

    model_id: str
    hidden_size: int
    n_kv_heads: int
    head_dim: int
    device: DeviceInfo
    layers: tuple[LayerCost, ...]
    embedding: StageCost
    head: StageCost
    codec: CodecCost | None = None
    group_size: int | None = None  # weight quantization group the weight_bytes were counted for
    decode_context: int | None = None  # cached tokens each timed decode step attended to
    timed_path: str | None = None  # "fast" / "eager": the decode path the timings were taken on
    codec_source: str = CODEC_SOURCES[0]  # the tokens the codec points were measured on
    format_version: int = PROFILE_FORMAT_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id:
            raise SplitLLMError("profile model_id must be a non-empty string")
        if self.group_size is not None:
            check_int(self.group_size, "profile group_size", 1)
        if self.decode_context is not None:
            check_int(self.decode_context, "profile decode_context", 1)
        if self.timed_path not in TIMED_PATHS + (None,):
            raise SplitLLMError(f"profile timed_path must be one of {', '.join(TIMED_PATHS)}, got {self.timed_path!r}")
        if self.codec_source not in CODEC_SOURCES:
            raise SplitLLMError(f"profile codec_source must be one of {', '.join(CODEC_SOURCES)}, "
                                f"got {self.codec_source!r}")
        check_int(self.hidden_size, "profile hidden_size", 1)
        check_int(self.n_kv_heads, "profile n_kv_heads", 1)
        check_int(self.head_dim, "profile head_dim", 1)
        if self.format_version != PROFILE_FORMAT_VERSION:
            raise SplitLLMError(f"profile format_version must be {PROFILE_FORMAT_VERSION}")
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise SplitLLMError("profile must describe at least one layer")
        for k, layer in enumerate(self.layers):
            if not isinstance(layer, LayerCost):
                raise SplitLLMError(f"profile layer {k} must be a LayerCost")
        if self.codec is not None and self.codec.split_layers and self.codec.split_layers[-1] > len(self.layers):
            raise SplitLLMError(f"profile codec split_layer {self.codec.split_layers[-1]} exceeds the "
                                f"{len(self.layers)} layers")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def weight_table(self) -> list[dict[int, float]]:
        """bytes[layer][bits] for eq. (1)."""
        return [layer.weight_bytes for layer in self.layers]

    def kv_bytes_per_token(self, qa: int) -> list[float]:
        """Per-layer KV bytes per token at `qa` bits; an unmeasured qa is an error."""
        out = []
        for k, layer in enumerate(self.layers):
            if qa not in layer.kv_bytes_per_token:
                raise SplitLLMError(f"profile has no KV size for layer {k} at Qa={qa} bits")
            out.append(layer.kv_bytes_per_token[qa])
        return out

    def wire_bytes_per_token(self, q_bar: int, tau: float, tau_is_quantile: bool = False,
                             recipe: Recipe = PAPER_RECIPE, split_layer: int | None = None) -> float:
        """Hidden-state bytes per token on the wire at (q_bar, tau, recipe), split at
        `split_layer`: the codec point measured nearest to it (`CodecCost.point`), or hidden *
        q_bar / 8 when unmeasured (the TAB-Q body alone, without the sparse outliers or the
        entropy coder's gain: a rough estimate, good for ranking, not for a wire budget)."""
        point = self.codec.point(q_bar, tau, tau_is_quantile, recipe, split_layer) if self.codec is not None else None
        return point.bytes_per_token if point is not None else hidden_token_bytes(self.hidden_size, q_bar)

    def codec_rel_error(self, q_bar: int, tau: float, tau_is_quantile: bool = False,
                        recipe: Recipe = PAPER_RECIPE, split_layer: int | None = None) -> float | None:
        """The distortion measured at (q_bar, tau, recipe) nearest to `split_layer`; None when
        not measured."""
        point = self.codec.point(q_bar, tau, tau_is_quantile, recipe, split_layer) if self.codec is not None else None
        return None if point is None else point.rel_error

    def activation_peaks(self) -> list[float]:
        return [layer.activation_peak_bytes for layer in self.layers]

    def edge_decode_ms(self, l: int) -> float:
        """One decode step on the edge: embedding + layers [0, l) (codec time not included)."""
        check_int(l, "split layer l", 0, self.n_layers)
        return self.embedding.decode_ms + sum(layer.decode_ms for layer in self.layers[:l])

    def edge_decode_ms_at(self, weight_bits: "tuple[int | None, ...] | list[int | None]") -> float:
        """One decode step on the edge whose layers [0, len(weight_bits)) hold those weight bits
        (e.g. `Plan.edge_weight_bits`); per-bit timings where measured (codec time not included)."""
        l = len(weight_bits)
        check_int(l, "split layer l", 0, self.n_layers)
        return self.embedding.decode_ms + sum(
            layer.decode_ms_at(b) for layer, b in zip(self.layers[:l], weight_bits))

    def edge_prefill_ms_at(self, weight_bits: "tuple[int | None, ...] | list[int | None]",
                           n_tokens: int) -> float:
        """`edge_prefill_ms` with per-bit layer timings (see `edge_decode_ms_at`)."""
        l = len(weight_bits)
        check_int(l, "split layer l", 0, self.n_layers)
        check_int(n_tokens, "n_tokens", 0)
        stages = [self.embedding.prefill_ms or {1: self.embedding.decode_ms}]
        stages += [layer.prefill_ms_at(b) for layer, b in zip(self.layers[:l], weight_bits)]
        return float(sum(_interpolate_ms(points, n_tokens) for points in stages))

    def edge_prefill_ms(self, l: int, n_tokens: int) -> float:
        """Prefill of `n_tokens` on the edge (embedding + layers [0, l)), from the measured points.

        Between measured token counts: linear interpolation. Outside them: scaled in proportion
        to the nearest measured point (ms per token held constant), so 0 tokens cost 0 ms. A stage
        without prefill points falls back to n_tokens * decode_ms.
        """
        check_int(l, "split layer l", 0, self.n_layers)
        check_int(n_tokens, "n_tokens", 0)
        stages = [self.embedding.prefill_ms or {1: self.embedding.decode_ms}]
        stages += [layer.prefill_ms for layer in self.layers[:l]]
        return float(sum(_interpolate_ms(points, n_tokens) for points in stages))

    def written_version(self) -> int:
        """The oldest format that holds this profile (as plans do): 4 only with predictive codec
        points, so a profile without them still loads in a splitllm that reads format 3."""
        points = self.codec.points if self.codec is not None else ()
        new = any(p.wire != "tabq" or p.encode_ms is not None for p in points)
        return self.format_version if new else 3

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.written_version(), "model_id": self.model_id,
            "hidden_size": self.hidden_size, "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim, "device": self.device.to_dict(),
            "embedding": self.embedding.to_dict(), "head": self.head.to_dict(),
            "codec": None if self.codec is None else self.codec.to_dict(),
            "group_size": self.group_size, "decode_context": self.decode_context,
            "layers": [layer.to_dict() for layer in self.layers],
            **({} if self.timed_path is None else {"timed_path": self.timed_path}),
            # left out when it is what a profile without it means (random tokens) or nothing was measured
            **({} if self.codec is None or self.codec_source == CODEC_SOURCES[0]
               else {"codec_source": self.codec_source}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> "Profile":
        data = require_mapping(data, "profile")
        version = data.get("format_version")
        if isinstance(version, bool) or version not in READABLE_PROFILE_VERSIONS:
            newer = isinstance(version, int) and version > max(READABLE_PROFILE_VERSIONS)
            advice = ("written by a newer splitllm: upgrade, or re-run `splitllm profile` with this one" if newer
                      else "re-run `splitllm profile`")
            raise SplitLLMError(f"profile has format_version {version!r}; this splitllm reads versions "
                                f"{', '.join(map(str, READABLE_PROFILE_VERSIONS))} ({advice})")
        required = {"format_version", "model_id", "hidden_size", "n_kv_heads", "head_dim",
                    "device", "layers", "embedding", "head"}
        optional = {"codec", "group_size", "decode_context"} | (
            {"timed_path"} if version >= 2 else set()) | ({"codec_source"} if version >= 3 else set())
        check_keys(data, required, optional, "profile")
        if not isinstance(data["layers"], list):
            raise SplitLLMError("profile layers must be a list")
        codec = data.get("codec")
        return cls(
            model_id=data["model_id"], hidden_size=data["hidden_size"],
            n_kv_heads=data["n_kv_heads"], head_dim=data["head_dim"],
            device=DeviceInfo.from_dict(data["device"]),
            layers=tuple(LayerCost.from_dict(item, f"profile layer {k}")
                         for k, item in enumerate(data["layers"])),
            embedding=StageCost.from_dict(data["embedding"], "profile embedding"),
            head=StageCost.from_dict(data["head"], "profile head"),
            codec=None if codec is None else CodecCost.from_dict(codec, version),
            group_size=data.get("group_size"), decode_context=data.get("decode_context"),
            timed_path=data.get("timed_path"), codec_source=data.get("codec_source", CODEC_SOURCES[0]),
        )


def _interpolate_ms(points: Mapping[int, float], n_tokens: int) -> float:
    counts = sorted(points)
    if n_tokens <= counts[0]:
        return points[counts[0]] * n_tokens / counts[0]
    if n_tokens >= counts[-1]:
        return points[counts[-1]] * n_tokens / counts[-1]
    return float(np.interp(n_tokens, counts, [points[c] for c in counts]))


def profile_from_architecture(
    model_id: str,
    n_layers: int,
    hidden_size: int,
    n_kv_heads: int,
    head_dim: int,
    params_per_layer: int,
    embedding_params: int,
    weight_bits: tuple[int, ...] = (4, 8, 16, 32),
    kv_bits: tuple[int, ...] = (4, 8, 16, 32),
    group_size: int = 64,
    activation_peak_bytes: float = 0.0,
    decode_ms_per_layer: float = 0.0,
    device: DeviceInfo | None = None,
) -> Profile:
    """An estimated Profile from architecture numbers, for planning before anything is measured.

    Weight bytes at b < 16 bits: params * b / 8 plus one fp16 scale and one fp16 zero per group of
    `group_size` weights; at b >= 16 just params * b / 8. KV bytes per token: 2 * n_kv_heads *
    head_dim * qa / 8, plus an fp16 scale and zero per head for K and for V when qa < 16. The
    embedding is kept at 16 bits. Timings are the given constants (0 by default): a measured
    profile replaces every number here.
    """
    check_int(params_per_layer, "params_per_layer", 1)
    check_int(group_size, "group_size", 1)

    def weight(bits: int) -> float:
        body = params_per_layer * bits / 8
        return body + (math.ceil(params_per_layer / group_size) * 4 if bits < 16 else 0)

    def kv(qa: int) -> float:
        return 2 * n_kv_heads * head_dim * qa / 8 + (2 * n_kv_heads * 4 if qa < 16 else 0)

    layer = LayerCost(
        prefill_ms={1: decode_ms_per_layer}, decode_ms=decode_ms_per_layer,
        weight_bytes={b: weight(b) for b in weight_bits},
        kv_bytes_per_token={q: kv(q) for q in kv_bits},
        activation_peak_bytes=activation_peak_bytes,
    )
    return Profile(
        model_id=model_id, hidden_size=hidden_size, n_kv_heads=n_kv_heads, head_dim=head_dim,
        device=device or DeviceInfo(name="estimate"), layers=(layer,) * n_layers,
        embedding=StageCost(weight_bytes=embedding_params * 2.0,
                            weight_bytes_by_bits={8: embedding_params + 4.0 * embedding_params / hidden_size}),
        head=StageCost(weight_bytes=embedding_params * 2.0),
    )
