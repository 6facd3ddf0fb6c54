"""`splitllm bench …`: benchmarks that write JSON."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import Progress

from ..plan.codec_settings import DEFAULT_PREDICTIVE_TARGET_REL_ERROR
from .common import (
    DATA_DIR_OPTION, FORCE_JSON_OPTION, JSON_OPTION, MODEL_OPTION, check_output_path, cli_errors,
    codec_options, console, err_console, load_model_with_status, parse_count_list, write_json,
)

app = typer.Typer(help="Benchmarks (medians of repeats, measured side by side, JSON out).", no_args_is_help=True)


@app.command("decode")
@cli_errors
def decode_cmd(
    json_out: Path = JSON_OPTION,
    model: str = MODEL_OPTION,
    split_layer: int = typer.Option(None, "--split-layer", "-l", help="ℓ for the split runs (default: L // 2)."),
    tokens: int = typer.Option(64, "--tokens", help="Decode steps per run."),
    context: int = typer.Option(192, "--context", help="Prompt tokens before the timed steps (the prompt is repeated to this length)."),
    repeats: int = typer.Option(5, "--repeats", help="Rounds over every path; medians are reported."),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0 = torch's default); 1 is steadiest on a busy machine."),
    hf_generate: bool = typer.Option(True, "--hf-generate/--no-hf-generate", help="Also time Hugging Face generate (unsplit)."),
    llama_cpp: bool = typer.Option(True, "--llama-cpp/--no-llama-cpp", help="Also time llama.cpp on the model's GGUF file, if llama-cpp-python is installed."),
    force: bool = FORCE_JSON_OPTION,
):
    """Decode tok/s of every path side by side (HF generate, old and fast paths, unsplit and split, int4/int8 edges, the C decode step against the torch path, llama.cpp) against the memory-bandwidth bound."""
    from ..bench.decode import bench_decode
    from ..errors import SplitLLMError
    from ..model.split import decoder_parts, validate_split_layer

    check_output_path(json_out, force)
    if tokens < 4 or repeats < 1 or threads < 0 or context < 0:
        raise SplitLLMError("--tokens must be >= 4, --repeats >= 1, --threads >= 0 and --context >= 0")
    if threads:
        import torch

        torch.set_num_threads(threads)
    lm = load_model_with_status(model)
    n_layers = decoder_parts(lm.model).num_layers
    split_layer = validate_split_layer(n_layers // 2 if split_layer is None else split_layer, n_layers)
    context_limit = getattr(lm.model.config, "max_position_embeddings", None)
    if context_limit is not None and context + tokens > context_limit:
        raise SplitLLMError(f"--context + --tokens = {context + tokens} exceeds the model's context of {context_limit}")
    gguf = lm.source.path if getattr(lm.source, "kind", None) == "gguf" else None
    with Progress(console=err_console, transient=False) as bar:
        task = bar.add_task("bench decode", total=repeats)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        result = bench_decode(lm, split_layer, tokens, repeats, context=context, gguf_path=gguf, llama_cpp=llama_cpp,
                              hf_generate=hf_generate, progress=progress,
                              log=lambda m: bar.console.print(m, highlight=False))
    write_json(json_out, result, force)
    _print_decode_summary(result)


def _print_decode_summary(r: dict) -> None:
    from rich.table import Table

    table = Table(title=f"decode: {r['model']}, ℓ = {r['split_layer']}, {r['tokens']} tokens after {r['prompt_tokens']}, "
                        f"{r['threads']} thread(s), medians of {r['repeats']}; bandwidth {r['bandwidth_gb_s']:.1f} GB/s")
    for col in ("path", "tok/s", "ms/step", "edge", "codec", "cloud", "python", "MB/step", "bound tok/s", "of bound"):
        table.add_column(col, justify="right")
    for name, c in r["configs"].items():
        def ms(key, c=c):
            return f"{c[key]:.2f}" if key in c else "-"
        table.add_row(name, f"{c['tok_s']:.1f}", ms("step_ms"), ms("edge_ms"), ms("codec_ms"), ms("cloud_ms"),
                      ms("python_ms"), f"{c['bytes_per_step'] / 1e6:.0f}" if "bytes_per_step" in c else "-",
                      f"{c['bound_tok_s']:.0f}" if "bound_tok_s" in c else "-",
                      f"{100 * c['fraction_of_bound']:.0f}%" if "fraction_of_bound" in c else "-")
    from rich.console import Console

    # rich clamps a print's width to its console's (80 columns in a non-tty): ten columns need more
    wide = Console(file=console.file, width=max(console.width, 128), force_terminal=console.is_terminal,
                   no_color=console.no_color)
    wide.print(table)
    console.print(
        f"fast split {r['split_tok_s']:.1f} tok/s = {r['split_speedup_vs_old']:.2f}x the old split "
        f"({r['old_split_tok_s']:.1f}), {100 * r['fraction_of_bound']:.0f}% of its bound; the C decode step "
        f"{r['c_step_speedup']:.2f}x the torch path's (paired {r['c_step_speedup_paired_median']:.2f}x; int4 edge "
        f"{r['int4_c_step_speedup']:.2f}x); split overhead vs fast "
        f"unsplit {100 * r['overhead']:.1f}% (paired {100 * r['overhead_paired_median']:.1f}%, interleaved "
        f"{100 * r['overhead_interleaved_median']:.1f}%); greedy steps on the int8-screened LM head "
        f"{r['screened_head_speedup']:.2f}x the float head's ({r['split_full_head_tok_s']:.1f} tok/s; paired "
        f"{r['screened_head_speedup_paired_median']:.2f}x); int4 edge {r['int4_over_fp32_split']:.2f}x (paired "
        f"{r['int4_over_fp32_split_paired_median']:.2f}x, interleaved {r['int4_over_fp32_split_interleaved_median']:.2f}x; "
        f"bytes allow {r['int4_bound_ratio']:.2f}x"
        + (f"; on torch's kernel {r['int4_torch_kernel_over_fp32_split']:.2f}x"
           if r.get("int4_torch_kernel_over_fp32_split") else "")
        + (f"; with 8-bit inputs {r['int4_a8_over_fp32_split']:.2f}x, paired "
           f"{r['int4_a8_over_fp32_split_paired_median']:.2f}x, interleaved "
           f"{r['int4_a8_over_fp32_split_interleaved_median']:.2f}x" if r.get("split_int4_a8_tok_s") else "")
        + f"), int8 edge {r['int8_over_fp32_split']:.2f}x "
        f"(paired {r['int8_over_fp32_split_paired_median']:.2f}x; bytes allow {r['int8_bound_ratio']:.2f}x"
        + (f"; on torch's kernel {r['int8_torch_kernel_over_fp32_split']:.2f}x"
           if r.get("int8_torch_kernel_over_fp32_split") else "")
        + f") the fp32 split, kernels int4 {r['int4_kernel']}, int8 {r['int8_kernel']}; Qa = 8 edge step {r['kv8_edge_ms_ratio']:.2f}x the fp KV's "
        f"(whole step {r['kv8_step_ratio']:.2f}x); the int4 plan's edge alone before a handoff "
        f"{r['local_int4_tok_s']:.1f} tok/s = {r['local_int4_speedup_vs_old']:.2f}x the eager path's (paired "
        f"{r['local_int4_speedup_vs_old_paired_median']:.2f}x)"
        + (f"; llama.cpp {r['llama_cpp_tok_s']:.1f} tok/s" if r.get("llama_cpp_tok_s") else ""),
        highlight=False,
    )


@app.command("codec")
@cli_errors
@codec_options()
def codec_cmd(
    json_out: Path = JSON_OPTION,
    model: str = MODEL_OPTION,
    split_layer: int = typer.Option(None, "--split-layer", "-l", help="ℓ: the hidden state after layer ℓ is coded (default: L // 2)."),
    windows: int = typer.Option(8, "--windows", help="Perplexity windows (the first ones of the text)."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Tokens per window; each window's prefill is one frame."),
    text: Path = typer.Option(None, "--text", help="Run the benchmark on this UTF-8 text instead of WikiText-2's test split: the codecs calibrate (and --predictive fits) on its end, perplexity on its first windows."),
    sweep: bool = typer.Option(True, "--sweep/--no-sweep", help="Also sweep the codec recipes (paper's τ/Q̄ points, rotation, channel alpha, targets; ppl on 2 x 512 tokens)."),
    sweep_layers: str = typer.Option(None, "--sweep-layers", help="Comma-separated ℓ values for the sweep, e.g. 5,15,25 (default: --split-layer)."),
    plot: Path = typer.Option(None, "--plot", help="Write the sweep as a PNG plot here."),
    predictive: bool = typer.Option(False, "--predictive", help="Also fit and measure the token-predictive codec (frame format 4) on the same windows."),
    fit_windows: int = typer.Option(None, "--fit-windows", help="--predictive: windows of --seqlen tokens at the end of the text to fit it on (default 24, as deployment fits)."),
    predictive_error: float = typer.Option(None, "--predictive-error", help=f"--predictive: the error its step is chosen for on the fit text: mean per-token relative L2 error of the non-massive channels, as --target-error (default {DEFAULT_PREDICTIVE_TARGET_REL_ERROR:g})."),
    data_dir: Path = DATA_DIR_OPTION,
    force: bool = typer.Option(False, "--force", help="Overwrite the --json / --plot files if they exist."),
    codec_flags: dict = None,
):
    """Codec vs fp32/fp16/int8/zstd on real hidden states at ℓ: size, error, ppl (WikiText-2 or --text), speed."""
    from ..configio import overlay
    from ..deploy.calibrate import read_user_text, wikitext_path
    from ..errors import SplitLLMError
    from ..model.split import decoder_parts, validate_split_layer
    from ..plan.codec_settings import CodecSettings
    from .common import parse_int_list

    check_output_path(json_out, force)
    check_output_path(plot, force)
    if windows < 1 or seqlen < 2:
        raise SplitLLMError("--windows must be >= 1 and --seqlen >= 2")
    if plot is not None and not sweep:
        raise SplitLLMError("--plot draws the sweep: drop --no-sweep")
    if plot is not None and plot.suffix.lower() != ".png":
        raise SplitLLMError(f"--plot must name a .png file, got {plot}")
    params = overlay(CodecSettings(), **codec_flags)
    pred = None
    if predictive:
        from ..codec.predictive_fit import DEFAULT_TARGET_REL_ERROR
        from ..deploy.predictive import PREDICTIVE_FIT_WINDOWS

        target = DEFAULT_TARGET_REL_ERROR if predictive_error is None else predictive_error
        fit_windows = PREDICTIVE_FIT_WINDOWS if fit_windows is None else fit_windows
        if fit_windows < 1 or not 0 < target < 1:
            raise SplitLLMError("--fit-windows must be >= 1 and --predictive-error in (0, 1)")
        pred = dict(fit_windows=fit_windows, target_rel_error=target)
    elif predictive_error is not None or fit_windows is not None:
        raise SplitLLMError("--fit-windows and --predictive-error set up --predictive: add it")
    layers = parse_int_list(sweep_layers, "--sweep-layers") if sweep_layers is not None else None
    if layers is not None and not sweep:
        raise SplitLLMError("--sweep-layers sets the sweep's layers: drop --no-sweep")
    if text is None:
        wikitext_path(data_dir)   # the benchmark text (and calibration's), before the model loads
    else:
        read_user_text(text, "text")
    from ..bench.codec import bench_codec, plot_sweep

    lm = load_model_with_status(model)
    n_layers = decoder_parts(lm.model).num_layers
    split_layer = validate_split_layer(n_layers // 2 if split_layer is None else split_layer, n_layers)
    layers = tuple(validate_split_layer(v, n_layers) for v in layers) if layers is not None else None
    with Progress(console=err_console, transient=False) as bar:
        tasks = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        result = bench_codec(lm, split_layer, params, data_dir=data_dir, windows=windows, seqlen=seqlen,
                             sweep=sweep, sweep_layers=layers, progress=progress,
                             log=lambda m: bar.console.print(m, highlight=False), predictive=pred, text_file=text)
    write_json(json_out, result, force)
    if plot is not None:
        plot_sweep(result["sweep"], plot)
    _print_codec_summary(result)


def _print_codec_summary(r: dict) -> None:
    from rich.table import Table

    table = Table(title=f"hidden state at ℓ={r['split_layer']}: {r['windows']} x {r['seqlen']} tokens of {r['text']}")
    for col in ("method", "bytes/token", "x vs fp16", "rel L2"):
        table.add_column(col, justify="right")
    for m in r["methods"]:
        table.add_row(m["method"], f"{m['bytes_per_token']:.1f}", f"{m['ratio_vs_fp16']:.2f}", f"{m['rel_l2']:.2e}")
    console.print(table)
    load = ", ".join(f"{v:.1f}" for v in r["load_average"])
    console.print(
        f"ppl {r['ppl_fp']:.3f} -> {r['ppl_codec']:.3f} ({100 * (r['ppl_ratio'] - 1):+.2f}%); "
        f"decode-step frame {r['decode_step_frame_bytes']:.0f} B, encode {r['encode_ms_decode_step']:.3f} ms + "
        f"decode {r['decode_ms_decode_step']:.3f} ms; prefill encode {r['prefill_encode_mb_s']:.1f} MB/s; "
        f"entropy overhead {100 * r['entropy_overhead']:.2f}% (load average {load})",
        highlight=False,
    )
    if "predictive" in r:
        p = r["predictive"]
        console.print(
            f"token-predictive codec (format {p['frame_version']}, step {p['step']:.3f}): {p['ratio_vs_fp16']:.2f}x vs "
            f"fp16, ppl {p['ppl_fp']:.3f} -> {p['ppl']:.3f} ({100 * (p['ppl_ratio'] - 1):+.2f}%); decode-step frame "
            f"{p['decode_step_frame_bytes']:.0f} B, encode {p['encode_ms_decode_step']:.3f} ms + decode "
            f"{p['decode_ms_decode_step']:.3f} ms; prefill encode {p['prefill_encode_mb_s']:.1f} MB/s", highlight=False)
    chosen = r["calibration"].get("chosen")
    if chosen:
        console.print(f"calibration chose q_bar {chosen['q_bar']}, tau {chosen['tau']:.4g} ({chosen['tau_from']}) for "
                      f"target {chosen['target_rel_error']}: error {chosen['bulk_rel_error']:.4f} on the calibration "
                      f"text{'' if chosen['met'] else ' (NOT met)'}", highlight=False)
    if "sweep" in r:
        sw = r["sweep"]
        t = Table(title=f"sweep: ppl on {sw['evaluation']}; calibration on the {sw['calibration']}")
        for col in ("ℓ", "recipe", "x vs fp16", "rel L2", "ppl Δ%", "enc+dec ms/token", "prefill MB/s"):
            t.add_column(col, justify="right")
        for x in sw["rows"]:
            t.add_row(str(x["layer"]), x["recipe"], f"{x['ratio_vs_fp16']:.2f}", f"{x['rel_l2']:.3f}",
                      f"{100 * (x['ppl_ratio'] - 1):+.2f}", f"{x['encode_decode_ms_token']:.3f}",
                      f"{x['prefill_encode_mb_s']:.0f}")
        console.print(t)
        console.print(sw["note"], highlight=False)
@app.command("quant")
@cli_errors
def quant_cmd(
    json_out: Path = JSON_OPTION,
    model: str = MODEL_OPTION,
    windows: int = typer.Option(8, "--windows", help="WikiText-2 windows per perplexity."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Tokens per perplexity window."),
    lw: str = typer.Option("0,5,10,15,20,25,30", "--lw", help="Comma-separated ℓw values for the Table 4 analog."),
    split_layer: int = typer.Option(15, "--split-layer", "-l", help="ℓ of the edge whose shard, memory and speed are measured."),
    group_size: int = typer.Option(64, "--group-size", "-g", help="Weight quantization group size."),
    repeats: int = typer.Option(5, "--repeats", help="Interleaved fp32/int4 edge decode runs; medians are reported."),
    data_dir: Path = DATA_DIR_OPTION,
    decode_threads: int = typer.Option(1, "--decode-threads", help="Torch threads while timing decode (0 = torch's default); 1 is stable on a shared host."),
    force: bool = FORCE_JSON_OPTION,
):
    """OPSC at 4 bits: Table 4 perplexities (front/back), edge shard bytes, edge memory, edge decode speed."""
    from ..bench.quant import bench_quant
    from ..data import resolve_data_dir
    from ..errors import SplitLLMError

    check_output_path(json_out, force)
    lws = parse_count_list(lw, "--lw", 0)
    if windows < 1 or seqlen < 2 or repeats < 1 or decode_threads < 0:
        raise SplitLLMError("--windows, --repeats must be >= 1, --seqlen >= 2, --decode-threads >= 0")
    data = resolve_data_dir(data_dir)
    lm = load_model_with_status(model)
    console.print(f"measuring: WikiText-2 perplexity ({windows} x {seqlen} tokens) of 4-bit OPSC front/back at ℓw = "
                  f"{', '.join(map(str, lws))}; then 4-bit edge shards at ℓ = {split_layer}: bytes, edge memory "
                  f"(child process), edge decode fp32 vs int4", highlight=False)
    with Progress(console=console, transient=False) as bar:
        task = bar.add_task("bench quant", total=None)

        def progress(done, total, what):
            bar.update(task, completed=done, total=total or None, description=what)
            if "window" not in what:  # a line per stage and per finished perplexity (a non-tty shows no bar)
                bar.console.print(what, highlight=False)

        result = bench_quant(lm, lws, windows, seqlen, data, split_layer, group_size, repeats, progress=progress,
                             decode_threads=decode_threads)
    write_json(json_out, result, force)
    console.print(
        f"ppl fp {result['ppl_fp']:.3f}; front {result['ppl_front']}; back {result['ppl_back']}\n"
        f"edge ℓ={split_layer}: {result['edge_bytes_4bit_l15'] / 1e6:.2f} MB "
        f"({100 * result['edge_bytes_ratio']:.1f}% of fp32), memory predicted {result['edge_mem_pred_mb']:.1f} MB "
        f"vs measured {result['edge_mem_measured_mb']:.1f} MB; decode fp32 {result['decode_tok_s_fp32']:.1f} "
        f"vs int4 {result['decode_tok_s_int4']:.1f} tok/s",
        highlight=False,
    )


@app.command("serve")
@cli_errors
def serve_cmd(
    json_out: Path = JSON_OPTION,
    model: str = MODEL_OPTION,
    clients: str = typer.Option("1,2,4,8,16", "--clients", help="Comma-separated numbers of concurrent edge sessions."),
    split_layer: int = typer.Option(15, "--split-layer", "-l", help="ℓ of the split mode (cloud-only runs every layer)."),
    tokens: int = typer.Option(32, "--tokens", help="Tokens each client generates (prefill step included)."),
    repeats: int = typer.Option(3, "--repeats", help="Runs per (mode, clients); medians are reported."),
    wire: str = typer.Option("fp16", "--wire", help="Split wire: none (fp32), fp16, tabq (calibrated codec) or predictive (token-predictive, frame format 4); cloud-only sends raw embeddings."),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads of the server process (0 = torch's default)."),
    plot: Path = typer.Option(None, "--plot", help="Write tokens/s and cloud CPU per token vs clients (and the handoff curve) as a PNG here."),
    backend: str = typer.Option("local", "--backend", help="local: cloud-only vs split on serve-cloud's core; ray: the split on Ray Serve with each --replicas count, beside the local backend (needs the ray extra)."),
    replicas: str = typer.Option("1", "--replicas", help="--backend ray: comma-separated replica counts, e.g. 1,2."),
    data_dir: Path = DATA_DIR_OPTION,
    force: bool = typer.Option(False, "--force", help="Overwrite the --json / --plot files if they exist."),
):
    """Cloud server on loopback under N concurrent replay clients: cloud-only vs split at ℓ (Fig. 5)."""
    from ..errors import SplitLLMError
    from ..model.split import decoder_parts, validate_split_layer

    check_output_path(json_out, force)
    check_output_path(plot, force)
    counts = parse_count_list(clients, "--clients", 1, 64)
    if tokens < 2 or repeats < 1 or threads < 0:
        raise SplitLLMError("--tokens must be >= 2, --repeats >= 1 and --threads >= 0")
    if wire not in ("none", "fp16", "tabq", "predictive"):
        raise SplitLLMError(f"--wire must be none, fp16, tabq or predictive, got {wire!r}")
    if plot is not None and plot.suffix.lower() != ".png":
        raise SplitLLMError(f"--plot must name a .png file, got {plot}")
    replica_counts = _ray_bench_replicas(backend, replicas, plot)
    from ..bench.serve import bench_serve, plot_serve

    lm = load_model_with_status(model)
    n_layers = decoder_parts(lm.model).num_layers
    split_layer = validate_split_layer(split_layer, n_layers)
    with Progress(console=err_console, transient=False) as bar:
        task = bar.add_task("bench serve", total=None)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total or None)

        log = lambda m: bar.console.print(m, highlight=False)  # noqa: E731
        if replica_counts is not None:
            from ..bench.serve_ray import bench_serve_ray

            result = bench_serve_ray(lm, model, split_layer, counts, replica_counts, tokens, repeats, wire=wire,
                                     data_dir=data_dir, threads=threads or 1, progress=progress, log=log)
        else:
            result = bench_serve(lm, model, split_layer, counts, tokens, repeats, wire=wire, data_dir=data_dir,
                                 threads=threads, progress=progress, log=log)
    write_json(json_out, result, force)
    if replica_counts is not None:
        _print_serve_ray_summary(result)
        return
    if plot is not None:
        plot_serve(result, plot)
    _print_serve_summary(result)


def _ray_bench_replicas(backend: str, replicas: str, plot) -> list[int] | None:
    """The replica counts for --backend ray (Ray Serve installed), None for local."""
    from ..errors import SplitLLMError

    if backend not in ("local", "ray"):
        raise SplitLLMError(f"--backend must be local or ray, got {backend!r}")
    if backend == "local":
        if replicas != "1":
            raise SplitLLMError("--replicas needs --backend ray")
        return None
    from ..serve.ray_backend import require_ray

    require_ray()
    if plot is not None:
        raise SplitLLMError("--plot draws the local backend's figure: leave it out with --backend ray")
    return parse_count_list(replicas, "--replicas", 1, 16)


def _print_serve_table(r: dict) -> None:
    from rich.table import Table

    table = Table(title=f"bench serve: {r['model']}, ℓ = {r['split_layer']}, {r['tokens_per_client']} tokens per client "
                        f"(medians of {r['repeats']})")
    for col in ("mode", "clients", "tok/s", "cloud CPU ms/tok", "p50 ms", "p99 ms", "bytes/tok", "mean batch"):
        table.add_column(col, justify="right")
    for x in r["runs"]:
        table.add_row(x["mode"], str(x["clients"]), f"{x['tokens_per_s']:.1f}", f"{1e3 * x['cloud_cpu_s_per_token']:.2f}",
                      f"{x['p50_ms']:.1f}", f"{x['p99_ms']:.1f}", f"{x['bytes_per_token']:.0f}", f"{x['mean_batch']:.2f}")
    console.print(table)


def _print_serve_ray_summary(r: dict) -> None:
    _print_serve_table(r)
    over = ", ".join(f"{o['p50_ratio_ray_over_local']:.2f}x with {o['clients']}" for o in r["overhead_at_1_replica"])
    scale = ", ".join(f"{s['tokens_per_s_over_1_replica']:.2f}x at {s['replicas']} replicas / {s['clients']} clients"
                      for s in r["scaling"])
    console.print(f"Ray at {r['replicas'][0]} replica vs local, p50 per-token latency: {over}"
                  + (f"\ntokens/s vs {r['replicas'][0]} replica: {scale}" if scale else ""), highlight=False)


def _print_serve_summary(r: dict) -> None:
    _print_serve_table(r)
    a = r["acceptance"]
    parts = [f"with {a['clients']} clients"]
    if "cpu_per_token_split_over_cloud_only" in a:
        parts.append(f"split cloud CPU/token = {100 * a['cpu_per_token_split_over_cloud_only']:.0f}% of cloud-only")
    for m in ("cloud-only", "split"):
        if f"{m}_speedup_vs_1_client" in a:
            parts.append(f"{m} tok/s {a[f'{m}_speedup_vs_1_client']:.2f}x one client")
    hand = ", ".join(f"W̄={h['w_bar']}: {h['cloud_tokens']}" for h in r["handoff"] or () if h["i_kv"] == 0)
    console.print("; ".join(parts) + (f"\ncloud tokens vs W̄ (I_kv = 0): {hand}" if hand else ""), highlight=False)
