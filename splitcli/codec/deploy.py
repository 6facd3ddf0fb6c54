"""Calibrating the codec for one deployment (model, split layer, codec params), cached on disk.

Calibration (tau at a quantile of |x|, channel classes, the static symbol model) needs real hidden
states at the split layer. They come from a fixed *calibration slice*: the last `calib_tokens`
tokens of WikiText-2's wiki.test.raw (one window starting at position 0, like an evaluation
window, so the attention-sink token's huge activations are represented). Perplexity benchmarks
score the *first* windows of the same file, so calibration and evaluation text never overlap
(`bench codec` checks this). The calibrated CodecConfig is stored as JSON under
`cache_root()/codec/`, keyed by everything it depends on, so `generate` calibrates once.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from splitcli.codec.calibrate import calibrate_channel_class, calibrate_symbol_model
from splitcli.codec.config import FORMAT_VERSION, MAX_Q_BAR, MIN_Q, CodecConfig
from splitcli.codec.threshold import calibrate_tau
from splitcli.errors import SplitLLMError

#: Tokens in the calibration slice (capped at the model's context).
CALIB_TOKENS = 2048
#: Characters read from the end of the text to find the calibration slice: plenty for
#: CALIB_TOKENS tokens, and tokenizing it is cheap compared with the whole file.
_CALIB_CHARS = 64 * CALIB_TOKENS
WIKITEXT_TASK = "wikitext2"   # the evaluation library's task: file wikitext2/wiki.test.raw
_CACHE_SCHEMA = 1


@dataclass(frozen=True)
class CodecOptions:
    """What a user chooses (the CLI's codec options); calibration turns it into a CodecConfig.

    tau (absolute) and tau_quantile are exclusive; with neither, tau_quantile = 0.999.
    Defaults: chosen on SmolLM2-135M at l = 15 (README, "Codec")."""

    tau: float | None = None
    tau_quantile: float | None = None
    q_bar: int = 6
    delta: float = 0.05
    entropy: bool = True
    n_classes: int = 8

    def __post_init__(self) -> None:
        if self.tau is not None and self.tau_quantile is not None:
            raise SplitLLMError("give either --tau or --tau-quantile, not both")
        if self.tau is None and self.tau_quantile is None:
            object.__setattr__(self, "tau_quantile", 0.999)
        if self.tau is not None and not (self.tau > 0):   # also rejects NaN
            raise SplitLLMError(f"--tau must be > 0 (inf disables threshold splitting), got {self.tau}")
        if self.tau_quantile is not None and not 0.0 < self.tau_quantile <= 1.0:
            raise SplitLLMError(f"--tau-quantile must lie in (0, 1], got {self.tau_quantile}")
        if not MIN_Q <= self.q_bar <= MAX_Q_BAR:
            raise SplitLLMError(f"--max-bits must lie in [{MIN_Q}, {MAX_Q_BAR}], got {self.q_bar}")
        if not (math.isfinite(self.delta) and 0.0 <= self.delta < 1.0):
            raise SplitLLMError(f"--delta must lie in [0, 1), got {self.delta}")

    def base_config(self) -> CodecConfig:
        return CodecConfig(tau=self.tau, tau_quantile=None if self.tau is not None else self.tau_quantile,
                           q_bar=self.q_bar, delta=self.delta, entropy=self.entropy)

    @property
    def needs_samples(self) -> bool:
        """An absolute tau without entropy coding needs no calibration at all."""
        return self.tau is None or self.entropy


def calibrate_from_samples(samples: torch.Tensor, params: CodecOptions) -> CodecConfig:
    """The deployment config from hidden states [tokens, hidden]: tau fixed (from the quantile,
    or as given), and, with entropy coding, channel classes + a static symbol model."""
    cfg = params.base_config()
    if params.tau is None:
        cfg = replace(cfg, tau=calibrate_tau(samples, params.tau_quantile), tau_quantile=None)
    if params.entropy:
        cfg = replace(cfg, channel_class=calibrate_channel_class(samples, cfg.tau, params.n_classes))
        cfg = replace(cfg, symbol_model=calibrate_symbol_model(samples, cfg))
    return cfg


def wikitext_path(data_dir=None) -> Path:
    """wiki.test.raw in the data directory (explicit > $SPLITLLM_DATA > ../shared/data), or raise."""
    from splitcli.data import data_file
    from splitcli.eval.spec import get_task_spec

    return data_file(get_task_spec(WIKITEXT_TASK).file, data_dir)


def read_wikitext(data_dir=None) -> tuple[str, str]:
    """WikiText-2 test text exactly as the evaluation library reads it (`load_text`: LF line
    ends) and the sha256 of the file's bytes (part of the calibration cache key)."""
    from splitcli.eval.loaders import load_text
    from splitcli.eval.spec import get_task_spec

    raw = wikitext_path(data_dir).read_bytes()
    return load_text(get_task_spec(WIKITEXT_TASK), data_dir), hashlib.sha256(raw).hexdigest()


def calibration_ids(tokenizer, text: str, n_tokens: int) -> list[int]:
    """The calibration slice: the last n_tokens tokens of (the tail of) the text."""
    ids = tokenizer(text[-_CALIB_CHARS:], add_special_tokens=False)["input_ids"]
    if len(ids) < n_tokens:
        raise SplitLLMError(f"the calibration text has {len(ids)} tokens, fewer than the {n_tokens} needed")
    return [int(i) for i in ids[-n_tokens:]]


def edge_hidden(model, split_layer: int, ids) -> torch.Tensor:
    """Hidden state at the split for one sequence of token ids (positions 0..T-1): [T, hidden] fp32."""
    from splitcli.model.split import EdgeHalf, decoder_parts

    edge = EdgeHalf(decoder_parts(model), split_layer)
    x = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)                  # [1, T]
    hidden = edge(x, torch.arange(x.shape[1]).reshape(1, -1), None, edge.new_cache())
    return hidden[0].to(torch.float32)                                         # [T, hidden]


def calib_tokens_for(model) -> int:
    context = getattr(model.config, "max_position_embeddings", None) or CALIB_TOKENS
    return min(CALIB_TOKENS, int(context))


def cache_key(model_sha256: str, split_layer: int, params: CodecOptions, text_sha256: str, n_tokens: int) -> str:
    fields = dict(schema=_CACHE_SCHEMA, format=FORMAT_VERSION, model=model_sha256, split_layer=split_layer,
                  params=asdict(params), text=text_sha256, calib_tokens=n_tokens, slice="tail")
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def cache_dir() -> Path:
    from splitcli.model.loader import cache_root

    return cache_root() / "codec"


def calibrated_config(lm, split_layer: int, params: CodecOptions, data_dir=None,
                      progress: Callable[[str], None] | None = None) -> tuple[CodecConfig, dict]:
    """The CodecConfig for (lm's weights, split layer, params), from the cache or calibrated now.

    Returns (config, info) with info = {"cache": "hit"|"miss"|"none", "path", "calib_tokens", ...}.
    A corrupt cache file is recalibrated and overwritten, never trusted."""
    if not params.needs_samples:
        return params.base_config(), {"cache": "none"}
    text, text_sha = read_wikitext(data_dir)
    n_tokens = calib_tokens_for(lm.model)
    key = cache_key(lm.sha256, split_layer, params, text_sha, n_tokens)
    path = cache_dir() / f"{key}.json"
    info = dict(path=str(path), calib_tokens=n_tokens, calib_slice=f"last {n_tokens} tokens of wikitext2/wiki.test.raw")
    if path.is_file():
        try:
            cfg = CodecConfig.from_dict(json.loads(path.read_text())["config"])
            return cfg, dict(info, cache="hit")
        except (OSError, ValueError, KeyError, TypeError, SplitLLMError):
            pass   # fall through: recalibrate and replace the bad file
    if progress is not None:
        progress(f"calibrating the codec at layer {split_layer} on {info['calib_slice']} (cached afterwards)")
    samples = edge_hidden(lm.model, split_layer, calibration_ids(lm.tokenizer, text, n_tokens))
    cfg = calibrate_from_samples(samples, params)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dict(model_sha256=lm.sha256, split_layer=split_layer, params=asdict(params),
                                   text_sha256=text_sha, calib_tokens=n_tokens, config=cfg.to_dict())))
    tmp.replace(path)
    return cfg, dict(info, cache="miss")
