"""A plan (or its defaults) plus explicit overrides becomes one ready split: edge, cloud, wire.

`SplitSpec` is everything that decides what the edge and the cloud compute: ℓ, the OPSC weight
bits of the edge's layers (eq. 1), the edge's embedding bits, its KV-cache bits Qa, and the wire
(raw fp32, fp16, bf16, the calibrated TS + TAB-Q + rANS codec with its `CodecSettings`, or the
token-predictive codec of frame format 4, fitted once per model and ℓ).
`build_split` turns it into halves on a loaded model; `generate`, `eval`, the benches and the
servers all take their split from here, so for one plan they run the same edge.

Readings:
- The edge's layers are quantized on copies (the loaded model is left as it was, so an
  unquantized reference and a split can share one load); layers kept at 16 bits are shared.
- An 8-bit embedding is the edge's own copy (one group per row, as `splitllm quantize` stores
  it); the cloud's LM head keeps the full-precision table even when the model ties them.
- The cloud always runs layers [ℓ, L) in the loaded (full) precision.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from splitcli.configio import overlay
from splitcli.cost.memory import KEEP_BITS, layer_weight_bits
from splitcli.errors import SplitLLMError
from splitcli.model.shard_loader import QuantEdgeHalf
from splitcli.model.shards import EMBED_BITS
from splitcli.model.split import CloudHalf, DecoderParts, EdgeHalf, decoder_parts, validate_split_layer
from splitcli.plan.codec_settings import CodecSettings
from splitcli.plan.schema import Plan

WIRES = ("none", "fp16", "bf16", "tabq", "predictive")


@dataclass(frozen=True)
class SplitSpec:
    """What one split runs. None = the model-dependent default (ℓ = L // 2, l_w = ℓ, the largest
    of 128 / 64 that divides every layer width as group size). q_w1 = 16 keeps the edge's
    weights as loaded; q_w2 None = layers past l_w are not quantized either (only [0, ℓ) run on
    the edge in a split). wire "none" is the raw fp32 wire (compression off). predictive_file:
    a fitted predictive codec (.npz) to use instead of fitting one (the two ends of a networked
    split must hold the same codec: the cloud's file, copied to the edge). predictive_fit_text: a
    UTF-8 text file to fit the predictive codec on instead of WikiText-2 (text like the deployment's
    codes smaller: docs/results.md)."""

    split_layer: int | None = None
    q_w1: int = KEEP_BITS
    q_w2: int | None = None
    l_w: int | None = None
    method: str = "front"
    group_size: int | None = None
    qa: int = KEEP_BITS
    embed_bits: int = KEEP_BITS
    wire: str = "none"
    codec: CodecSettings = field(default_factory=CodecSettings)
    edge_act_bits: int = 16  # the edge's 4-bit products' input width (Int4Linear.act_bits)
    predictive_file: str | None = None
    predictive_fit_text: str | None = None

    def __post_init__(self) -> None:
        if self.method not in ("front", "back"):
            raise SplitLLMError(f"OPSC method must be 'front' or 'back', got {self.method!r}")
        if self.group_size is not None and self.group_size < 1:
            raise SplitLLMError(f"group size must be >= 1, got {self.group_size}")
        if self.embed_bits not in EMBED_BITS:
            raise SplitLLMError(f"edge embedding bits must be one of {EMBED_BITS}, got {self.embed_bits!r}")
        if self.wire not in WIRES:
            raise SplitLLMError(f"wire must be one of {', '.join(WIRES)}, got {self.wire!r}")
        if not isinstance(self.codec, CodecSettings):
            raise SplitLLMError("SplitSpec.codec must be CodecSettings")
        if self.edge_act_bits not in (8, 16) or isinstance(self.edge_act_bits, bool):
            raise SplitLLMError(f"edge activation bits must be 8 or 16, got {self.edge_act_bits!r}")
        if self.predictive_file is not None and self.wire != "predictive":
            raise SplitLLMError("a predictive codec file needs the predictive wire (--codec predictive)")
        if self.predictive_fit_text is not None and (self.wire != "predictive" or self.predictive_file is not None):
            raise SplitLLMError("a fit text is for fitting the predictive codec: it needs the predictive wire and "
                                "no codec file (the file's codec is fitted already)")

    @classmethod
    def from_plan(cls, plan: Plan, wire: str | None = None) -> "SplitSpec":
        """The plan's split: its ℓ, OPSC bits, group size, Qa, embedding bits and codec (its wire
        unless `wire` is given)."""
        return cls(split_layer=plan.split_layer, q_w1=plan.q_w1, q_w2=plan.q_w2, l_w=plan.l_w,
                   method=plan.method, group_size=plan.group_size, qa=plan.qa, embed_bits=plan.embed_bits,
                   wire=plan.wire if wire is None else wire, codec=plan.codec, edge_act_bits=plan.edge_act_bits)

    @property
    def compression_off(self) -> bool:
        """Nothing lossy: unquantized edge weights, embedding and KV, and the raw fp32 wire (the
        edge's activation bits act on 4-bit weights only)."""
        return (self.q_w1 >= KEEP_BITS and (self.q_w2 is None or self.q_w2 >= KEEP_BITS)
                and self.qa >= KEEP_BITS and self.embed_bits >= KEEP_BITS and self.wire == "none")

    def with_flags(self, codec: dict[str, Any] | None = None, **flags: Any) -> "SplitSpec":
        """This spec with every explicit (non-None) flag applied: the one "plan sets defaults,
        flags win" rule, for the split's own fields and for the codec settings."""
        spec = overlay(self, **flags)
        if codec:
            spec = dataclasses.replace(spec, codec=overlay(spec.codec, **codec))
        return spec

    def resolve(self, model) -> "SplitSpec":
        """Model-dependent defaults filled in and checked against `model`."""
        from splitcli.quant import default_group_size, layer_shapes_of

        parts = decoder_parts(model)
        n = parts.num_layers
        ell = validate_split_layer(n // 2 if self.split_layer is None else self.split_layer, n)
        l_w = ell if self.l_w is None else self.l_w
        if not 0 <= l_w <= n:
            raise SplitLLMError(f"l_w = {l_w} must lie in [0, {n}]")
        group = self.group_size
        if group is None:
            group = default_group_size(layer_shapes_of(parts.layers[0]))
        return dataclasses.replace(self, split_layer=ell, l_w=l_w, group_size=group)

    def edge_bits(self, n_layers: int) -> list[int | None]:
        """Weight bits of the edge's layers [0, ℓ) (16 = as loaded) of a resolved spec."""
        assert self.split_layer is not None and self.l_w is not None, "resolve() first"
        q_w2 = KEEP_BITS if self.q_w2 is None else self.q_w2
        bits = layer_weight_bits(n_layers, self.l_w, self.q_w1, q_w2, self.method)  # type: ignore[arg-type]
        return list(bits[: self.split_layer])


class PlannedEdge(QuantEdgeHalf):
    """The edge half of a plan: a QuantEdgeHalf whose cache holds keys and values at the spec's
    `qa` bits (`kv_bits`; 16: the model's float cache), as a shard-loaded edge does."""

    def __init__(self, parts: DecoderParts, split_layer: int, qa: int):
        super().__init__(parts, split_layer, kv_bits=qa)


def planned_edge(model, spec: SplitSpec) -> PlannedEdge:
    """The edge half of a resolved `spec` on `model`: quantized copies of its layers, its
    embedding at spec.embed_bits and its KV at spec.qa bits. `model` is not changed."""
    from torch import nn

    from splitcli.quant import KVQuantConfig, QuantEmbedding, quantize_layers_, use_int4_act_bits_

    parts = decoder_parts(model)
    if spec.qa < KEEP_BITS:
        KVQuantConfig(bits=spec.qa)  # a clear error for an unsupported Qa before any work
    if spec.qa < KEEP_BITS and any(t != "full_attention" for t in parts.layer_types[: spec.split_layer]):
        raise SplitLLMError("a quantized KV cache (Qa < 16) supports full-attention edge layers only; use Qa = 16")
    bits = spec.edge_bits(parts.num_layers)
    quantized = [i for i, b in enumerate(bits) if b is not None and b < KEEP_BITS]
    layers = nn.ModuleList(list(parts.layers))  # the same modules; quantized ones replaced below
    if quantized:
        copies = nn.ModuleList([copy.deepcopy(parts.layers[i]) for i in quantized])
        quantize_layers_(copies, range(len(quantized)), [bits[i] for i in quantized], spec.group_size)
        use_int4_act_bits_(copies, spec.edge_act_bits)
        for i, layer in zip(quantized, copies):
            layers[i] = layer
    # the edge's own copy, one group per row as shards store it
    embed = parts.embed_tokens if spec.embed_bits >= KEEP_BITS else QuantEmbedding.from_embedding(
        parts.embed_tokens, bits=spec.embed_bits)
    edge_parts = dataclasses.replace(parts, layers=layers, embed_tokens=embed)
    return PlannedEdge(edge_parts, spec.split_layer, spec.qa)


@dataclass
class Split:
    """A ready split: its halves, its wire and the resolved spec; `session()` starts a generation."""

    spec: SplitSpec
    edge: EdgeHalf
    cloud: CloudHalf
    wire: Any
    info: dict[str, Any] = field(default_factory=dict)

    def session(self, wire=None):
        """A fresh SplitSession (own caches) over these halves; `wire` replaces the split's."""
        from splitcli.runtime.session import SplitSession

        return SplitSession.from_halves(self.edge, self.cloud, wire=wire or self.wire)


def build_wire(spec: SplitSpec, lm, data_dir=None, progress: Callable[[str], None] | None = None,
               keep_stats: bool = True):
    """The wire of a resolved spec: raw fp32 / fp16, or the codec calibrated on `lm` at ℓ."""
    from splitcli.runtime.wire import RawWire

    if spec.wire == "none":
        return RawWire("fp32")
    if spec.wire in ("fp16", "bf16"):
        return RawWire(spec.wire)
    if spec.wire == "predictive":
        from splitcli.deploy.predictive import fitted_predictive, predictive_from_file
        from splitcli.runtime.codec_wire import PredictiveWire

        if spec.predictive_file is not None:
            pc, emb, info = predictive_from_file(spec.predictive_file, lm, spec.split_layer)
        else:
            target = spec.codec.target_rel_error   # the stated distortion, as for tabq: the step's target
            pc, emb, info = fitted_predictive(lm, spec.split_layer, data_dir, progress,
                                              **({} if target is None else {"target_rel_error": target}),
                                              fit_text=spec.predictive_fit_text)
        wire = PredictiveWire(pc, emb, keep_stats=keep_stats)
        wire.path = info["path"]
        return wire
    from splitcli.deploy.calibrate import calibrated_config
    from splitcli.runtime.codec_wire import CodecWire

    cfg, _ = calibrated_config(lm, spec.split_layer, spec.codec, data_dir, progress)
    return CodecWire(cfg, keep_stats=keep_stats)


def build_split(lm, spec: SplitSpec, data_dir=None, progress: Callable[[str], None] | None = None,
                keep_stats: bool = True) -> Split:
    """The split `spec` describes on the loaded model `lm` (a LoadedModel); `lm.model` is unchanged."""
    spec = spec.resolve(lm.model)
    parts = decoder_parts(lm.model)
    edge = planned_edge(lm.model, spec) if not spec.compression_off else EdgeHalf(parts, spec.split_layer)
    wire = build_wire(spec, lm, data_dir, progress, keep_stats=keep_stats)
    info = {"weight_bits": spec.edge_bits(parts.num_layers), "wire": wire.name}
    if spec.wire == "tabq":
        cfg = wire.cfg
        info["codec"] = {"tau": cfg.tau, "q_bar": cfg.q_bar, "delta": cfg.delta, "entropy": cfg.entropy,
                         "rotation_seed": cfg.rotation_seed, "channel_scale": cfg.channel_scale is not None}
    elif spec.wire == "predictive":
        info["codec"] = {"frame_version": 4, "step": wire.pc.step, "fit": wire.pc.info, "path": wire.path,
                         "crc": f"{wire.pc.crc:08x}"}
    return Split(spec, edge, CloudHalf(parts, spec.split_layer), wire, info)


def pin_predictive_codec(lm, spec: SplitSpec, data_dir=None,
                         progress: Callable[[str], None] | None = None) -> tuple[SplitSpec, dict | None]:
    """(spec, codec) for a front whose replicas each build their own split (Ray Serve): the
    predictive codec is fitted here, or read from the cache or the spec's file, once, and the spec
    names its file, so every replica holds the same codec (an edge's Open is checked against its
    crc). codec: {"path", "crc"}; other wires: the spec unchanged and None."""
    if spec.wire != "predictive":
        return spec, None
    wire = build_wire(spec.resolve(lm.model), lm, data_dir, progress, keep_stats=False)
    pinned = dataclasses.replace(spec, predictive_file=wire.path, predictive_fit_text=None)
    return pinned, {"path": wire.path, "crc": f"{wire.pc.crc:08x}"}


def build_shard_split(shard_dir, wire: str = "none", codec: CodecSettings | None = None,
                      split_layer: int | None = None, model_sha256: str | None = None, data_dir=None,
                      progress: Callable[[str], None] | None = None, keep_stats: bool = True,
                      edge_act_bits: int = 16, predictive_file: str | None = None,
                      predictive_fit_text: str | None = None):
    """(Split, tokenizer, manifest) from a directory written by `splitllm quantize`: the edge half
    from edge.safetensors, the cloud half from cloud.safetensors. With the codec wire, the codec
    is calibrated on the shard's own edge (the only edge there is: its quantized layers produce
    what crosses the wire), cached under the edge shard's sha256; so is the predictive codec, unless
    `predictive_file` names one (the cloud's; `predictive_fit_text`: fitted on that text), which
    predicts from the shard's own 8-bit embedding rows (or the same rows made from a float table).
    edge_act_bits: as SplitSpec's (a run-time setting: shards do not store it)."""
    from types import SimpleNamespace

    from splitcli.model.shard_loader import load_cloud, load_edge, load_tokenizer
    from splitcli.quant import use_int4_act_bits_

    spec = SplitSpec(wire=wire, codec=codec or CodecSettings(), edge_act_bits=edge_act_bits,  # checked first
                     predictive_file=predictive_file, predictive_fit_text=predictive_fit_text)
    edge = load_edge(shard_dir, split_layer, model_sha256)
    cloud = load_cloud(shard_dir, split_layer, model_sha256)
    tokenizer = load_tokenizer(shard_dir)
    m = edge.manifest
    spec = dataclasses.replace(spec, split_layer=m.split_layer, q_w1=m.front_bits, q_w2=m.back_bits, l_w=m.l_w,
                               method=m.method, group_size=m.group_size, qa=m.kv_bits, embed_bits=m.embed_bits)
    use_int4_act_bits_(edge.model, edge_act_bits)
    # the shard's edge stands in for the model when calibrating: its layers [0, ℓ) are real
    edge_lm = SimpleNamespace(model=edge.model, tokenizer=tokenizer, sha256=m.files["edge.safetensors"]["sha256"])
    wire_ = build_wire(spec, edge_lm, data_dir, progress, keep_stats=keep_stats)
    return Split(spec, edge.half, cloud.half, wire_, {"wire": wire_.name, "shards": str(shard_dir)}), tokenizer, m


def opsc_edge_model(model, spec: SplitSpec):
    """A copy of `model` as an edge holding ALL layers would run it: every layer at its OPSC bits
    (eq. 1; q_w2 None = as loaded), the embedding at spec.embed_bits. For edge-local generation
    before a handoff (Fig. 5b); `model` is not changed. `spec` may be unresolved (its model-dependent
    defaults are filled in from `model`)."""
    from torch import nn

    from splitcli.quant import QuantEmbedding, quantize_layers_, use_int4_act_bits_

    spec = spec.resolve(model)
    parts = decoder_parts(model)
    q_w2 = KEEP_BITS if spec.q_w2 is None else spec.q_w2
    bits = list(layer_weight_bits(parts.num_layers, spec.l_w, spec.q_w1, q_w2, spec.method))  # type: ignore[arg-type]
    if all(b is None or b >= KEEP_BITS for b in bits) and spec.embed_bits >= KEEP_BITS:
        return model
    edge_model = copy.deepcopy(model)
    edge_parts = decoder_parts(edge_model)
    quantize_layers_(edge_parts.layers, range(len(bits)), bits, spec.group_size)
    use_int4_act_bits_(edge_parts.layers, spec.edge_act_bits)
    if spec.embed_bits < KEEP_BITS:
        if edge_model.get_output_embeddings() is not None and \
                edge_model.get_output_embeddings().weight is edge_parts.embed_tokens.weight:
            edge_model.get_output_embeddings().weight = nn.Parameter(edge_parts.embed_tokens.weight.detach().clone())
        edge_model.model.embed_tokens = QuantEmbedding.from_embedding(edge_parts.embed_tokens, bits=spec.embed_bits)
    return edge_model


def handoff_session(lm, split: Split):
    """A fresh session of `split` whose edge first generates alone with all layers (its OPSC
    model, `opsc_edge_model`), then hands off to the cloud: on the fast decode path where it runs
    the model (`runtime.fast.FastHandoffSession`), else eager (`runtime.handoff.HandoffSession`)."""
    from splitcli.runtime.fast import fast_handoff_session
    from splitcli.runtime.handoff import HandoffSession

    edge_model = opsc_edge_model(lm.model, split.spec)
    return fast_handoff_session(split, edge_model) or HandoffSession(
        lm.model, split.spec.split_layer, wire=split.wire, edge=split.edge, edge_model=edge_model)
