"""`splitllm bench …`: benchmarks that write JSON."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import Progress

from .common import check_output_path, cli_errors, console, load_model_with_status, write_json

app = typer.Typer(help="Benchmarks (medians of repeats, measured side by side, JSON out).", no_args_is_help=True)


@app.command("decode")
@cli_errors
def decode_cmd(
    json_out: Path = typer.Option(..., "--json", help="Where to write the results."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Built-in name, model directory or .gguf file."),
    split_layer: int = typer.Option(None, "--split-layer", "-l", help="ℓ for the split run (default: L // 2)."),
    tokens: int = typer.Option(64, "--tokens", help="Decode steps per run."),
    repeats: int = typer.Option(5, "--repeats", help="Alternating unsplit/split runs; medians are reported."),
    force: bool = typer.Option(False, "--force", help="Overwrite the --json file if it exists."),
):
    """Decode tok/s of the unsplit model vs the split model in one process (compression off)."""
    from ..bench.decode import bench_decode
    from ..errors import SplitLLMError
    from ..model.split import decoder_parts, validate_split_layer

    check_output_path(json_out, force)
    if tokens < 4 or repeats < 1:
        raise SplitLLMError("--tokens must be >= 4 and --repeats >= 1")
    lm = load_model_with_status(model)
    n_layers = decoder_parts(lm.model).num_layers
    split_layer = validate_split_layer(n_layers // 2 if split_layer is None else split_layer, n_layers)
    with Progress(console=console, transient=False) as bar:
        task = bar.add_task("decode runs", total=repeats)
        result = bench_decode(lm, split_layer, tokens, repeats, progress=lambda done, _: bar.update(task, completed=done))
    write_json(json_out, result, force)
    console.print(
        f"unsplit {result['unsplit_tok_s']:.1f} tok/s, split {result['split_tok_s']:.1f} tok/s, "
        f"overhead {100 * result['overhead']:.1f}% (median of {repeats})"
    )


@app.command("quant")
@cli_errors
def quant_cmd(
    json_out: Path = typer.Option(..., "--json", help="Where to write the results."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Built-in name, model directory or .gguf file."),
    windows: int = typer.Option(8, "--windows", help="WikiText-2 windows per perplexity."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Tokens per perplexity window."),
    lw: str = typer.Option("0,5,10,15,20,25,30", "--lw", help="Comma-separated ℓw values for the Table 4 analog."),
    split_layer: int = typer.Option(15, "--split-layer", "-l", help="ℓ of the edge whose shard, memory and speed are measured."),
    group_size: int = typer.Option(64, "--group-size", "-g", help="Weight quantization group size."),
    repeats: int = typer.Option(5, "--repeats", help="Interleaved fp32/int4 edge decode runs; medians are reported."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Data directory (default: $SPLITLLM_DATA, then ../shared/data)."),
    decode_threads: int = typer.Option(1, "--decode-threads", help="Torch threads while timing decode (0 = torch's default); 1 is stable on a shared host."),
    force: bool = typer.Option(False, "--force", help="Overwrite the --json file if it exists."),
):
    """OPSC at 4 bits: Table 4 perplexities (front/back), edge shard bytes, edge memory, edge decode speed."""
    from ..bench.quant import bench_quant
    from ..data import resolve_data_dir
    from ..errors import SplitLLMError

    check_output_path(json_out, force)
    try:
        lws = sorted({int(x) for x in lw.split(",") if x.strip()})
    except ValueError:
        raise SplitLLMError(f"--lw must be comma-separated integers, got {lw!r}") from None
    if not lws or windows < 1 or seqlen < 2 or repeats < 1 or decode_threads < 0:
        raise SplitLLMError("--lw needs at least one value; --windows, --repeats >= 1, --seqlen >= 2, --decode-threads >= 0")
    data = resolve_data_dir(data_dir)
    lm = load_model_with_status(model)
    with Progress(console=console, transient=False) as bar:
        task = bar.add_task("bench quant", total=None)

        def progress(done, total, what):
            bar.update(task, completed=done, total=total or None, description=what)

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
