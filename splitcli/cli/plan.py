"""`splitllm plan`: choose ℓ, weight bits, Qa and the codec setting under a memory budget (eq. 8)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import typer
from rich.table import Table

from ..plan.advise import DEFAULT_Q_BARS
from ..plan.codec_settings import DEFAULT_PREDICTIVE_TARGET_REL_ERROR
from ..plan.enumerate import DEFAULT_EMBED_BITS
from ..plan.recipes import DEFAULT_MAX_CODEC_ERROR
from .common import check_output_path, cli_errors, console, err_console, load_model_with_status, parse_int_list


@cli_errors
def plan_cmd(
    profile_path: Path = typer.Option(..., "--profile", help="Profile YAML from `splitllm profile`."),
    mem: str = typer.Option(..., "--mem", help="Edge memory for weights + KV + activations, e.g. 512MB, 1.5GiB."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="W̄: tokens the edge keeps KV for (prompt + generated)."),
    model: str = typer.Option(None, "--model", "-m", help="Model for the accuracy proxy (default: the profile's)."),
    deadline: str = typer.Option(None, "--deadline", help="Per-token deadline D, e.g. 200ms: plans whose predicted step (edge compute + link at ε) exceeds it are rejected."),
    bandwidth: str = typer.Option(None, "--bandwidth", help="Link bandwidth W, e.g. 10MHz (no link: compute only)."),
    snr: str = typer.Option("10dB", "--snr", help="Mean link SNR, e.g. 10dB."),
    eps: float = typer.Option(1e-3, "--eps", help="Outage target ε of eq. (9)."),
    accuracy_drop: str = typer.Option("1%", "--accuracy-drop", help="Largest accepted accuracy drop (relative), e.g. 1%."),
    accuracy_table: list[Path] = typer.Option(None, "--accuracy-table", help="Measured accuracy: a JSON table, or `splitllm eval --json` files (repeat; one fp run is the baseline); else a perplexity proxy."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Data directory with wikitext2/ (default: $SPLITLLM_DATA, ../shared/data)."),
    proxy_windows: int = typer.Option(1, "--proxy-windows", help="Proxy: WikiText-2 windows to score."),
    proxy_seqlen: int = typer.Option(512, "--proxy-seqlen", help="Proxy: tokens per window."),
    q_bars: str = typer.Option(None, "--q-bar", help=f"Codec q̄ values to consider \\[default: those the profile measured, else {','.join(map(str, DEFAULT_Q_BARS))}]."),
    rotation: str = typer.Option(None, "--rotation", help="Pin the codec recipe's rotation (none or hadamard) \\[default: choose among the recipes the profile measured]."),
    channel_alpha: float = typer.Option(None, "--channel-alpha", help="Pin the codec recipe's channel α in [0, 1] \\[default: choose among the measured recipes]."),
    codec_error: float = typer.Option(None, "--codec-error", help=f"Largest codec error (mean per-token relative error of the non-massive channels, measured per recipe by the profile) a candidate may have \\[default: each codec's default target, {DEFAULT_MAX_CODEC_ERROR:g} for tabq recipes and {DEFAULT_PREDICTIVE_TARGET_REL_ERROR:g} for the predictive codec, shaped to put its larger error where the loss is least sensitive]."),
    embed_bits: int = typer.Option(DEFAULT_EMBED_BITS, "--embed-bits", help="How the edge stores its embedding: 8 (quantize's default) or 16 (as loaded; a predictive codec candidate also holds the 8-bit rows it predicts from)."),
    edge_act_bits: int = typer.Option(16, "--edge-act-bits", help="Recorded in the plan: the input width of the edge's 4-bit products at decode, 16 or 8 (faster, coarser; the profile's costs are the 16-bit input's, so the plan's latency stays on the safe side)."),
    out: Path = typer.Option(None, "--out", "-o", help="Write the chosen plan here (YAML)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
    sweep: str = typer.Option(None, "--sweep", help="Also print a sweep table; only 'max-tokens' (W̄) is supported."),
):
    """Pick the split layer, weight bits, KV bits, codec q̄ and codec recipe that maximize Ψ under the budgets (eq. 8), ties going to the smaller accuracy drop, then the lower latency, then fewer wire bytes, then the smaller memory."""
    from ..configio import load_config
    from ..cost.latency import LinkModel
    from ..errors import SplitLLMError
    from ..model.shards import EMBED_BITS
    from ..deploy.proxy import PerplexityProxy, calibration_windows, resolve_data_dir
    from ..plan.eval_table import load_accuracy_table
    from ..plan.advise import default_rate, default_space, latency_model, step_latency
    from ..plan.recipes import check_max_codec_error, explain_recipe, pinned_recipes
    from ..plan.enumerate import search_plans, to_plan
    from ..plan.profile import Profile
    from ..plan.schema import Budgets
    from ..units import parse_frequency, parse_percent, parse_size, parse_snr, parse_time

    # Everything cheap is checked before the model loads.
    memory = parse_size(mem)
    if memory < 1:
        raise SplitLLMError("--mem must be at least 1 byte")
    drop = parse_percent(accuracy_drop)
    deadline_s = parse_time(deadline) if deadline is not None else None
    if deadline_s is not None and deadline_s <= 0:
        raise SplitLLMError("--deadline must be > 0")
    snr_linear = parse_snr(snr)
    link = LinkModel(parse_frequency(bandwidth), snr_linear, eps) if bandwidth is not None else None
    if max_tokens < 1:
        raise SplitLLMError(f"--max-tokens must be >= 1, got {max_tokens}")
    if embed_bits not in EMBED_BITS:
        raise SplitLLMError(f"--embed-bits must be {' or '.join(map(str, EMBED_BITS))}, got {embed_bits}")
    if edge_act_bits not in (8, 16):
        raise SplitLLMError(f"--edge-act-bits must be 8 or 16, got {edge_act_bits}")
    if sweep not in (None, "max-tokens"):
        raise SplitLLMError(f"--sweep supports only 'max-tokens', got {sweep!r}")
    # bad values fail before anything loads, naming the flag
    for flag, check in (("--codec-error", lambda: codec_error is None or check_max_codec_error(codec_error)),
                        ("--rotation", lambda: pinned_recipes((), rotation, None)),
                        ("--channel-alpha", lambda: pinned_recipes((), None, channel_alpha))):
        try:
            check()
        except SplitLLMError as e:
            raise SplitLLMError(f"{flag}: {e}") from None
    check_output_path(out, force)
    profile = Profile.from_dict(load_config(profile_path))
    space = default_space(profile, None if q_bars is None else parse_int_list(q_bars, "--q-bar"))
    measured = profile.codec.recipes if profile.codec is not None else ()
    space = dataclasses.replace(space, recipes=pinned_recipes(measured, rotation, channel_alpha))
    budgets = Budgets(memory_bytes=memory, max_accuracy_drop=drop, deadline_s=deadline_s)
    rate = default_rate(link) if link is not None else None
    # The profile's group size is the one its weight bytes were counted at; one that records
    # none falls back to what `splitllm profile` measures by default.
    group_size = profile.group_size or _profile_default_group_size()

    proxy = None
    if accuracy_table:
        table = load_accuracy_table(accuracy_table)
        files = ", ".join(map(str, accuracy_table))
        accuracy, source = table.drop, f"measured: {table.metric} from {files}"
    else:
        directory = resolve_data_dir(data_dir)
        lm = load_model_with_status(model or profile.model_id)
        windows = calibration_windows(lm.tokenizer, directory, proxy_windows, proxy_seqlen)
        proxy = PerplexityProxy(lm.model, windows, group_size,
                                progress=lambda msg: err_console.print(msg, highlight=False))
        if proxy.n_layers != profile.n_layers:
            raise SplitLLMError(f"the profile has {profile.n_layers} layers but model {lm.model_id} has {proxy.n_layers}")
        accuracy = proxy.drop
        source = (f"PROXY: WikiText-2 perplexity increase over {proxy_windows} x {proxy_seqlen} tokens "
                  f"(edge weights + KV quantized; codec not modeled), not task accuracy")
    pinned = rotation is not None or channel_alpha is not None
    bounds = _Bounds(codec_error)
    search = search_plans(profile, space, budgets, max_tokens, accuracy, embed_bits=embed_bits,
                          latency=latency_model(profile, link, rate), max_codec_error=bounds.tabq,
                          predictive_codec_error=bounds.predictive, measured_recipes_only=not pinned)
    several = len(space.recipes) > 1   # name the recipe in descriptions only when there was a choice
    # Real work: the proxy caches by edge weights and KV bits, so q̄ and recipe cost it no run.
    scored = (f"{proxy.evaluations} proxy evaluations (baseline included)" if proxy is not None
              else f"{search.accuracy_evaluations} accuracy look-ups in the table")
    _print_ranking(search, profile, link, rate, budgets, several, scored)
    err_console.print(f"accuracy: {source}; codec: {_codec_check(search, bounds)}", highlight=False)
    if search.winner is None:
        from ..units import format_bytes

        fastest = search.fastest
        if deadline_s is not None and fastest is not None and fastest.latency_s > deadline_s:
            raise SplitLLMError(
                f"no configuration meets the deadline of {deadline_s * 1e3:.1f} ms: the fastest candidate "
                f"({_describe(fastest.candidate, profile.n_layers, several)}) predicts {fastest.latency_s * 1e3:.1f} ms "
                f"per token{'' if link is not None else ' of edge compute alone'}", exit_code=3)
        if search.min_memory_bytes is None:
            within = " within the deadline" if deadline_s is not None else ""
            lossy = search.least_lossy
            if lossy is not None:
                best = (f"smallest measured: {lossy.codec_error:.3g}, {lossy.candidate.recipe.name} "
                        f"at q̄ {lossy.candidate.q_bar}")
                fixes = "raise --codec-error, choose another --q-bar" + (
                    " or drop the --rotation/--channel-alpha pin" if pinned else "")
                if search.codec_bound_only:
                    raise SplitLLMError(f"every candidate{within} has a codec error above --codec-error "
                                        f"{bounds} ({best}): {fixes}", exit_code=3)
                raise SplitLLMError(f"no configuration passes both the accuracy drop of {drop:.4g} and "
                                    f"--codec-error {bounds} at any memory{within} ({best}): "
                                    f"raise --accuracy-drop, or {fixes}", exit_code=3)
            raise SplitLLMError(f"no configuration passes the accuracy drop of {drop:.4g} at any memory{within}: "
                                "raise --accuracy-drop", exit_code=3)
        raise SplitLLMError(
            f"no configuration fits {format_bytes(memory)}; the smallest budget that works is "
            f"{format_bytes(search.min_memory_bytes)} ({search.min_memory_bytes} bytes)", exit_code=3)

    winner = search.winner
    latency = step_latency(profile, winner.candidate, link, rate)
    recipe_line = explain_recipe(search, profile, bounds.of(winner.candidate.recipe), pinned=pinned)
    if profile.codec is not None:  # the profile's codec points: text or random tokens (they code differently)
        recipe_line += f" (codec measured on {profile.codec_source})"
    console.print(recipe_line, highlight=False)
    if sweep == "max-tokens":
        _print_sweep(profile, winner.candidate, memory, max_tokens, embed_bits)
    notes = {
        "accuracy": source, "accuracy_drop": winner.accuracy_drop, "psi": winner.psi,
        "decided_by": winner.reason,
        "edge_memory_bytes": winner.memory.total_bytes if winner.memory else None,
        "predicted_edge_ms_per_token": latency.compute_s * 1e3,
        "predicted_wire_bytes_per_token": latency.wire_bytes,
        "predicted_step_ms": latency.total_s * 1e3 if link is not None else None,
        "rate_bps": rate, "profile": str(profile_path), "profile_device": profile.device.name,
        "codec_recipe": recipe_line, "codec_error_bound": bounds.of(winner.candidate.recipe),
    }
    # Saved as costed: another spelling of the same edge could keep more layers in the shard.
    plan = to_plan(winner.candidate, profile, budgets, max_tokens, group_size=group_size,
                   tau_is_quantile=True, embed_bits=embed_bits, notes=notes)
    plan = dataclasses.replace(plan, edge_act_bits=edge_act_bits)
    if out is not None:
        plan.save(out, overwrite=force)
        console.print(f"wrote {out}", highlight=False)


class _Bounds:
    """The codec-error bounds: --codec-error for every recipe, else each codec's default target."""

    def __init__(self, codec_error: float | None):
        self.given = codec_error
        self.tabq = DEFAULT_MAX_CODEC_ERROR if codec_error is None else codec_error
        self.predictive = DEFAULT_PREDICTIVE_TARGET_REL_ERROR if codec_error is None else codec_error

    def of(self, recipe) -> float:
        return self.predictive if recipe.predictive else self.tabq

    def __str__(self) -> str:
        return f"{self.given:g}" if self.given is not None else f"{self.tabq:g} (predictive: {self.predictive:g})"


def _codec_check(search, bounds: _Bounds) -> str:
    """What the codec-error bound did for this plan: said as measured only where it was."""
    w = search.winner
    if w is None:
        return f"candidates whose measured error exceeds {bounds} rejected (--codec-error)"
    if w.codec_error is None:
        return ("error not measured (the profile predates it, or did not measure this q̄ or recipe); "
                "--codec-error not applied")
    return f"its measured error {w.codec_error:.3g} <= {bounds.of(w.candidate.recipe):g} (--codec-error)"


def _profile_default_group_size() -> int:
    from ..deploy.measure import ProfileSettings

    return ProfileSettings().group_size


def _describe(candidate, n_layers: int, recipe: bool = False) -> str:
    from ..plan.advise import describe_weights, edge_weight_bits

    return (f"ℓ = {candidate.split_layer}, weights {describe_weights(edge_weight_bits(candidate, n_layers))}, "
            f"Qa {candidate.qa}, {_codec_width(candidate)}" + (f", recipe {candidate.recipe.name}" if recipe else ""))


def _codec_width(candidate) -> str:
    """'q̄ 6', or for the predictive codec (which has none) the width Ψ counts it at."""
    if candidate.recipe.predictive:
        return f"predictive codec (Ψ counts it as q̄ {candidate.q_bar})"
    return f"q̄ {candidate.q_bar}"


def _print_ranking(search, profile, link, rate, budgets, several_recipes: bool = False, scored: str = "") -> None:
    from ..plan.advise import describe_weights, edge_weight_bits, step_latency, summary_rows
    from ..units import format_bytes

    title = f"eq. (8) over {len(search.ranked)} candidates" + (f", {scored}" if scored else "")
    table = Table(title=title)
    for col in ("#", "", "ℓ", "edge weights", "Qa", "q̄", "recipe", "edge memory", "Ψ", "acc. drop", "edge ms/token",
                "step ms" if link is not None else "wire B/token"):
        table.add_column(col, justify="left" if col in ("edge weights", "") else "right")
    rows = summary_rows(search, profile.n_layers)
    for i, r in enumerate(rows, 1):
        c = r.candidate
        lat = step_latency(profile, c, link, rate)
        mark = {"chosen": "[bold green]chosen[/]", "lost": "lost", "rejected": "[red]rejected[/]"}[r.status]
        table.add_row(
            str(i), mark, str(c.split_layer), describe_weights(edge_weight_bits(c, profile.n_layers)), str(c.qa), str(c.q_bar), c.recipe.name,
            format_bytes(r.memory.total_bytes) if r.memory else "-", f"{r.psi:g}",
            "-" if r.accuracy_drop is None or math.isnan(r.accuracy_drop) else f"{100 * r.accuracy_drop:.2f}%",
            f"{lat.compute_s * 1e3:.1f}",
            f"{lat.total_s * 1e3:.1f}" if link is not None else f"{lat.wire_bytes:.0f}",
        )
    err_console.print(table)
    index = {id(r): i for i, r in enumerate(rows, 1)}
    for i, r in enumerate(rows, 1):
        reason = r.reason
        if r.status == "chosen" and search.runner_up is not None and id(search.runner_up) in index:
            reason = reason.replace("over the runner-up", f"over #{index[id(search.runner_up)]}", 1)
        err_console.print(f"  #{i} {r.status}: {reason}", highlight=False)
    w = search.winner
    if w is not None and w.memory is not None:
        m = w.memory
        rate_text = f"; link rate R* {rate / 1e6:.2f} Mbit/s" if rate else ""
        console.print(
            f"plan: ℓ = {w.candidate.split_layer} of {profile.n_layers}, weights "
            f"{describe_weights(edge_weight_bits(w.candidate, profile.n_layers))}, Qa {w.candidate.qa}, {_codec_width(w.candidate)}; "
            f"edge memory {format_bytes(m.total_bytes)} of {format_bytes(budgets.memory_bytes)} (weights "
            f"{format_bytes(m.weights_bytes)}, KV {format_bytes(m.kv_bytes)}, activations {format_bytes(m.activation_bytes)})"
            f"{rate_text}",
            highlight=False,
        )
        if search.runner_up is not None:
            console.print(w.reason.replace("the runner-up", f"({_describe(search.runner_up.candidate, profile.n_layers, several_recipes)})", 1),
                          highlight=False)


def _print_sweep(profile, candidate, memory: int, max_tokens: int, embed_bits: int) -> None:
    from ..plan.advise import sweep_rows
    from ..units import format_bytes

    rows = sweep_rows(profile, candidate, memory, max_tokens, embed_bits=embed_bits)
    table = Table(title=f"W̄ sweep for {max_tokens} generated tokens (Fig. 5(b)/6 style; baseline = fp16 hidden state)")
    for col in ("W̄", "edge tokens", "cloud tokens", "cloud-only tokens", "wire bytes", "baseline bytes",
                "edge memory", "fits"):
        table.add_column(col, justify="right")
    for row in rows:
        p = row.point
        table.add_row(str(p.w_bar), str(p.edge_tokens), str(p.cloud_tokens), str(p.cloud_only_tokens),
                      format_bytes(p.wire_bytes), format_bytes(p.baseline_wire_bytes),
                      format_bytes(row.edge_memory_bytes), "yes" if row.fits else "no")
    console.print(table)
