"""Evaluation library: score any model exposed as a LogitsFn on YAML-described tasks.

Typical use::

    from splitcli.eval import evaluate_task, ResultCache, config_hash
    fn = lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits
    result = evaluate_task("arc_easy", fn, tokenizer, limit=100,
                           cache=ResultCache(cache_dir), config=config_hash(pipeline_config))
    print(result.metric, result.value, result.stderr[result.metric])
"""

from splitcli.eval.cache import ResultCache, config_hash
from splitcli.eval.loaders import ClozeExample, MCExample, hellaswag_preprocess, load_examples, load_text
from splitcli.eval.metrics import mc_correct, mean_stderr, ppl_from_nll
from splitcli.eval.perplexity import PerplexityResult, perplexity
from splitcli.eval.protocols import LogitsFn, ProgressFn, Tokenizer, hf_logits_fn
from splitcli.eval.results import TaskResult
from splitcli.eval.runner import evaluate_task, evaluate_tasks
from splitcli.eval.scoring import LoglikResult, TokenRequest, encode_pair, score_requests, score_token_requests
from splitcli.eval.spec import TaskSpec, builtin_task_names, get_task_spec, load_task_spec

__all__ = [
    "ClozeExample", "LogitsFn", "LoglikResult", "MCExample", "PerplexityResult", "ProgressFn",
    "ResultCache", "TaskResult", "TaskSpec", "TokenRequest", "Tokenizer", "builtin_task_names",
    "config_hash", "encode_pair", "evaluate_task", "evaluate_tasks", "get_task_spec",
    "hellaswag_preprocess", "hf_logits_fn", "load_examples", "load_task_spec", "load_text", "mc_correct",
    "mean_stderr", "perplexity", "ppl_from_nll", "score_requests", "score_token_requests",
]
