"""`splitllm eval`: perplexity and zero-shot accuracy of a pipeline (fp, split, local, baselines)."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .common import (
    CODEC_FLAG_NAMES, DATA_DIR_OPTION, FORCE_JSON_OPTION, JSON_OPTION, MODEL_OPTION, PREDICTIVE_FIT_TEXT_OPTION,
    check_output_path, check_plan_fits, cli_errors, codec_flags_need_tabq, codec_options, console, err_console,
    fit_text_wire, json_safe, load_model_with_status, write_json,
)

DEFAULT_TASKS = "wikitext2,lambada,hellaswag,piqa,arc_easy,boolq,winogrande"


def _task_specs(tasks: str, task_files: list[Path]):
    from ..errors import SplitLLMError
    from ..eval.spec import get_task_spec, load_task_spec

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    specs = [get_task_spec(n) for n in names] + [load_task_spec(p) for p in task_files]
    if not specs:
        raise SplitLLMError("no tasks: give --tasks and/or --task-file")
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise SplitLLMError(f"task {s.name!r} is given twice")
        seen.add(s.name)
    return specs


def _check_data(specs, data_dir, needs_wikitext: bool) -> None:
    """Every data file exists (one-line error naming the first missing one), before the model loads."""
    from ..data import WIKITEXT2_TEST, data_file

    for s in specs:
        data_file(s.file, data_dir)
        if getattr(s, "labels_file", None):
            data_file(s.labels_file, data_dir)
    if needs_wikitext:  # codec and baseline calibration read WikiText-2's tail
        data_file(WIKITEXT2_TEST, data_dir)


def _fmt(value: float, metric: str) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3f}" if metric == "ppl" else f"{100 * value:.2f}"


@cli_errors
@codec_options(("tabq", "none", "fp16", "bf16", "predictive"), "Wire of the split pipeline: tabq | none (raw fp32) | fp16 | bf16 | predictive (token-predictive, frame format 4; fitted once) (default: the plan's codec, else tabq).")
def eval_cmd(
    tasks: str = typer.Option(DEFAULT_TASKS, "--tasks", "-t", help="Comma-separated built-in task names ('' for none)."),
    task_files: list[Path] = typer.Option([], "--task-file", help="A task spec YAML file (repeatable)."),
    limit: int = typer.Option(None, "--limit", help="First N examples per task (perplexity: first N windows)."),
    pipeline: str = typer.Option(None, "--pipeline", help="fp | split | local | rtn-w4a16 | atom-w4a4 | atom-w4a3 | smoothquant-w4a4 | smoothquant-w4a3 (default: split with --config, else fp)."),
    config: Path = typer.Option(None, "--config", help="A plan YAML (splitllm plan) whose split, OPSC and codec settings to evaluate."),
    model: str = MODEL_OPTION,
    split_layer: int = typer.Option(None, "--split-layer", "-l", help="ℓ for split/local (default: the plan's, else L // 2)."),
    q_w1: int = typer.Option(None, "--q-w1", help="OPSC weight bits of the front segment (default 4; 16 = unquantized)."),
    q_w2: int = typer.Option(None, "--q-w2", help="OPSC weight bits after l_w (default 16 = unquantized)."),
    l_w: int = typer.Option(None, "--l-w", help="OPSC split l_w (default: ℓ)."),
    group_size: int = typer.Option(None, "--group-size", help="Weight quantization group (default: 64 on the default model)."),
    data_dir: Path = DATA_DIR_OPTION,
    json_out: Path = JSON_OPTION,
    force: bool = FORCE_JSON_OPTION,
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Result cache (default: the splitllm cache's eval/)."),
    use_cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse and resume cached per-example results."),
    batch_size: int = typer.Option(16, "--batch-size", help="Rows per model call."),
    fit_text: Path = PREDICTIVE_FIT_TEXT_OPTION,
    codec_flags: dict = None,
    wire: str | None = None,
):
    """Score a pipeline on perplexity / zero-shot tasks; results are cached so an interrupted sweep resumes."""
    from ..errors import SplitLLMError
    from ..eval import ResultCache, evaluate_task
    from ..configio import overlay
    from ..eval.pipelines import (BASELINES, LazyLogitsFn, PipelineConfig, build_pipeline, cache_key,
                                  pipeline_from_plan, resolve)
    from ..model.loader import cache_root
    from ..plan.schema import Plan

    check_output_path(json_out, force)
    if limit is not None and limit < 1:
        raise SplitLLMError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise SplitLLMError(f"--batch-size must be >= 1, got {batch_size}")
    given = dict(split_layer=split_layer, q_w1=q_w1, q_w2=q_w2, l_w=l_w, group_size=group_size)
    plan = Plan.load(config) if config is not None else None
    base = pipeline_from_plan(plan, pipeline) if plan is not None else PipelineConfig(pipeline=pipeline or "fp")
    if fit_text is not None:
        if base.pipeline != "split":
            raise SplitLLMError(f"--fit-text fits the split's predictive codec: it applies to --pipeline split, "
                                f"not {base.pipeline}")
        wire, fit_text = fit_text_wire(wire, fit_text)
    codec = overlay(base.codec_settings, **codec_flags)
    cfg = overlay(base, codec=wire, codec_settings=codec if codec_flags else None, predictive_fit_text=fit_text,
                  **given)
    if cfg.pipeline not in ("split", "local"):
        stray = [f"--{k.replace('_', '-')}" for k in ("split_layer", "q_w1", "q_w2", "l_w") if given[k] is not None]
        if stray:
            raise SplitLLMError(f"{', '.join(stray)} apply to --pipeline split/local, not {cfg.pipeline}")
    if cfg.pipeline != "split" and (wire is not None or codec_flags):
        stray = ["--codec"] * (wire is not None) + [CODEC_FLAG_NAMES[k] for k in codec_flags]
        raise SplitLLMError(f"{', '.join(stray)} apply to --pipeline split only")
    if cfg.pipeline == "split":
        codec_flags_need_tabq(cfg.codec, codec_flags)
    specs = _task_specs(tasks, task_files)
    needs_calib = (cfg.pipeline == "split" and cfg.codec == "tabq" and cfg.codec_settings.needs_samples) \
        or (cfg.pipeline == "split" and cfg.codec == "predictive" and cfg.predictive_fit_text is None) \
        or cfg.pipeline in BASELINES[1:]
    _check_data(specs, data_dir, needs_calib)
    cache = None
    if use_cache:
        cache = ResultCache(cache_dir if cache_dir is not None else cache_root() / "eval")

    lm = load_model_with_status(model)
    check_plan_fits(plan, lm)
    cfg = resolve(cfg, lm.model)
    key = cache_key(cfg, lm.sha256)
    fn = LazyLogitsFn(lambda: build_pipeline(lm, cfg, data_dir, progress=lambda m: err_console.print(m)))
    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=False) as bar:
        ids = {s.name: bar.add_task(s.name, total=None) for s in specs}

        def progress(task: str, done: int, total: int) -> None:
            bar.update(ids[task], completed=done, total=total)

        for s in specs:
            results.append(evaluate_task(s, fn, lm.tokenizer, data_dir=data_dir, limit=limit, batch_size=batch_size,
                                         cache=cache, config=key if cache else None, progress=progress))
    info = fn.pipeline.info if fn.pipeline is not None else {}
    table = Table(title=f"{cfg.pipeline} on {lm.model_id}" + (f", ℓ={cfg.split_layer}" if cfg.split_layer else ""))
    for col in ("task", "metric", "value", "± stderr", "n", "note"):
        table.add_column(col, justify="left" if col in ("task", "metric", "note") else "right")
    for r in results:
        for m, v in r.metrics.items():
            se = r.stderr.get(m)
            note = f"seqlen {r.details['seqlen']}" if "seqlen" in r.details else ""
            table.add_row(r.task, m + (" *" if m == r.metric else ""), _fmt(v, m),
                          "" if se is None else _fmt(se, m), str(r.n), note)
    console.print(table)
    console.print("* headline metric; accuracies in %", style="dim")
    write_json(json_out, {
        "model": lm.model_id, "model_sha256": lm.sha256, "pipeline": json_safe(cfg.relevant()), "config_hash": key,
        "limit": limit, "info": json_safe(info), "results": [r.to_json() for r in results],
    }, force)
