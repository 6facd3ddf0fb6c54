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
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0 = torch's default); 1 is steadiest on a busy machine."),
    force: bool = typer.Option(False, "--force", help="Overwrite the --json file if it exists."),
):
    """Decode tok/s of the unsplit model vs the split model in one process (compression off)."""
    from ..bench.decode import bench_decode
    from ..errors import SplitLLMError
    from ..model.split import decoder_parts, validate_split_layer

    check_output_path(json_out, force)
    if tokens < 4 or repeats < 1 or threads < 0:
        raise SplitLLMError("--tokens must be >= 4, --repeats >= 1 and --threads >= 0")
    if threads:
        import torch

        torch.set_num_threads(threads)
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
