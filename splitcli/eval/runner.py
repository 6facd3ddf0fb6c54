"""Evaluate one task spec against any LogitsFn, with caching and progress reporting."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

from splitcli.data import data_file
from splitcli.errors import SplitLLMError
from splitcli.eval.cache import CacheEntry, ResultCache
from splitcli.eval.loaders import ClozeExample, MCExample, load_examples, load_text
from splitcli.eval.metrics import mc_correct, mean, mean_stderr, ppl_from_nll
from splitcli.eval.perplexity import perplexity
from splitcli.eval.protocols import LogitsFn, ProgressFn, Tokenizer, encode
from splitcli.eval.results import TaskResult
from splitcli.eval.scoring import score_requests
from splitcli.eval.spec import TaskSpec, get_task_spec


def _settings_key(spec: TaskSpec, max_length: int, data_dir: str | os.PathLike[str] | None) -> str:
    """Everything besides the pipeline that changes the numbers: spec, truncation, data size."""
    size = data_file(spec.file, data_dir).stat().st_size
    blob = f"{spec.fingerprint()}|{max_length if spec.format != 'text_ppl' else '-'}|{size}"
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _mc_result(spec: TaskSpec, examples: Sequence[MCExample], done: dict[int, Any], limit: int | None) -> TaskResult:
    acc, acc_norm = [], []
    for i, ex in enumerate(examples):
        a, an = mc_correct(done[i]["ll"], ex.choice_texts, ex.gold)
        acc.append(float(a))
        acc_norm.append(float(an))
    metrics = {"acc": mean(acc), "acc_norm": mean(acc_norm)}
    stderr = {"acc": mean_stderr(acc), "acc_norm": mean_stderr(acc_norm)}
    correct = {"acc": _bits(acc), "acc_norm": _bits(acc_norm)}
    if spec.format == "mc_partial_jsonl":  # one continuation for all options: acc_norm == acc
        metrics.pop("acc_norm")
        stderr.pop("acc_norm")
        correct.pop("acc_norm")
    # Per-example outcomes let two pipelines be compared pairwise on the same examples.
    return TaskResult(spec.name, spec.metric, metrics, stderr, len(examples), limit, {"correct": correct})


def _bits(outcomes: Sequence[float]) -> str:
    """[1.0, 0.0, 1.0] -> "101": one character per example, in file order."""
    return "".join("1" if x else "0" for x in outcomes)


def _cloze_result(spec: TaskSpec, n: int, done: dict[int, Any], limit: int | None) -> TaskResult:
    ll = [done[i]["ll"] for i in range(n)]
    greedy = [float(done[i]["greedy"]) for i in range(n)]
    # Harness aggregation for LAMBADA: exp(-mean of per-example log-likelihoods).
    ppl = ppl_from_nll(-sum(ll), n)
    return TaskResult(
        spec.name, spec.metric, {"ppl": ppl, "acc": mean(greedy)}, {"ppl": None, "acc": mean_stderr(greedy)}, n, limit,
        {"correct": {"acc": _bits(greedy)}},
    )


def _score_examples(
    spec: TaskSpec,
    examples: Sequence[MCExample] | Sequence[ClozeExample],
    logits_fn: LogitsFn,
    tokenizer: Tokenizer,
    entry: CacheEntry | None,
    progress: ProgressFn | None,
    *,
    max_length: int,
    batch_size: int,
    max_batch_tokens: int | None,
    chunk_size: int,
) -> dict[int, Any]:
    """Per-example records for every example, resuming from the cache's partial file."""
    n = len(examples)
    done = {i: r for i, r in (entry.load_partial() if entry else {}).items() if i < n}
    if progress is not None:
        progress(spec.name, len(done), n)
    todo = [i for i in range(n) if i not in done]
    for c in range(0, len(todo), chunk_size):
        chunk = todo[c : c + chunk_size]
        requests: list[tuple[str, str, int | None]] = []
        owners: list[int] = []
        for i in chunk:
            ex = examples[i]
            if isinstance(ex, MCExample):
                for ctx, cont in zip(ex.contexts, ex.continuations):
                    requests.append((ctx, cont, i))
                    owners.append(i)
            else:
                requests.append((ex.context, ex.continuation, i))
                owners.append(i)
        base = len(done)

        def on_batch(rows_done: int, rows_total: int, base: int = base, size: int = len(chunk)) -> None:
            # Display only: the chunk's examples are credited in proportion to the model calls made.
            if progress is not None:
                progress(spec.name, base + size * rows_done // max(rows_total, 1), n)

        scored = score_requests(
            logits_fn, tokenizer, requests, max_length=max_length, batch_size=batch_size,
            max_batch_tokens=max_batch_tokens, on_batch=on_batch,
        )
        records: dict[int, Any] = {}
        for i, res in zip(owners, scored):
            if isinstance(examples[i], MCExample):
                records.setdefault(i, {"ll": []})["ll"].append(res.loglik)
            else:
                records[i] = {"ll": res.loglik, "greedy": res.is_greedy}
        if entry is not None:
            entry.append_partial(records)
        done.update(records)
        if progress is not None:
            progress(spec.name, len(done), n)
    return done


def _evaluate_ppl(
    spec: TaskSpec,
    logits_fn: LogitsFn,
    tokenizer: Tokenizer,
    entry: CacheEntry | None,
    progress: ProgressFn | None,
    data_dir: str | os.PathLike[str] | None,
    limit: int | None,
    windows_per_call: int,
) -> TaskResult:
    assert spec.seqlen is not None  # guaranteed by TaskSpec validation
    ids = encode(tokenizer, load_text(spec, data_dir))
    total = len(ids) // spec.seqlen if limit is None else min(limit, len(ids) // spec.seqlen)
    saved = entry.load_partial() if entry else {}
    done_nll: list[float] = []
    while len(done_nll) in saved and len(done_nll) < total:
        done_nll.append(float(saved[len(done_nll)]["nll"]))
    if progress is not None:
        progress(spec.name, len(done_nll), total)

    def on_window(index: int, nll: float) -> None:
        if entry is not None:
            entry.append_partial({index: {"nll": nll}})
        if progress is not None:
            progress(spec.name, index + 1, total)

    r = perplexity(
        logits_fn, ids, seqlen=spec.seqlen, n_windows=limit, batch_size=windows_per_call, done_nll=done_nll, on_window=on_window
    )
    details = {"seqlen": r.seqlen, "windows": r.windows, "tokens": r.tokens, "text_tokens": r.text_tokens, "nll": r.nll}
    return TaskResult(spec.name, spec.metric, {"ppl": r.ppl}, {"ppl": None}, r.windows, limit, details)


def evaluate_task(
    task: TaskSpec | str,
    logits_fn: LogitsFn,
    tokenizer: Tokenizer,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    max_length: int = 2048,
    batch_size: int = 16,
    max_batch_tokens: int | None = 4096,
    cache: ResultCache | None = None,
    config: str | None = None,
    progress: ProgressFn | None = None,
    chunk_size: int = 64,
) -> TaskResult:
    """Score one task (a TaskSpec, a built-in name, or a YAML path).

    ``limit``: the first N examples in file order (for perplexity: the first N windows).
    ``max_length``: the model's context; longer requests are truncated from the left.
    ``batch_size`` / ``max_batch_tokens``: rows (perplexity: windows) per model call, capped so
    rows x width <= max_batch_tokens (the logits are that many vocab-sized vectors).
    ``cache`` + ``config`` (from ``config_hash``): reuse finished results and resume interrupted
    ones at example granularity; ``chunk_size`` examples are scored between cache writes.
    """
    spec = task if isinstance(task, TaskSpec) else get_task_spec(task)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if cache is not None and not config:
        raise ValueError("a result cache needs the pipeline's config hash (config=config_hash(...))")
    entry = None
    if cache is not None and config:
        entry = cache.entry(spec.name, config, limit, _settings_key(spec, max_length, data_dir))
        cached = entry.load_result()
        # Results cached before per-example outcomes were recorded are rebuilt from the example
        # store (no model calls), so every result carries them.
        if cached is not None and (spec.format == "text_ppl" or "correct" in cached.details):
            if progress is not None:
                progress(spec.name, cached.n, cached.n)
            return cached
    if spec.format == "text_ppl":
        assert spec.seqlen is not None
        per_call = batch_size if max_batch_tokens is None else max(1, min(batch_size, max_batch_tokens // spec.seqlen))
        result = _evaluate_ppl(spec, logits_fn, tokenizer, entry, progress, data_dir, limit, per_call)
    else:
        examples = load_examples(spec, data_dir, limit)
        if not examples:
            raise SplitLLMError(f"task {spec.name}: {data_file(spec.file, data_dir)} holds no examples")
        done = _score_examples(
            spec, examples, logits_fn, tokenizer, entry, progress,
            max_length=max_length, batch_size=batch_size, max_batch_tokens=max_batch_tokens, chunk_size=chunk_size,
        )
        if spec.format == "cloze_jsonl":
            result = _cloze_result(spec, len(examples), done, limit)
        else:
            result = _mc_result(spec, examples, done, limit)  # type: ignore[arg-type]
    if entry is not None:
        entry.save_result(result)
    return result


def evaluate_tasks(
    tasks: Sequence[TaskSpec | str], logits_fn: LogitsFn, tokenizer: Tokenizer, **kwargs: Any
) -> list[TaskResult]:
    """``evaluate_task`` for each task in order (same keyword arguments)."""
    return [evaluate_task(t, logits_fn, tokenizer, **kwargs) for t in tasks]
