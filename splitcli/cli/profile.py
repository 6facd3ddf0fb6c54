"""`splitllm profile`: measure per-layer costs of a model on this machine into a profile YAML."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..plan.recipes import PROFILE_RECIPES, format_recipes
from .common import (
    DATA_DIR_OPTION, MODEL_OPTION, check_output_path, cli_errors, console, err_console, load_model_with_status,
    parse_int_list,
)


@cli_errors
def profile_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the profile YAML."),
    model: str = MODEL_OPTION,
    bits: str = typer.Option("4,8,16", "--bits", help="Weight bit widths to size and time (16 = not quantized)."),
    kv_bits: str = typer.Option("4,8,16", "--kv-bits", help="KV-cache bit widths Qa to size (16 = float cache)."),
    tokens: str = typer.Option("1,32,256", "--tokens", help="Prefill token counts to time."),
    decode_context: int = typer.Option(64, "--decode-context", help="Cached tokens each timed decode step attends to (about half of the plan's W̄ is typical)."),
    repeats: int = typer.Option(5, "--repeats", help="Timed calls per measurement (median, after one warm-up)."),
    group_size: int = typer.Option(64, "--group-size", help="Weight quantization group size."),
    recipes: str = typer.Option(format_recipes(PROFILE_RECIPES), "--recipes", help="Codec recipes to measure at each q̄, as ROTATION:ALPHA items (none:0 = the paper's, hadamard:0.5 = rotation + channel α 0.5)."),
    predictive: bool = typer.Option(False, "--predictive", help="Also measure the token-predictive codec at each codec split layer, so `plan` can choose it (fits it per layer unless cached: 1-2 min each for SmolLM2-135M on 2 cores; needs WikiText-2)."),
    threads: int = typer.Option(0, "--threads", help="Torch CPU threads (0 = torch's default); recorded in the profile."),
    data_dir: Path = DATA_DIR_OPTION,
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
):
    """Measure per-layer latency (prefill, decode, at each weight bit width; on the fast decode path `generate` runs when the model supports it, else the eager one; the profile records which) and exact sizes on this machine, and the codec's frame size and error per recipe and q̄ (on the hidden states of the calibration text, the tail of WikiText-2's test split, when the data directory holds it; else of random tokens; the profile records which)."""
    import torch

    from ..configio import write_yaml
    from ..data import WIKITEXT2_TEST
    from ..errors import SplitLLMError
    from ..deploy.calibrate import wikitext_path
    from ..deploy.measure import ProfileSettings, measure_profile, profile_tokens, text_codec_ids
    from ..plan.recipes import parse_recipes
    from ..units import format_bytes

    check_output_path(out, force)
    settings = ProfileSettings(
        bits=parse_int_list(bits, "--bits"), kv_bits=parse_int_list(kv_bits, "--kv-bits"),
        tokens=parse_int_list(tokens, "--tokens"), repeats=repeats, group_size=group_size,
        decode_context=decode_context, recipes=parse_recipes(recipes),
    )
    if threads < 0:
        raise SplitLLMError(f"--threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    if data_dir is not None or predictive:
        wikitext_path(data_dir)   # a named data directory (or the predictive fit) needs the text: say so first
    lm = load_model_with_status(model)
    codec_ids, why_random = text_codec_ids(lm.tokenizer, profile_tokens(settings), data_dir)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console) as bar:
        task = bar.add_task("profiling", total=None)

        def progress(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=f"profiling {what}")
            if what.startswith("codec recipe"):  # one line per recipe (the codec section is new)
                bar.console.print(f"measured {what}", highlight=False)

        profile = measure_profile(lm.model, lm.model_id, settings, progress=progress, codec_ids=codec_ids)
    if predictive:
        profile = _with_predictive(profile, lm, settings, data_dir)
    write_yaml(out, profile.to_dict(), overwrite=force)

    bits_label = "/".join(f"{b}b" for b in settings.bits)
    if profile.timed_path == "fast":
        path = "the fast decode path (what generate runs)"
    else:
        from ..runtime.fast import fast_unsupported_model

        path = f"the eager path (no fast path: {fast_unsupported_model(lm.model)})"
    table = Table(title=f"{lm.model_id} on {profile.device.cpu} ({profile.device.threads} threads), timed on {path}")
    for col in ("layer", f"decode ms {bits_label} ({settings.decode_context} cached)", f"prefill {settings.tokens[-1]} ms",
                f"weights {bits_label}", "KV B/token Qa " + "/".join(map(str, settings.kv_bits))):
        table.add_column(col, justify="right")
    for k, layer in enumerate(profile.layers):
        table.add_row(
            str(k), " / ".join(f"{layer.decode_ms_by_bits[b]:.2f}" for b in settings.bits),
            f"{layer.prefill_ms[settings.tokens[-1]]:.1f}",
            " / ".join(format_bytes(layer.weight_bytes[b]) for b in settings.bits),
            " / ".join(f"{layer.kv_bytes_per_token[q]:g}" for q in settings.kv_bits),
        )
    table.add_row(
        "all", " / ".join(f"{sum(x.decode_ms_by_bits[b] for x in profile.layers):.1f}" for b in settings.bits),
        f"{sum(x.prefill_ms[settings.tokens[-1]] for x in profile.layers):.1f}",
        " / ".join(format_bytes(sum(x.weight_bytes[b] for x in profile.layers)) for b in settings.bits), "",
    )
    err_console.print(table)
    codec = "none (no splitcli.codec)" if profile.codec is None else (
        f"encode {profile.codec.encode_ms_per_token:.2f} ms/token, decode {profile.codec.decode_ms_per_token:.2f} ms/token")
    err_console.print(
        f"embedding {format_bytes(profile.embedding.weight_bytes)}, {profile.embedding.decode_ms:.3f} ms/token; "
        f"head {format_bytes(profile.head.weight_bytes)}, {profile.head.decode_ms:.2f} ms/token; "
        f"activation peak (estimate, {settings.tokens[-1]} tokens) {format_bytes(profile.layers[0].activation_peak_bytes)}; "
        f"codec {codec}",
        highlight=False,
    )
    if profile.codec is not None:
        err_console.print(_codec_table(profile.codec))
        source = (f"the last {len(codec_ids)} tokens of {WIKITEXT2_TEST} (the calibration text)"
                  if codec_ids is not None else f"random tokens ({why_random})")
        err_console.print(f"codec points measured on {source}: codec_source {profile.codec_source}", highlight=False)
    console.print(f"wrote {out}", highlight=False)


def _with_predictive(profile, lm, settings, data_dir):
    """The profile with the predictive codec's points (`splitcli.deploy.predictive_profile`)."""
    import dataclasses

    from ..deploy.measure import SIZE_TOKENS, profile_tokens
    from ..deploy.predictive_profile import predictive_points
    from ..errors import SplitLLMError

    if profile.codec is None:
        raise SplitLLMError("--predictive: this model has no split layer to measure a codec at")
    points = predictive_points(lm, profile.codec.split_layers, profile_tokens(settings), profile.codec.points,
                               repeats=settings.repeats, size_tokens=SIZE_TOKENS, data_dir=data_dir,
                               progress=lambda m: err_console.print(m, highlight=False))
    codec = dataclasses.replace(profile.codec, points=profile.codec.points + tuple(points))
    return dataclasses.replace(profile, codec=codec)


def _codec_table(codec) -> Table:
    """Bytes of a one-token frame (and the held-out error) per split layer, recipe and q̄."""
    q_bars = sorted({p.q_bar for p in codec.points if not p.recipe.predictive})
    table = Table(title="codec: B/token of a one-token frame (error) by split layer ℓ")
    table.add_column("ℓ", justify="right")
    for recipe in codec.recipes:
        if recipe.predictive:   # one point per ℓ; its q̄ is the width Ψ counts it at
            table.add_column("predictive (Ψ q̄)", justify="right")
            continue
        for q in q_bars:
            table.add_column(f"{recipe.name} q̄{q}", justify="right")

    def cell(p, psi: bool = False) -> str:
        return "-" if p is None else f"{p.bytes_per_token:.0f}" + (
            "" if p.rel_error is None else f" ({p.rel_error:.2f})") + (f" q̄{p.q_bar}" if psi else "")

    for layer in codec.split_layers or (None,):
        cells = []
        for recipe in codec.recipes:
            if recipe.predictive:
                cells.append(cell(next((p for p in codec.points if (p.recipe, p.split_layer) == (recipe, layer)),
                                       None), psi=True))
                continue
            for q in q_bars:
                cells.append(cell(next((p for p in codec.points if (p.recipe, p.q_bar, p.split_layer)
                                        == (recipe, q, layer)), None)))
        table.add_row("?" if layer is None else str(layer), *cells)
    return table
