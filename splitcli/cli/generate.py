"""`splitllm generate`: edge -> wire -> cloud in one process, with per-step figures."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer
from rich.table import Table

from .common import (
    DATA_DIR_OPTION, EDGE_ACT_BITS_OPTION, FORCE_JSON_OPTION, JSON_OPTION, PREDICTIVE_CODEC_OPTION,
    PREDICTIVE_FIT_TEXT_OPTION, check_output_path,
    check_plan_fits, cli_errors, codec_options, console, err_console, json_safe, load_model_with_status, split_spec,
    write_json,
)
from .live import live_options, run_live


@cli_errors
@codec_options(("none", "fp16", "bf16", "tabq", "predictive"), "Hidden-state wire: none (raw fp32), fp16, bf16, tabq (threshold + TAB-Q + rANS) or predictive (token-predictive, frame format 4; fitted once) (default: the plan's wire with --config, else none).")
def generate_cmd(
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue (or the user message with --chat)."),
    model: str = typer.Option(None, "--model", "-m", help="Built-in name, model directory or .gguf file (default: the plan's, else smollm2-135m; with --shards it is only checked against the manifest's hash)."),
    split_layer: int = typer.Option(None, "--split-layer", "-l", help="ℓ: the edge runs layers [0, ℓ), the cloud the rest (default: the plan's, else L // 2)."),
    edge_act_bits: int = EDGE_ACT_BITS_OPTION,
    predictive_codec: Path = PREDICTIVE_CODEC_OPTION,
    fit_text: Path = PREDICTIVE_FIT_TEXT_OPTION,
    config: Path = typer.Option(None, "--config", help="plan.yaml from `splitllm plan`: ℓ, edge weight, embedding and KV bits and the codec (τ, Q̄, Δ); explicit flags win."),
    shards: Path = typer.Option(None, "--shards", help="Run the quantized split from a directory written by `splitllm quantize` (edge from edge.safetensors, cloud from cloud.safetensors)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", help="Tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy decoding."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int = typer.Option(0, "--seed", help="Random seed for sampling."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    prefill_chunk: int = typer.Option(0, "--prefill-chunk", help="Prefill the prompt in chunks of this many tokens (0 = at once)."),
    data_dir: Path = DATA_DIR_OPTION,
    show_steps: bool = typer.Option(True, "--steps/--no-steps", help="Print the per-step table."),
    json_out: Path = typer.Option(None, "--json", help="Also write text and per-step figures to this JSON file."),
    force: bool = FORCE_JSON_OPTION,
    deadline: str = typer.Option(None, "--deadline", help="Per-token deadline D, e.g. 100ms: Algorithm 2 runs live on the emulated --link, or with --cloud on the measured network link (keep, compress harder, I_kv = 0, stop)."),
    link: str = typer.Option(None, "--link", help="Emulated uplink: '2Mbit/s,20ms,jitter=5ms,loss=0.01', or a rate schedule by step '10Mbit/s@0;0.5Mbit/s@8,20ms' (quote it); with --cloud it shapes the real uplink in real time."),
    eps: float = typer.Option(None, "--eps", help="Outage target ε of eq. (9) for the live policy (default: the plan's, else 0.001)."),
    i_kv: int = typer.Option(None, "--i-kv", help="1: the edge also sends KV rows (the cloud keeps a session cache); 0: hidden states only (default: the plan's, else 1)."),
    local_tokens: int = typer.Option(0, "--local-tokens", help="w: the edge generates this many tokens alone with all layers (its OPSC model), then hands off (needs --deadline)."),
    trace: Path = typer.Option(None, "--trace", help="Write the live policy's per-step decisions here (JSONL)."),
    cloud: str = typer.Option(None, "--cloud", help="HOST:PORT of a `splitllm serve-cloud`: run the edge half here and the cloud half there over gRPC."),
    cloud_api_key: str = typer.Option(None, "--cloud-api-key", help="Bearer token for --cloud (default: $SPLITLLM_API_KEY)."),
    cloud_ca: Path = typer.Option(None, "--cloud-ca", help="PEM certificate (CA or self-signed) to trust: talk to --cloud over TLS."),
    codec_flags: dict = None,
    wire: str | None = None,
):
    """Generate text with the model split at ℓ: edge half -> hidden state on the wire -> cloud half."""
    from ..errors import SplitLLMError
    from ..plan.schema import Plan
    from ..runtime.generate import SamplingConfig, encode_prompts, generate

    # Cheap checks first, so bad input fails before the model loads.
    check_output_path(json_out, force)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if not prompt.strip():
        raise SplitLLMError("the prompt is empty: give some text with --prompt")
    if prefill_chunk < 0:
        raise SplitLLMError(f"--prefill-chunk must be >= 0, got {prefill_chunk}")
    remote = _remote_options(cloud, cloud_api_key, cloud_ca, {"--prefill-chunk": prefill_chunk}) if cloud else None
    plan = Plan.load(config) if config is not None else None
    spec = split_spec(plan, wire, codec_flags, data_dir, split_layer=split_layer, edge_act_bits=edge_act_bits,
                      predictive_file=predictive_codec, predictive_fit_text=fit_text)
    live = live_options(plan, spec, deadline, link, eps, i_kv, local_tokens, trace, force, shards is not None,
                        remote=cloud is not None)
    progress = lambda m: err_console.print(m, highlight=False)  # noqa: E731
    lm = None
    if shards is not None:
        split, tokenizer, model_config, model_id = _shard_split(shards, model, spec, plan, data_dir, progress)
    else:
        split, tokenizer, model_config, model_id, lm = _model_split(model, spec, plan, data_dir, progress)
    split_layer, n_layers = split.spec.split_layer, split.edge.parts.num_layers
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
    if remote is not None:
        return _generate_remote(remote, split, model_sha(shards, lm), ids, cfg, eos, tokenizer, json_out, force,
                                dict(model=model_id, prompt=prompt, split_layer=split_layer), live, lm)
    if live is not None:
        result = run_live(live, lm, split, ids, mask, cfg, eos)
        text = tokenizer.decode(result.tokens[0], skip_special_tokens=True)
        console.print(text, highlight=False, markup=False, soft_wrap=True)
        return
    from ..runtime.fast import fast_split_session

    session = fast_split_session(split)  # the fast decode path where the model supports it, else the eager one
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
                # the plan as run: an explicit -l moves its ℓ (the rest of the split is in "split")
                "plan": None if plan is None else {**plan.to_dict(), "split_layer": split_layer},
                "split": json_safe(asdict(split.spec)),
                "wire": session.wire.name,
                "prompt": prompt,
                "text": text,
                "tokens": result.tokens[0].tolist(),
                "steps": [dict(step=name, **vars(s)) for name, s in rows],
            },
            force,
        )


def _remote_options(cloud: str, api_key: str | None, ca: Path | None, unsupported: dict) -> dict:
    """--cloud's settings, checked before the model loads."""
    from ..errors import SplitLLMError
    from ..serve.config import check_target
    from .serve import api_key_from

    given = [flag for flag, value in unsupported.items() if value]
    if given:
        raise SplitLLMError(f"--cloud runs plain split generation: it does not take {', '.join(given)}")
    check_target("--cloud", cloud)
    pem = None
    if ca is not None:
        try:
            pem = ca.read_bytes()
        except OSError as exc:
            raise SplitLLMError(f"--cloud-ca {ca}: {exc.strerror or exc}") from None
    return dict(target=cloud, api_key=api_key_from(api_key), root_certificates=pem)


def model_sha(shards: Path | None, lm) -> str:
    """The hash the cloud checks sessions against: the model's (a shard manifest records it)."""
    if shards is None:
        return lm.sha256
    from ..model.shards import read_manifest

    return read_manifest(shards).model_sha256


def _generate_remote(remote: dict, split, sha: str, ids, cfg, eos, tokenizer, json_out, force, record: dict,
                     live=None, lm=None):
    """The split's edge half here, its cloud half on a `serve-cloud`; same tokens as in process.
    With `live`: Algorithm 2 on the measured link (cli.live.run_live_remote)."""
    from ..serve.client import RemoteCloud, generate_remote

    cloud = RemoteCloud(model_sha256=sha, **remote)
    if live is not None:
        from .live import run_live_remote

        tokens = run_live_remote(live, lm, split, ids, cfg, eos, cloud).tokens[0].tolist()
    else:
        tokens = list(generate_remote(split, ids, cfg, cloud, eos_token_ids=eos))
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    console.print(text, highlight=False, markup=False, soft_wrap=True)
    if json_out is not None:
        write_json(json_out, {**record, "cloud": remote["target"], "text": text, "tokens": tokens}, force)


def _model_split(model, spec, plan, data_dir, progress):
    """(split, tokenizer, config, model id) from a full model, shaped by the spec."""
    from ..deploy import build_split
    from ..model.loader import DEFAULT_MODEL

    lm = load_model_with_status(model or (plan.model_id if plan else DEFAULT_MODEL))
    check_plan_fits(plan, lm)
    return build_split(lm, spec, data_dir, progress), lm.tokenizer, lm.model.config, lm.model_id, lm


def _shard_split(shards: Path, model: str | None, spec, plan, data_dir, progress):
    """(split, tokenizer, config, model id) from a shard directory, each half from its own shard."""
    from ..deploy import build_shard_split
    from ..model.loader import materialize, resolve_model

    sha = None
    if model is not None:
        with err_console.status(f"hashing model {model} ..."):
            _, sha = materialize(resolve_model(model))
    # the shards fix the edge's weights; a plan contributes ℓ (checked against the manifest) and the codec
    if plan is not None:
        from ..errors import SplitLLMError
        from ..model.shards import read_manifest

        m = read_manifest(shards)
        if m.split_layer != plan.split_layer and spec.split_layer == plan.split_layer:
            raise SplitLLMError(f"the plan splits at ℓ={plan.split_layer} but {shards} at ℓ={m.split_layer}: "
                                f"write shards for this plan with `splitllm quantize --config`")
    with err_console.status(f"loading shards from {shards} ..."):
        split, tokenizer, m = build_shard_split(shards, spec.wire, spec.codec, spec.split_layer, sha, data_dir, progress,
                                                edge_act_bits=spec.edge_act_bits, predictive_file=spec.predictive_file,
                                                predictive_fit_text=spec.predictive_fit_text)
    model_id = f"{m.model_id} (shards: Qw1={m.front_bits}, ℓw={m.l_w}, {m.method}, G={m.group_size})"
    return split, tokenizer, split.edge.parts.config, model_id
