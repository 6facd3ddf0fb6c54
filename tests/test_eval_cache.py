"""Resumable result cache: interrupted runs resume per example; results round-trip as JSON."""

import json
import math

import pytest
import torch

from splitcli.eval import ResultCache, TaskResult, config_hash, evaluate_task
from splitcli.eval.spec import task_spec_from_dict

V = 8


class CountingFn:
    """A fixed random bigram model that can be told to die after some calls."""

    def __init__(self, fail_after=None):
        self.table = torch.randn(V, V, generator=torch.Generator().manual_seed(0))
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, ids, mask):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt  # what a user's Ctrl-C looks like mid-sweep
        self.calls += 1
        return self.table[ids]


class CharTokenizer:
    bos_token_id = 0
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + ord(c) % (V - 2) for c in text]}


@pytest.fixture
def task(tmp_path):
    rows = [{"q": f"q{i}", "c": ["a" * (1 + i % 3), "bb", "c"], "g": i % 3} for i in range(25)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return task_spec_from_dict({"name": "t", "format": "mc_jsonl", "file": "t.jsonl", "context": "{q}:",
                                "choices": "c", "gold": "g", "metric": "acc_norm"})


def test_interrupted_run_resumes_per_example(tmp_path, task):
    tok, key = CharTokenizer(), config_hash({"m": 1})
    reference = evaluate_task(task, CountingFn(), tok, data_dir=tmp_path, batch_size=4)
    cache = ResultCache(tmp_path / "cache")
    kw = dict(data_dir=tmp_path, batch_size=4, chunk_size=5, cache=cache, config=key)
    dying = CountingFn(fail_after=6)
    with pytest.raises(KeyboardInterrupt):
        evaluate_task(task, dying, tok, **kw)
    entry = next((tmp_path / "cache" / "t").rglob("*.examples.jsonl"))
    saved = [json.loads(line)["i"] for line in entry.read_text().splitlines()]
    assert saved and len(saved) < 25 and saved == list(range(len(saved)))
    progress = []
    fn = CountingFn()
    resumed = evaluate_task(task, fn, tok, progress=lambda t, d, n: progress.append(d), **kw)
    assert progress[0] == len(saved) and progress[-1] == 25  # restored examples count as done
    assert resumed.metrics == pytest.approx(reference.metrics)
    again = CountingFn()
    assert evaluate_task(task, again, tok, **kw) == resumed and again.calls == 0


def test_a_smaller_limit_reuses_the_examples_store(tmp_path, task):
    kw = dict(data_dir=tmp_path, batch_size=4, cache=ResultCache(tmp_path / "cache"), config="k")
    tok = CharTokenizer()
    full = evaluate_task(task, CountingFn(), tok, **kw)
    fn = CountingFn()
    part = evaluate_task(task, fn, tok, limit=7, **kw)
    assert fn.calls == 0 and part.n == 7 and part.limit == 7 and full.n == 25
    ref = evaluate_task(task, CountingFn(), tok, data_dir=tmp_path, limit=7)
    assert part.metrics == pytest.approx(ref.metrics)


def test_torn_last_line_is_ignored_and_not_glued_to(tmp_path):
    entry = ResultCache(tmp_path).entry("t", "cfg", 5, "s")
    entry.append_partial({0: {"ll": [-1.0, -2.0]}})
    with entry.partial_path.open("a") as f:
        f.write('{"i": 1, "r": {"ll": [-1')  # killed mid-write
    assert entry.load_partial() == {0: {"ll": [-1.0, -2.0]}}
    entry.append_partial({1: {"ll": [-3.0, -4.0]}})
    assert entry.load_partial() == {0: {"ll": [-1.0, -2.0]}, 1: {"ll": [-3.0, -4.0]}}


def test_keys_separate_config_limit_and_spec(tmp_path, task):
    cache = ResultCache(tmp_path / "cache")
    tok = CharTokenizer()
    evaluate_task(task, CountingFn(), tok, data_dir=tmp_path, limit=10, cache=cache, config="a")
    for kw in ({"limit": 10, "config": "b"}, {"limit": 11, "config": "a"}, {"limit": 11, "config": "a", "max_length": 4}):
        fn = CountingFn()
        evaluate_task(task, fn, tok, data_dir=tmp_path, cache=cache, **kw)
        assert fn.calls > 0, kw
    changed = task_spec_from_dict({"name": "t", "format": "mc_jsonl", "file": "t.jsonl", "context": "{q}?",
                                   "choices": "c", "gold": "g", "metric": "acc_norm"})
    fn = CountingFn()
    evaluate_task(changed, fn, tok, data_dir=tmp_path, limit=10, cache=cache, config="a")
    assert fn.calls > 0


def test_cache_needs_a_config(tmp_path, task):
    with pytest.raises(ValueError, match="config hash"):
        evaluate_task(task, CountingFn(), CharTokenizer(), data_dir=tmp_path, cache=ResultCache(tmp_path))


def test_perplexity_task_resumes_per_window(tmp_path):
    (tmp_path / "text.raw").write_text("abcdefgh" * 20)  # 160 tokens, 10 windows of 16
    spec = task_spec_from_dict({"name": "txt", "format": "text_ppl", "file": "text.raw", "seqlen": 16, "metric": "ppl"})
    tok = CharTokenizer()
    ref = evaluate_task(spec, CountingFn(), tok, data_dir=tmp_path, batch_size=1)
    assert ref.details["windows"] == 10 and ref.details["tokens"] == 150 and ref.details["seqlen"] == 16
    kw = dict(data_dir=tmp_path, batch_size=1, cache=ResultCache(tmp_path / "c"), config="x")
    with pytest.raises(KeyboardInterrupt):
        evaluate_task(spec, CountingFn(fail_after=4), tok, **kw)
    fn = CountingFn()
    r = evaluate_task(spec, fn, tok, **kw)
    assert fn.calls == 6 and r.metrics["ppl"] == pytest.approx(ref.metrics["ppl"])
    limited = evaluate_task(spec, CountingFn(), tok, data_dir=tmp_path, limit=3)
    assert limited.n == 3 and limited.limit == 3 and limited.details["tokens"] == 45


def test_result_json_round_trip_with_non_finite_values():
    r = TaskResult("w", "ppl", {"ppl": float("inf"), "acc": float("nan")}, {"ppl": None, "acc": 0.1}, 3, None,
                   {"seqlen": 2048, "nll": float("inf")})
    text = json.dumps(r.to_json(), allow_nan=False)  # strict JSON
    back = TaskResult.from_json(json.loads(text))
    assert back.metrics["ppl"] == float("inf") and math.isnan(back.metrics["acc"])
    assert back.stderr == {"ppl": None, "acc": 0.1} and back.n == 3 and back.limit is None
    with pytest.raises(ValueError):
        TaskResult("w", "acc", {"ppl": 1.0}, {}, 1, None)


def test_config_hash_is_stable_and_order_free():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert len(config_hash("x")) == 16 and config_hash(b"x") == config_hash("x")


def test_empty_task_file_is_a_clear_error(tmp_path):
    from splitcli.errors import SplitLLMError

    (tmp_path / "e.jsonl").write_text("\n")
    spec = task_spec_from_dict({"name": "e", "format": "cloze_jsonl", "file": "e.jsonl", "context": "{c}",
                                "continuation": "x", "metric": "acc"})
    with pytest.raises(SplitLLMError, match="holds no examples"):
        evaluate_task(spec, CountingFn(), CharTokenizer(), data_dir=tmp_path)


def test_cloze_metrics_by_hand(tmp_path):
    """Two one-token continuations under a known bigram table: ppl = exp(-mean ll), acc = greedy."""
    fn = CountingFn()
    tok = CharTokenizer()
    rows = [{"c": "ab", "x": "c"}, {"c": "ba", "x": "d"}]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = task_spec_from_dict({"name": "l", "format": "cloze_jsonl", "file": "l.jsonl", "context": "{c}",
                                "continuation": "x", "target_delimiter": "", "metric": "acc"})
    r = evaluate_task(spec, fn, tok, data_dir=tmp_path)
    logp = fn.table.log_softmax(-1)
    ids = lambda s: tok(s)["input_ids"]  # noqa: E731
    ll = [logp[ids("b")[0], ids("c")[0]].item(), logp[ids("a")[0], ids("d")[0]].item()]
    greedy = [int(logp[ids("b")[0]].argmax()) == ids("c")[0], int(logp[ids("a")[0]].argmax()) == ids("d")[0]]
    assert r.metrics["ppl"] == pytest.approx(math.exp(-sum(ll) / 2))
    assert r.metrics["acc"] == pytest.approx(sum(greedy) / 2)
    assert r.details["correct"] == {"acc": "".join("1" if g else "0" for g in greedy)}


def test_per_example_outcomes_recorded_and_rebuilt_for_old_cached_results(tmp_path, task):
    kw = dict(data_dir=tmp_path, batch_size=4, cache=ResultCache(tmp_path / "cache"), config="k")
    tok = CharTokenizer()
    r = evaluate_task(task, CountingFn(), tok, **kw)
    correct = r.details["correct"]
    assert set(correct) == {"acc", "acc_norm"} and len(correct["acc_norm"]) == 25
    assert correct["acc_norm"].count("1") / 25 == pytest.approx(r.metrics["acc_norm"])
    # A result file written before outcomes were recorded is rebuilt from the example store.
    path = next((tmp_path / "cache" / "t").rglob("limit*.json"), None) or next((tmp_path / "cache" / "t").rglob("all-*.json"))
    old = json.loads(path.read_text())
    old["details"] = {}
    path.write_text(json.dumps(old))
    fn = CountingFn()
    again = evaluate_task(task, fn, tok, **kw)
    assert fn.calls == 0 and again.details["correct"] == correct
