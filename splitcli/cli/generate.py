"""`splitllm generate`: edge -> wire -> cloud in one process, with per-step figures."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import check_output_path, cli_errors, console, err_console, load_model_with_status, write_json


@cli_errors
def generate_cmd(
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue (or the user message with --chat)."),
    model: str = typer.Option(None, "--model", "-m", help="Built-in name, model directory or .gguf file (default: the plan's, else smollm2-135m; with --shards it is only checked against the manifest's hash)."),
    split_layer: int = typer.Option(None, "--split-layer", "-l", help="ℓ: the edge runs layers [0, ℓ), the cloud the rest (default: the plan's, else L // 2)."),
    config: Path = typer.Option(None, "--config", help="plan.yaml from `splitllm plan`: ℓ, edge weight bits, Qa and the codec (τ, Q̄, Δ); explicit flags win."),
    shards: Path = typer.Option(None, "--shards", help="Run the quantized split from a directory written by `splitllm quantize` (edge from edge.safetensors, cloud from cloud.safetensors)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", help="Tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy decoding."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int = typer.Option(0, "--seed", help="Random seed for sampling."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    prefill_chunk: int = typer.Option(0, "--prefill-chunk", help="Prefill the prompt in chunks of this many tokens (0 = at once)."),
    codec: str = typer.Option(None, "--codec", help="Hidden-state wire: none (raw fp32) or tabq (threshold + TAB-Q + rANS) [default: tabq with --config, else none]."),
    tau: float = typer.Option(None, "--tau", help="tabq: absolute outlier threshold τ (default: calibrated from --tau-quantile)."),
    tau_quantile: float = typer.Option(None, "--tau-quantile", help="tabq: τ at this quantile of |x| on the calibration slice [default: 0.999]."),
    max_bits: int = typer.Option(None, "--max-bits", help="tabq: widest code Q̄ in bits, sign included [default: 6]."),
    delta: float = typer.Option(None, "--delta", help="tabq: per-token distortion tolerance Δ [default: 0.05]."),
    no_entropy: bool = typer.Option(False, "--no-entropy", help="tabq: bit-pack the symbols instead of rANS coding them."),
    data_dir: Path = typer.Option(None, "--data-dir", help="Data directory for codec calibration (default: $SPLITLLM_DATA, ../shared/data)."),
    show_steps: bool = typer.Option(True, "--steps/--no-steps", help="Print the per-step table."),
    json_out: Path = typer.Option(None, "--json", help="Also write text and per-step figures to this JSON file."),
    force: bool = typer.Option(False, "--force", help="Overwrite the --json file if it exists."),
):
    """Generate text with the model split at ℓ: edge half -> hidden state on the wire -> cloud half."""
    from ..errors import SplitLLMError
    from ..plan.schema import Plan
    from ..runtime.codec_wire import codec_params
    from ..runtime.generate import SamplingConfig, encode_prompts, generate

    # Cheap checks first, so bad input fails before the model loads.
    check_output_path(json_out, force)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if not prompt.strip():
        raise SplitLLMError("the prompt is empty: give some text with --prompt")
    if prefill_chunk < 0:
        raise SplitLLMError(f"--prefill-chunk must be >= 0, got {prefill_chunk}")
    if shards is not None and (config is not None or codec not in (None, "none")):
        # Shards fix the edge's weights already; codec calibration needs the full model's edge.
        raise SplitLLMError("--shards runs the raw wire with the shards' own settings: drop --config/--codec")
    plan = Plan.load(config) if config is not None else None
    if codec is None:
        codec = "tabq" if plan is not None else "none"
    if plan is not None and codec == "tabq":  # the plan's codec, unless a flag says otherwise
        if tau is None and tau_quantile is None:
            tau, tau_quantile = plan.codec.tau, plan.codec.tau_quantile
        max_bits = plan.codec.q_bar if max_bits is None else max_bits
        delta = plan.codec.delta if delta is None else delta
    params = codec_params(codec, tau, tau_quantile, max_bits, delta, not no_entropy, data_dir)
    if shards is not None:
        session, tokenizer, model_config, model_id = _shard_session(shards, model, split_layer)
    else:
        session, tokenizer, model_config, model_id, plan = _model_session(model, split_layer, plan, codec, params, data_dir)
    split_layer, n_layers = session.edge.split_layer, session.edge.parts.num_layers
    context = getattr(model_config, "max_position_embeddings", None)
    ids, mask = encode_prompts(tokenizer, [prompt], chat=chat, context_length=context)
    if context is not None and ids.shape[1] + max_new_tokens > context:
        raise SplitLLMError(
            f"prompt ({ids.shape[1]} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the context of {context} tokens"
        )
    if plan is not None and ids.shape[1] + max_new_tokens > plan.max_tokens:
        err_console.print(f"[yellow]note:[/] {ids.shape[1] + max_new_tokens} tokens exceed the plan's W̄ = "
                          f"{plan.max_tokens} (its edge memory was sized for that many)")
    eos = {t for t in (tokenizer.eos_token_id, getattr(model_config, "eos_token_id", None)) if isinstance(t, int)}
    result = generate(session, ids, mask, cfg, eos_token_ids=eos, prefill_chunk=prefill_chunk or None)
    text = tokenizer.decode(result.tokens[0], skip_special_tokens=True)
    console.print(text, highlight=False, markup=False, soft_wrap=True)
    rows = [("prefill", result.prefill)] + [(str(i + 1), s) for i, s in enumerate(result.steps)]
    if show_steps:
        planned = f", plan {config}" if plan is not None else ""
        table = Table(title=f"split at ℓ={split_layer} of {n_layers} layers, wire={session.wire.name}{planned}")
        for col in ("step", "tokens", "wire bytes", "edge ms", "encode ms", "decode ms", "cloud ms"):
            table.add_column(col, justify="right")
        for name, s in rows:
            table.add_row(
                name, str(s.tokens), str(s.wire_bytes), f"{s.edge_ms:.1f}", f"{s.encode_ms:.2f}",
                f"{s.decode_ms:.2f}", f"{s.cloud_ms:.1f}",
            )
        err_console.print(table)
    n = len(result.steps)
    if n:
        avg = sum(s.total_ms for s in result.steps) / n
        err_console.print(
            f"{result.tokens.shape[1]} tokens; decode {1000 / avg:.1f} tok/s; "
            f"{sum(s.wire_bytes for s in result.steps) / n:.0f} wire bytes/step",
            highlight=False,
        )
    if json_out is not None:
        write_json(
            json_out,
            {
                "model": model_id,
                "shards": None if shards is None else str(shards),
                "split_layer": split_layer,
                "plan": None if plan is None else plan.to_dict(),
                "wire": session.wire.name,
                "prompt": prompt,
                "text": text,
                "tokens": result.tokens[0].tolist(),
                "steps": [dict(step=name, **vars(s)) for name, s in rows],
            },
            force,
        )


def _model_session(model, split_layer, plan, codec, params, data_dir):
    """(session, tokenizer, config, model id, plan at the ℓ used) from a full model, optionally shaped by a plan."""
    from ..model.loader import DEFAULT_MODEL
    from ..model.split import decoder_parts, validate_split_layer
    from ..runtime.codec_wire import build_wire
    from ..runtime.planned import planned_edge, with_split_layer
    from ..runtime.session import SplitSession

    lm = load_model_with_status(model or (plan.model_id if plan else DEFAULT_MODEL))
    n_layers = decoder_parts(lm.model).num_layers
    if split_layer is None:
        split_layer = plan.split_layer if plan is not None else n_layers // 2
    split_layer = validate_split_layer(split_layer, n_layers)
    if plan is not None:
        plan = with_split_layer(plan, split_layer)  # an explicit -l wins over the plan's ℓ
    edge = planned_edge(lm.model, plan) if plan is not None else None
    wire = build_wire(codec, params, lm, split_layer, data_dir, progress=lambda m: err_console.print(m, highlight=False))
    session = SplitSession(lm.model, split_layer, wire=wire, edge=edge)
    return session, lm.tokenizer, lm.model.config, lm.model_id, plan


def _shard_session(shards: Path, model: str | None, split_layer: int | None):
    """(session, tokenizer, config, model id) from a shard directory, each half from its own shard."""
    from ..model.loader import materialize, resolve_model
    from ..model.shard_loader import load_cloud, load_edge, load_tokenizer
    from ..runtime.session import SplitSession

    sha = None
    if model is not None:
        with err_console.status(f"hashing model {model} ..."):
            _, sha = materialize(resolve_model(model))
    with err_console.status(f"loading shards from {shards} ..."):
        edge = load_edge(shards, split_layer, sha)
        cloud = load_cloud(shards, split_layer, sha)
        tokenizer = load_tokenizer(shards)
    m = edge.manifest
    model_id = f"{m.model_id} (shards: Qw1={m.front_bits}, ℓw={m.l_w}, {m.method}, G={m.group_size})"
    return SplitSession.from_halves(edge.half, cloud.half), tokenizer, edge.model.config, model_id
