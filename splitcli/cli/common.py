"""Shared CLI plumbing: the error boundary, console, model loading with a status line, output files."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import SplitLLMError
from ..plan.codec_settings import DEFAULT_PREDICTIVE_TARGET_REL_ERROR

console = Console()
err_console = Console(stderr=True)

# Options many commands share, defined once (typer reads these objects; it never mutates them).
MODEL_OPTION = typer.Option("smollm2-135m", "--model", "-m", help="Built-in name, model directory or .gguf file.")
JSON_OPTION = typer.Option(..., "--json", help="Where to write the results.")
FORCE_JSON_OPTION = typer.Option(False, "--force", help="Overwrite the --json file if it exists.")
DATA_DIR_OPTION = typer.Option(None, "--data-dir", help="Data directory (default: $SPLITLLM_DATA, else ../shared/data).")
PREDICTIVE_FIT_TEXT_OPTION = typer.Option(None, "--fit-text", help="A UTF-8 text file to fit the predictive codec on instead of WikiText-2 (implies --codec predictive; text like your deployment's codes smaller). Networked edges then need the cloud's codec file.")
PREDICTIVE_CODEC_OPTION = typer.Option(None, "--predictive-codec", help="A fitted predictive codec file (.npz) to use instead of fitting one (implies --codec predictive). Both ends of a networked split need the same codec: serve-cloud prints the path of its file.")
EDGE_ACT_BITS_OPTION = typer.Option(None, "--edge-act-bits", help="Input width of the edge's 4-bit products at decode on splitllm's AVX2 kernel: 16, or 8 (faster, coarser: +0.2% perplexity measured on SmolLM2) (default: the plan's, else 16).")


def cli_errors(fn):
    """Turn SplitLLMError into a one-line message + its exit code (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SplitLLMError as e:
            # escape: a message is text, not markup ("pip install 'splitllm[ray]'" must print as written)
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def load_model_with_status(spec: str):
    from ..model.loader import load_model

    with err_console.status(f"loading model {spec} ..."):
        return load_model(spec, progress=lambda msg: err_console.print(msg))


def check_output_path(path: Path | None, force: bool) -> None:
    """Refuse to overwrite a user's file unless --force; check before doing long work."""
    if path is None:
        return
    if path.exists() and not force:
        raise SplitLLMError(f"{path} already exists: pass --force to overwrite it")
    if path.exists() and path.is_dir():
        raise SplitLLMError(f"{path} is a directory, expected a file path")
    if not path.parent.exists():
        raise SplitLLMError(f"directory {path.parent} does not exist")


def write_json(path: Path, data: dict, force: bool) -> None:
    """Write `data` to `path` as JSON, atomically, through a temporary of its own (a user's
    `<path>.tmp` is left alone). Without --force, a file that appeared at `path` during the run
    is refused, not replaced; a failed write is a one-line error."""
    from ..configio import write_text_file

    check_output_path(path, force)
    write_text_file(path, json.dumps(data, indent=2, sort_keys=True) + "\n", overwrite=force)


def json_safe(x):
    """Strict JSON has no Infinity or NaN (τ = inf): write non-finite floats as strings."""
    import math

    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def parse_int_list(text: str, option: str, skip_empty: bool = False) -> tuple[int, ...]:
    """'4,8,16' -> (4, 8, 16) (with `skip_empty`, '4,,8,' too); anything else is a one-line error
    naming the option."""
    items = [t.strip() for t in text.split(",")] if text else []
    if skip_empty:
        items = [t for t in items if t]
    try:
        values = tuple(int(t) for t in items)
    except ValueError:
        values = ()
    if not values:
        raise SplitLLMError(f"{option} must be comma-separated integers like 4,8,16, got {text!r}")
    return values


def parse_count_list(text: str, option: str, lo: int, hi: int | None = None) -> list[int]:
    """'4,1,4,' -> [1, 4]: `parse_int_list`'s integers (empty items skipped), deduplicated and
    sorted, each in lo..hi (hi None: no upper bound); anything else is a one-line error."""
    counts = sorted(set(parse_int_list(text, option, skip_empty=True)))
    if counts[0] < lo or (hi is not None and counts[-1] > hi):
        bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise SplitLLMError(f"{option} needs values {bound}, got {text!r}")
    return counts


# ------------------------------------------------------------------ the codec option group
#: (parameter, type, flag, help); one definition for every command that takes codec settings.
_CODEC_FLAGS = (
    ("tau", float, "--tau", "Absolute outlier threshold τ (inf = TAB-Q alone; default: calibrated from --tau-quantile)."),
    ("tau_quantile", float, "--tau-quantile", "τ at this quantile of |x| on the calibration slice (default: 0.999)."),
    ("q_bar", int, "--max-bits", "Q̄: widest TAB-Q code in bits, sign included (default: 6)."),
    ("delta", float, "--delta", "Per-token distortion tolerance Δ (default: 0.05)."),
    ("rotation", str, "--rotation", "Rotate T_below before TAB-Q: none or hadamard (seeded, known to both ends; default: none)."),
    ("rotation_seed", int, "--rotation-seed", "Seed of the Hadamard rotation's random signs (default: 0)."),
    ("channel_alpha", float, "--channel-alpha", "Divide each channel by its calibrated RMS^alpha before TAB-Q, alpha in [0, 1] (default: 0 = off)."),
    ("target_rel_error", float, "--target-error", f"Let calibration pick τ and Q̄ for this mean per-token relative error of the non-massive channels, e.g. 0.1 (default: the fixed settings, checked; past 0.5 error calibration falls back to 0.15). With --codec predictive: the error its step is fitted for (default {DEFAULT_PREDICTIVE_TARGET_REL_ERROR:g}; it is shaped to put its error where the cloud's loss is least sensitive)."),
)


def codec_options(wire_choices: tuple[str, ...] | None = None, wire_help: str = ""):
    """Add the codec settings flags (and, with `wire_choices`, a `--codec` wire choice) to a
    command. The command receives `codec_flags`: a dict of the flags the user gave (names of
    `CodecSettings` fields), to overlay on the plan's or the default settings; and `wire` (None
    when not given)."""
    import inspect

    def decorate(fn):
        params = [p for p in inspect.signature(fn).parameters.values() if p.name not in ("codec_flags", "wire")]
        extra = []
        if wire_choices is not None:
            extra.append(inspect.Parameter("wire", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                                           default=typer.Option(None, "--codec", help=wire_help)))
        for name, typ, flag, help_text in _CODEC_FLAGS:
            extra.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=typ,
                                           default=typer.Option(None, flag, help=help_text)))
        extra.append(inspect.Parameter("no_entropy", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                       default=typer.Option(False, "--no-entropy",
                                                            help="Bit-pack the symbols instead of rANS coding them.")))

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            flags = {name: kwargs.pop(name) for name, *_ in _CODEC_FLAGS}
            if kwargs.pop("no_entropy"):
                flags["entropy"] = False
            flags = {k: v for k, v in flags.items() if v is not None}
            _check_codec_flags(flags)
            if wire_choices is not None:
                wire = kwargs.pop("wire")
                if wire is not None and wire not in wire_choices:
                    raise SplitLLMError(f"--codec must be one of {', '.join(wire_choices)}, got {wire!r}")
                kwargs["wire"] = wire
            return fn(*args, codec_flags=flags, **kwargs)

        wrapper.__signature__ = inspect.Signature(
            [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params] + extra)
        return wrapper

    return decorate


CODEC_FLAG_NAMES = {name: flag for name, _, flag, _ in _CODEC_FLAGS} | {"entropy": "--no-entropy"}


def _check_codec_flags(flags: dict) -> None:
    """Bad values fail before anything loads, the message naming the flag the user typed
    (the settings type itself speaks of settings)."""
    import re

    from ..configio import overlay
    from ..plan.codec_settings import CodecSettings

    try:
        overlay(CodecSettings(), **flags)
    except SplitLLMError as e:
        named = [CODEC_FLAG_NAMES[n] for n in re.findall(r"codec (\w+)", str(e)) if n in CODEC_FLAG_NAMES]
        if "exactly one" in str(e) or "not both" in str(e):
            named = ["--tau", "--tau-quantile"]
        raise SplitLLMError(f"{'/'.join(named) or 'codec options'}: {e}") from None


def codec_flags_need_tabq(wire: str, codec_flags: dict) -> None:
    """Codec flags with a wire that has no codec are an error rather than silently ignored. The
    predictive codec takes --target-error (the same stated distortion: its step is fitted for it)."""
    stray = [k for k in codec_flags if not (wire == "tabq" or (wire == "predictive" and k == "target_rel_error"))]
    if stray:
        given = ", ".join(CODEC_FLAG_NAMES[k] for k in stray)
        raise SplitLLMError(f"{given} need --codec tabq" + (" (the predictive codec takes --target-error only)"
                                                          if wire == "predictive" else ""))


def fit_text_wire(wire: str | None, fit_text, predictive_file=None) -> tuple[str, str]:
    """--fit-text: the wire it implies (predictive) and the file's path, checked before anything loads."""
    if wire not in (None, "predictive"):
        raise SplitLLMError(f"--fit-text fits the predictive codec: it needs --codec predictive, not --codec {wire}")
    if predictive_file is not None:
        raise SplitLLMError("--fit-text and --predictive-codec: the codec file is fitted already; give one")
    if not Path(fit_text).is_file():
        raise SplitLLMError(f"--fit-text: no such file: {fit_text}")
    return "predictive", str(fit_text)


def split_spec(plan, wire: str | None, codec_flags: dict, data_dir=None, **flags):
    """The split a command runs: the plan's (or the defaults), explicit flags winning. Without
    --codec the wire is the plan's (tabq or predictive) when there is a plan, else the raw fp32 wire. Checked
    before any model loads (a missing calibration text too)."""
    from ..deploy import SplitSpec

    if flags.get("edge_act_bits") not in (None, 8, 16):
        raise SplitLLMError(f"--edge-act-bits must be 8 or 16, got {flags['edge_act_bits']}")
    if flags.get("predictive_file") is not None:
        if wire not in (None, "predictive"):
            raise SplitLLMError(f"--predictive-codec needs --codec predictive, not --codec {wire}")
        if "target_rel_error" in codec_flags:
            raise SplitLLMError("--target-error and --predictive-codec: the codec file fixes its step; give one")
        if not Path(flags["predictive_file"]).is_file():
            raise SplitLLMError(f"--predictive-codec: no such file: {flags['predictive_file']}")
        wire, flags["predictive_file"] = "predictive", str(flags["predictive_file"])
    if flags.get("predictive_fit_text") is not None:
        wire, flags["predictive_fit_text"] = fit_text_wire(wire, flags["predictive_fit_text"],
                                                           flags.get("predictive_file"))
    wire = wire or (plan.wire if plan is not None else "none")
    codec_flags_need_tabq(wire, codec_flags)
    base = SplitSpec.from_plan(plan, wire) if plan is not None else SplitSpec(wire=wire)
    spec = base.with_flags(codec=codec_flags, wire=wire, **flags)
    fits = spec.wire == "predictive" and spec.predictive_file is None and spec.predictive_fit_text is None
    if (spec.wire == "tabq" and spec.codec.needs_samples) or fits:
        from ..deploy.calibrate import wikitext_path

        wikitext_path(data_dir)   # the fit text
    return spec


def check_plan_fits(plan, lm) -> None:
    from ..model.split import decoder_parts

    n = decoder_parts(lm.model).num_layers
    if plan is not None and plan.n_layers != n:
        raise SplitLLMError(f"this is a plan for {plan.n_layers} layers but the model has {n} ({lm.model_id})")
