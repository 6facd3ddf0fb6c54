"""The pipelines `splitllm eval` scores, each built into a LogitsFn from a loaded model.

- ``fp``: the unsplit model (through `UnsplitSession`, the same runtime path as everything else).
- ``split``: `SplitSession` at ℓ: the edge runs layers [0, ℓ) with OPSC weights (eq. 1: layers
  [0, l_w) at q_w1 bits, the rest of the edge at q_w2), the hidden state crosses the wire (the
  calibrated TS + TAB-Q codec, or the raw fp32 wire with ``codec="none"``), the cloud runs
  [ℓ, L) in full precision.
- ``local``: the whole OPSC model (bits from `opsc_bits(L, l_w, q_w1, q_w2)`) on the edge, no
  wire, no cloud.
- ``rtn-w4a16``, ``smoothquant-w4a{4,3}``, ``atom-w4a{4,3}``: full-model simulated-quantization
  baselines, see `splitcli.eval.baselines`.

How the paper was read:
- l_w defaults to ℓ (every edge layer at q_w1) and q_w2 to 16 (unquantized), so with the default
  ``split`` the cloud is full precision and the edge all q_w1 bits, as in Tables 2 and 3.
- Entropy coding (rANS) is lossless, so it cannot change a logit; the evaluator turns it off by
  default (``entropy=False``) because it only costs time here. The decoded hidden states are those
  of the deployed codec with the same tau / q_bar / delta.
- The split is built by the deployment layer (`splitcli.deploy.build_split`) exactly as
  `splitllm generate` builds it: for one plan both run the same edge (OPSC weights, embedding
  bits, KV bits) and the same calibrated codec.
- The codec is calibrated as `splitllm generate` calibrates it (`splitcli.deploy.calibrate`:
  tau at the 0.999 quantile of |x| of the full-precision model's hidden state at ℓ over the last
  2048 tokens of WikiText-2, cached on disk). Evaluation windows are the first ones of that text.
- Codecs: ``tabq`` = threshold splitting + TAB-Q (tau = inf: TAB-Q alone, Table 5's
  "Baseline + TAB-Q"); ``fp16`` = the raw wire in fp16, read as "threshold splitting without
  TAB-Q" (values above tau travel exactly either way, the body at 16 bits); ``none`` = raw fp32.
- KV-cache quantization (Q_a of eq. 2) runs as in generation, but scoring is a single prefill per
  request, where attention reads the quantized cache of the tokens before each one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from splitcli.cost.memory import KEEP_BITS
from splitcli.data import WIKITEXT2_TEST
from splitcli.errors import SplitLLMError
from splitcli.eval.protocols import LogitsFn
from splitcli.plan.codec_settings import CodecSettings

PIPELINE_FORMAT_VERSION = 1
BASELINES = ("rtn-w4a16", "atom-w4a4", "atom-w4a3", "smoothquant-w4a4", "smoothquant-w4a3")
PIPELINES = ("fp", "split", "local") + BASELINES
CODECS = ("tabq", "none", "fp16", "bf16", "predictive")


@dataclass(frozen=True)
class PipelineConfig:
    """What defines one evaluated pipeline (hashed, with the model's sha256, into the result cache).

    split_layer / l_w / group_size: None = the model-dependent default (ℓ = L // 2, l_w = ℓ,
    group = `default_group_size`, 64 on SmolLM2-135M); `resolve` fills them in.
    qa / embed_bits: the edge's KV-cache bits and embedding bits (16 = as loaded).
    codec: the wire of ``split`` (tabq / none / fp16 / bf16 / predictive); codec_settings: its `CodecSettings`
    (rANS off by default: it is lossless, so it only costs time here); predictive_fit_text: a text
    file the predictive codec is fitted on instead of WikiText-2 (keyed by its content).
    calib_tokens / alpha / keep_channels: the baselines' calibration (see `baselines`).
    """

    pipeline: str = "fp"
    split_layer: int | None = None
    q_w1: int = 4
    q_w2: int = 16
    l_w: int | None = None
    method: str = "front"
    group_size: int | None = None
    qa: int = KEEP_BITS
    embed_bits: int = KEEP_BITS
    codec: str = "tabq"
    codec_settings: CodecSettings = field(default_factory=lambda: CodecSettings(entropy=False))
    calib_tokens: int = 512
    alpha: float = 0.5
    keep_channels: int | None = None
    predictive_fit_text: str | None = None
    format_version: int = PIPELINE_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.pipeline not in PIPELINES:
            raise SplitLLMError(f"unknown pipeline {self.pipeline!r}; choose one of {', '.join(PIPELINES)}")
        if self.codec not in CODECS:
            raise SplitLLMError(f"--codec must be one of {', '.join(CODECS)}, got {self.codec!r}")
        if self.predictive_fit_text is not None and (self.pipeline != "split" or self.codec != "predictive"):
            raise SplitLLMError("a fit text fits the predictive codec: it needs --pipeline split --codec predictive")
        if self.method not in ("front", "back"):
            raise SplitLLMError(f"OPSC method must be 'front' or 'back', got {self.method!r}")
        if self.split_layer is not None and self.split_layer < 1:
            raise SplitLLMError(f"--split-layer must be >= 1, got {self.split_layer}")
        if self.group_size is not None and self.group_size < 1:
            raise SplitLLMError(f"group size must be >= 1, got {self.group_size}")
        if not isinstance(self.codec_settings, CodecSettings):
            raise SplitLLMError("PipelineConfig.codec_settings must be CodecSettings")
        if not 0.0 <= self.alpha <= 1.0:
            raise SplitLLMError(f"SmoothQuant alpha must lie in [0, 1], got {self.alpha}")
        if self.calib_tokens < 1:
            raise SplitLLMError(f"calib_tokens must be >= 1, got {self.calib_tokens}")
        if self.keep_channels is not None and self.keep_channels < 0:
            raise SplitLLMError(f"keep_channels must be >= 0, got {self.keep_channels}")
        if self.format_version != PIPELINE_FORMAT_VERSION:
            raise SplitLLMError(f"pipeline config version {self.format_version} is not supported")

    @property
    def compression_off(self) -> bool:
        """``split`` with nothing lossy: unquantized edge weights, embedding and KV, and the raw wire."""
        return (self.q_w1 == 16 and self.q_w2 == 16 and self.codec == "none"
                and self.qa >= KEEP_BITS and self.embed_bits >= KEEP_BITS)

    def split_spec(self):
        """The deployment layer's `SplitSpec` of a ``split`` / ``local`` pipeline."""
        from splitcli.deploy import SplitSpec

        return SplitSpec(split_layer=self.split_layer, q_w1=self.q_w1, q_w2=self.q_w2, l_w=self.l_w,
                         method=self.method, group_size=self.group_size, qa=self.qa, embed_bits=self.embed_bits,
                         wire=self.codec, codec=self.codec_settings, predictive_fit_text=self.predictive_fit_text)

    def relevant(self) -> dict[str, Any]:
        """The fields that change this pipeline's numbers (the cache key; other fields are ignored).
        Codec settings are flattened and qa / embed_bits appear only when not 16, so keys of
        results cached before they existed stay valid."""
        d = asdict(self)
        d.update({k: v for k, v in self.codec_settings.to_dict().items() if k in ("tau", "tau_quantile", "q_bar", "delta")})
        keep = {"pipeline", "format_version"}
        if self.pipeline in ("split", "local"):
            keep |= {"split_layer", "q_w1", "q_w2", "l_w", "method", "group_size"}
            keep |= {k for k in ("qa", "embed_bits") if d[k] < KEEP_BITS}
        if self.pipeline == "split":
            keep |= {"codec"} | ({"tau", "tau_quantile", "q_bar", "delta"} if self.codec == "tabq" else set())
            if self.codec == "tabq":   # codec v3 switches: keyed only when on, so older keys stay valid
                cs = self.codec_settings
                v3 = dict(rotation=cs.rotation, rotation_seed=cs.rotation_seed) if cs.rotation != "none" else {}
                v3.update({k: getattr(cs, k) for k in ("channel_alpha", "target_rel_error") if getattr(cs, k)})
                d.update(v3)
                keep |= set(v3)
            if self.codec == "predictive":   # fitted by deploy.predictive: keyed by what fixes the fit
                d["predictive"] = _predictive_key(self.codec_settings.target_rel_error, self.predictive_fit_text)
                keep.add("predictive")
        if self.pipeline in BASELINES:
            keep |= {"group_size"}
            if self.pipeline != "rtn-w4a16":
                keep |= {"calib_tokens"} | ({"alpha"} if "smoothquant" in self.pipeline else {"keep_channels"})
        return {k: v for k, v in d.items() if k in keep}


def default_keep_channels(hidden: int) -> int:
    """Atom keeps 128 of 4096 input channels (3.125%) at 8 bits: the same share of ``hidden``
    (18 of 576 on SmolLM2-135M)."""
    return max(1, round(hidden * 128 / 4096))


def resolve(cfg: PipelineConfig, model) -> PipelineConfig:
    """Fill in the model-dependent defaults and check them against the model."""
    from splitcli.model.split import decoder_parts
    from splitcli.quant import default_group_size, layer_shapes_of

    parts = decoder_parts(model)
    upd: dict[str, Any] = {}
    if cfg.pipeline in ("split", "local"):
        spec = cfg.split_spec().resolve(model)
        upd.update(split_layer=spec.split_layer, l_w=spec.l_w)
    if cfg.group_size is None:
        upd["group_size"] = default_group_size(layer_shapes_of(parts.layers[0]))
    if cfg.pipeline.startswith("atom") and cfg.keep_channels is None:
        upd["keep_channels"] = default_keep_channels(model.config.hidden_size)
    return replace(cfg, **upd)


@dataclass
class Pipeline:
    """A built pipeline: its LogitsFn, the resolved config and what building it found out."""

    config: PipelineConfig
    logits_fn: LogitsFn
    info: dict[str, Any]


def _session_logits_fn(make_session: Callable[[], Any]) -> LogitsFn:
    """A LogitsFn that runs each call through a fresh session (all logits kept)."""

    @torch.inference_mode()
    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return make_session().forward(input_ids, attention_mask, logits_to_keep=0)  # [B, T, V]

    return fn


def build_pipeline(lm, cfg: PipelineConfig, data_dir=None, progress: Callable[[str], None] | None = None) -> Pipeline:
    """Build the LogitsFn of `cfg` on the loaded model `lm` (a `LoadedModel`); `lm.model` is not changed."""
    from splitcli.model.split import decoder_parts
    from splitcli.runtime.session import UnsplitSession

    cfg = resolve(cfg, lm.model)
    n = decoder_parts(lm.model).num_layers
    info: dict[str, Any] = {"n_layers": n}
    if cfg.pipeline == "fp":
        model = lm.model
        return Pipeline(cfg, _session_logits_fn(lambda: UnsplitSession(model)), info)
    if cfg.pipeline == "split":
        from splitcli.deploy import build_split

        split = build_split(lm, cfg.split_spec(), data_dir, progress, keep_stats=False)
        info.update(split.info)
        info["weight_bits"] = info["weight_bits"] + [None] * (n - cfg.split_layer)  # the cloud: full precision
        if cfg.codec == "tabq":
            info["codec"]["calibration"] = (f"last 2048 tokens of {WIKITEXT2_TEST}" if cfg.codec_settings.needs_samples
                                            else "none")
            if math.isinf(info["codec"]["tau"]):
                info["codec"]["tau"] = "inf"
        return Pipeline(cfg, _session_logits_fn(split.session), info)
    if cfg.pipeline == "local":
        from splitcli.quant import opsc_bits

        assert cfg.l_w is not None and cfg.group_size is not None
        bits = opsc_bits(n, cfg.l_w, cfg.q_w1, cfg.q_w2, cfg.method)
        info["weight_bits"] = bits
        from splitcli.deploy import opsc_edge_model

        qmodel = opsc_edge_model(lm.model, cfg.split_spec())  # every layer at its OPSC bits (a copy if any)
        return Pipeline(cfg, _session_logits_fn(lambda: UnsplitSession(qmodel)), info)
    from splitcli.eval.baselines import build_baseline

    model, binfo = build_baseline(lm, cfg, data_dir)
    info.update(binfo)
    return Pipeline(cfg, _session_logits_fn(lambda: UnsplitSession(model)), info)


def _predictive_key(target: float | None, fit_text: str | None = None) -> str:
    from splitcli.codec.predictive import FILE_VERSION, FRAME_VERSION
    from splitcli.codec.predictive_fit import DEFAULT_TARGET_REL_ERROR
    from splitcli.deploy.calibrate import read_user_text
    from splitcli.deploy.predictive import PREDICTIVE_FIT_WINDOWS, TABLES

    text = (f"last {PREDICTIVE_FIT_WINDOWS} windows of {WIKITEXT2_TEST}" if fit_text is None else
            f"last windows of a fit text with sha256 {read_user_text(fit_text)[1]}")   # its content, not its path
    # the table rule (`deploy.predictive.default_table`) is part of the fit: results cached when the
    # codec predicted from the exact table must not stand for today's
    return (f"file v{FILE_VERSION}, frame v{FRAME_VERSION}, bulk target {target or DEFAULT_TARGET_REL_ERROR}, "
            f"{text}, table {TABLES[0]} (8-bit embedding rows; {TABLES[1]} where the embedding is not a plain table)")


def cache_key(cfg: PipelineConfig, model_sha256: str) -> str:
    """The result-cache config hash of a RESOLVED config on the model with these weights."""
    from splitcli.eval.cache import config_hash

    return config_hash({"model": model_sha256, **cfg.relevant()})


class LazyLogitsFn:
    """A LogitsFn that builds its pipeline on the first call, so a fully cached sweep never
    pays for quantizing or calibrating."""

    def __init__(self, build: Callable[[], Pipeline]):
        self._build = build
        self.pipeline: Pipeline | None = None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pipeline is None:
            self.pipeline = self._build()
        return self.pipeline.logits_fn(input_ids, attention_mask)


def pipeline_from_plan(plan, pipeline: str | None = None) -> PipelineConfig:
    """``split`` (or `pipeline`) with a `splitcli.plan.schema.Plan`'s settings: the same split
    `splitllm generate --config` runs (entropy coding off: lossless, it cannot change a logit)."""
    from splitcli.deploy import SplitSpec

    return from_split_spec(SplitSpec.from_plan(plan), pipeline or "split")


def from_split_spec(spec, pipeline: str = "split", **rest: Any) -> PipelineConfig:
    """The pipeline of a deployment `SplitSpec` (q_w2 None: layers past l_w stay unquantized)."""
    return PipelineConfig(
        pipeline=pipeline, split_layer=spec.split_layer, q_w1=spec.q_w1, q_w2=KEEP_BITS if spec.q_w2 is None else spec.q_w2,
        l_w=spec.l_w, method=spec.method, group_size=spec.group_size, qa=spec.qa, embed_bits=spec.embed_bits,
        codec=spec.wire, codec_settings=replace(spec.codec, entropy=False), **rest)
