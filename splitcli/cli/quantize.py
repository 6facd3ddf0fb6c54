"""`splitllm quantize`: write the edge/cloud shard directory (OPSC, paper eq. (1))."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .common import cli_errors, console, err_console, load_model_with_status


def parse_back_bits(value: str) -> int | None:
    from ..errors import SplitLLMError

    if value.strip().lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise SplitLLMError(f"--back-bits must be a bit width or 'none', got {value!r}") from None


@cli_errors
def quantize_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write edge.safetensors, cloud.safetensors, manifest.yaml, config and tokenizer into."),
    model: str = typer.Option(None, "--model", "-m", help="Built-in name, model directory or .gguf file (default: the plan's, else smollm2-135m)."),
    config: Path = typer.Option(None, "--config", help="plan.yaml from `splitllm plan`: its ℓ, ℓw, method, Qw1, Qw2, group size, Qa (KV bits) and embedding bits; explicit flags win."),
    split_layer: int = typer.Option(None, "--split-layer", "-l", help="ℓ: the edge runs layers [0, ℓ) (default: the plan's, else L // 2)."),
    front_bits: int = typer.Option(None, "--front-bits", help="Qw1: bits of the OPSC-quantized layers (2, 3, 4, 8 or 16 = keep) \\[default: the plan's, else 4]."),
    back_bits: str = typer.Option(None, "--back-bits", help="Qw2: bits of the other layers on the edge, or 'none' = the edge keeps only what it runs \\[default: the plan's, else none]."),
    l_w: int = typer.Option(None, "--lw", help="ℓw: how many layers get Qw1 (default: the plan's, else ℓ)."),
    method: str = typer.Option(None, "--method", help="front: layers [0, ℓw) at Qw1; back: the last ℓw layers (Table 4) \\[default: the plan's, else front]."),
    group_size: int = typer.Option(None, "--group-size", "-g", help="Weight quantization group size (default: the plan's, else 128 or 64, whichever divides every layer width)."),
    embed_bits: int = typer.Option(None, "--embed-bits", help="Edge embedding: 8 (per-row groups) or 16 (kept float32) \\[default: the plan's, else 8]."),
    kv_bits: int = typer.Option(None, "--kv-bits", help="Edge KV cache bits recorded for the runtime: 16 (float), 8 or 4 \\[default: the plan's Qa, else 16]."),
    force: bool = typer.Option(False, "--force", help="Overwrite the files of an existing --out directory."),
):
    """Quantize the edge's layers and write edge/cloud shards plus a manifest (deterministic)."""
    from dataclasses import replace

    from ..configio import overlay
    from ..model.loader import DEFAULT_MODEL, materialize
    from ..model.shards import QuantSpec, check_out_dir, predicted_edge_bytes, shard_payload_bytes, write_shards
    from ..model.split import decoder_parts

    check_out_dir(out, force)
    plan = None
    if config is not None:
        from ..plan.schema import Plan

        plan = Plan.load(config)
    # The plan sets the defaults (else QuantSpec's own, the shard writer being their one home),
    # explicit flags win; 'none' is a value of --back-bits, so it is applied after the overlay.
    base = QuantSpec.from_plan(plan) if plan is not None else QuantSpec(None, group_size=None)
    spec = overlay(base, split_layer=split_layer, front_bits=front_bits, l_w=l_w, method=method,
                   group_size=group_size, embed_bits=embed_bits, kv_bits=kv_bits)  # fails fast on bad flags
    if back_bits is not None:
        spec = replace(spec, back_bits=parse_back_bits(back_bits))
    lm = load_model_with_status(model or (plan.model_id if plan is not None else DEFAULT_MODEL))
    parts = decoder_parts(lm.model)
    spec = spec.resolved(parts)
    ell, group, front_bits, method = spec.split_layer, spec.group_size, spec.front_bits, spec.method
    back_bits = "none" if spec.back_bits is None else str(spec.back_bits)
    model_dir, _ = materialize(lm.source)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("quantizing", total=None)

        def progress(done, total, what):
            bar.update(task, completed=done, total=total, description=what)

        manifest = write_shards(lm, model_dir, spec, out, force=force, progress=progress)
    sizes = shard_payload_bytes(out)
    predicted = predicted_edge_bytes(parts, spec)
    kept = manifest.edge_layers()
    console.print(
        f"wrote {out}: edge {sizes['edge.safetensors'] / 1e6:.2f} MB ({len(kept)} layers, predicted "
        f"{predicted / 1e6:.2f} MB{'' if predicted == sizes['edge.safetensors'] else ' — MISMATCH'}), "
        f"cloud {sizes['cloud.safetensors'] / 1e6:.2f} MB; ℓ={ell}, ℓw={spec.lw}, {method}, "
        f"Qw1={front_bits}, Qw2={back_bits}, G={group}",
        highlight=False,
    )
