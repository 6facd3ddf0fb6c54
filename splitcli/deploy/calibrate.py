"""Calibrating the codec on a model for one deployment (model, split layer, settings), cached on disk.

Calibration (tau at a quantile of |x|, channel classes, the static symbol model) needs real hidden
states at the split layer. They come from a fixed *calibration slice*: the last `calib_tokens`
tokens of WikiText-2's wiki.test.raw (one window starting at position 0, like an evaluation
window, so the attention-sink token's huge activations are represented). Perplexity benchmarks
score the *first* windows of the same file, so calibration and evaluation text never overlap
(`bench codec` checks this). The calibrated CodecConfig is stored as JSON under
`cache_root()/codec/`, keyed by everything it depends on, so `generate` calibrates once. The
tensor-only part (hidden states in, CodecConfig and a distortion report out) is
`splitcli.codec.calibrate.calibrate_settings`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from splitcli.codec.calibrate import calibrate_settings
from splitcli.codec.config import FORMAT_VERSION, CodecConfig
from splitcli.data import WIKITEXT2_TEST, data_file, decode_text
from splitcli.errors import SplitLLMError
from splitcli.plan.codec_settings import CodecSettings

#: Tokens in the calibration slice (capped at the model's context).
CALIB_TOKENS = 2048
#: Characters read from the end of the text to find the calibration slice: plenty for
#: CALIB_TOKENS tokens, and tokenizing it is cheap compared with the whole file.
_CALIB_CHARS = 64 * CALIB_TOKENS
_CACHE_SCHEMA = 3   # 2: the file also holds what a target_rel_error calibration chose; 3: as one "report"


def wikitext_path(data_dir=None) -> Path:
    """wiki.test.raw in the data directory (explicit > $SPLITLLM_DATA > ../shared/data), or raise."""
    return data_file(WIKITEXT2_TEST, data_dir)


def read_wikitext(data_dir=None) -> tuple[str, str]:
    """WikiText-2 test text exactly as the evaluation reads it (LF line ends) and the sha256 of
    the file's bytes (part of the calibration cache key)."""
    path = wikitext_path(data_dir)
    raw = path.read_bytes()
    return decode_text(raw, path), hashlib.sha256(raw).hexdigest()


def read_user_text(path, what: str = "fit text") -> tuple[str, str]:
    """(text, sha256 of the file's bytes) of a user's UTF-8 text, read as `read_wikitext` reads
    WikiText-2 (LF line ends), with a clear error naming it `what` when it cannot be read."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SplitLLMError(f"cannot read the {what} {path}: {exc}") from None
    try:
        text = decode_text(raw, path)
    except SplitLLMError as exc:
        raise SplitLLMError(f"cannot read the {what}: {exc}") from None
    if not text.strip():
        raise SplitLLMError(f"the {what} {path} is empty")
    return text, hashlib.sha256(raw).hexdigest()


def text_source(path=None, data_dir=None, what: str = "text") -> tuple[str, str, str]:
    """(text, sha256, name) of a user's text file, else of WikiText-2's test split."""
    if path is None:
        return (*read_wikitext(data_dir), WIKITEXT2_TEST)
    return (*read_user_text(path, what), str(path))


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


def cache_key(model_sha256: str, split_layer: int, settings: CodecSettings, text_sha256: str, n_tokens: int) -> str:
    # q_bar_min only steers the live early-exit policy; calibration does not depend on it
    params = {k: v for k, v in settings.to_dict().items() if k != "q_bar_min"}
    fields = dict(schema=_CACHE_SCHEMA, format=FORMAT_VERSION, model=model_sha256, split_layer=split_layer,
                  params=params, text=text_sha256, calib_tokens=n_tokens, slice="tail")
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def cache_dir() -> Path:
    from splitcli.model.loader import cache_root

    return cache_root() / "codec"


def _with_report(info: dict, cache: str, report: dict) -> dict:
    """info plus the cache outcome and calibrate_settings' report: under "chosen" when it holds a
    target (given, or the guard's fallback), else under "check" (the fixed settings' distortion)."""
    return dict(info, cache=cache, **{"chosen" if "target_rel_error" in report else "check": report})


def calibrated_config(lm, split_layer: int, params: CodecSettings, data_dir=None,
                      progress: Callable[[str], None] | None = None,
                      source: tuple[str, str, str] | None = None) -> tuple[CodecConfig, dict]:
    """The CodecConfig for (lm's weights, split layer, params), from the cache or calibrated now,
    on the end of `source` (`text_source`: text, sha256, name; default WikiText-2's test split).

    Returns (config, info) with info = {"cache": "hit"|"miss"|"none", "path", "calib_tokens", ...,
    and "chosen" or "check" (see `_with_report`)}.
    A corrupt cache file is recalibrated and overwritten, never trusted."""
    if not params.needs_samples:
        return CodecConfig.from_settings(params), {"cache": "none"}
    text, text_sha, name = source if source is not None else text_source(None, data_dir)
    n_tokens = calib_tokens_for(lm.model)
    key = cache_key(lm.sha256, split_layer, params, text_sha, n_tokens)
    path = cache_dir() / f"{key}.json"
    info = dict(path=str(path), calib_tokens=n_tokens, calib_slice=f"last {n_tokens} tokens of {name}")
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            cfg, report = CodecConfig.from_dict(data["config"]), data["report"]
            if not isinstance(report, dict):
                raise TypeError("the calibration report is not a mapping")
            return cfg, _with_report(info, "hit", report)
        except (OSError, ValueError, KeyError, TypeError, SplitLLMError):
            pass   # fall through: recalibrate and replace the bad file
    if progress is not None:
        progress(f"calibrating the codec at layer {split_layer} on {info['calib_slice']} (cached afterwards)")
    samples = edge_hidden(lm.model, split_layer, calibration_ids(lm.tokenizer, text, n_tokens))
    cfg, report = calibrate_settings(samples, params)
    out = _with_report(info, "miss", report)
    chosen = out.get("chosen")                                     # a target (given or fallen back to)
    if progress is not None and chosen is not None:
        progress(f"{chosen['fallback'] + ': ' if 'fallback' in chosen else ''}codec target "
                 f"{chosen['target_rel_error']}: chose q_bar {chosen['q_bar']}, tau {chosen['tau']:.4g} "
                 f"({chosen['tau_from']}); error {chosen['bulk_rel_error']:.4f} on the calibration text"
                 f"{'' if chosen['met'] else ' (target NOT met: the most accurate setting was kept)'}")
    elif progress is not None and not report["met"]:
        progress(f"warning: the codec leaves error {report['bulk_rel_error']:.3f} on the non-massive channels "
                 f"(tau set by hand); consider --target-error")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(dict(model_sha256=lm.sha256, split_layer=split_layer, params=params.to_dict(),
                                   text_sha256=text_sha, calib_tokens=n_tokens, config=cfg.to_dict(), report=report)))
    tmp.replace(path)
    return cfg, out
