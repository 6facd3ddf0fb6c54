"""Task specs: built-ins, user YAML validation, and a generic spec end to end on a tiny model."""

import json
import math

import pytest

from splitcli.errors import SplitLLMError
from splitcli.eval import ResultCache, config_hash, evaluate_task
from splitcli.eval.spec import builtin_task_names, get_task_spec, load_task_spec
from splitcli.eval.toy import logits_fn_for, tiny_llama, toy_tokenizer


def test_all_builtins_load():
    names = builtin_task_names()
    assert names == ["arc_easy", "boolq", "hellaswag", "lambada", "piqa", "wikitext2", "winogrande"]
    headline = {n: get_task_spec(n).metric for n in names}
    assert headline == {"arc_easy": "acc_norm", "boolq": "acc", "hellaswag": "acc_norm", "lambada": "acc",
                        "piqa": "acc_norm", "wikitext2": "ppl", "winogrande": "acc"}
    assert get_task_spec("wikitext2").seqlen == 2048


def test_unknown_task_lists_builtins():
    with pytest.raises(SplitLLMError, match="built-in tasks: arc_easy"):
        get_task_spec("mmlu")


@pytest.mark.parametrize(
    "body,match",
    [
        ("- just\n- a list\n", "expected a mapping"),
        ("name: t\nformat: nope\nfile: x\nmetric: acc\n", "unknown format 'nope'"),
        ("name: t\nformat: mc_jsonl\nfile: x\ncontext: '{q}'\nchoices: c\ngold: g\nmetric: ppl\n", "metric 'ppl' not available"),
        ("name: t\nformat: mc_jsonl\nfile: x\nchoices: c\ngold: g\nmetric: acc\n", "needs 'context'"),
        ("name: t\nformat: mc_jsonl\nfile: x\ncontext: '{q}'\nchoices: c\nmetric: acc\n", "exactly one of 'gold'"),
        ("name: t\nformat: mc_jsonl\nfile: x\ncontext: '{}'\nchoices: c\ngold: g\nmetric: acc\n", "positional placeholder"),
        ("name: t\nformat: mc_jsonl\nfile: x\ncontext: '{q}'\nchoices: c\ngold: g\nmetric: acc\ncolour: red\n", "unknown key"),
        ("name: t\nformat: text_ppl\nfile: x\nmetric: ppl\nseqlen: 1\n", "seqlen must be an integer >= 2"),
        ("name: t\nformat: text_ppl\nfile: x\nmetric: ppl\nspec_version: 9\n", "spec_version 9 unsupported"),
        ("name: [t\n", "not valid YAML"),
    ],
)
def test_user_spec_validation(tmp_path, body, match):
    p = tmp_path / "spec.yaml"
    p.write_text(body)
    with pytest.raises(SplitLLMError, match=match) as e:
        load_task_spec(p)
    assert "\n" not in str(e.value)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SplitLLMError, match="not found"):
        load_task_spec(tmp_path / "none.yaml")


def test_fingerprint_tracks_content_not_source(tmp_path):
    a = get_task_spec("arc_easy")
    p = tmp_path / "arc.yaml"
    p.write_text("name: arc_easy\nformat: mc_jsonl\nfile: arc/arc_easy_test.jsonl\ncontext: \"{query}\\nAnswer:\"\n"
                 "choices: choices\ngold: gold\nmetric: acc_norm\n")
    b = load_task_spec(p)
    assert a == b and a.fingerprint() == b.fingerprint()
    p.write_text(p.read_text().replace("acc_norm", "acc"))
    assert load_task_spec(p).fingerprint() != a.fingerprint()


@pytest.fixture(scope="module")
def toy():
    tok = toy_tokenizer()
    return tok, logits_fn_for(tiny_llama(len(tok)))


def test_generic_yaml_spec_end_to_end(tmp_path, toy):
    tok, fn = toy
    rows = [
        {"question": f"What is {i} plus {i}?", "answers": ["the quick brown fox", "yes", "no"], "label": i % 3}
        for i in range(30)
    ]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec_path = tmp_path / "mine.yaml"
    spec_path.write_text(
        "name: mine\nformat: mc_jsonl\nfile: mine.jsonl\ncontext: \"Question: {question}\\nAnswer:\"\n"
        "choices: answers\ngold: label\nmetric: acc_norm\n"
    )
    seen = []
    r = evaluate_task(str(spec_path), fn, tok, data_dir=tmp_path, limit=20, chunk_size=8,
                      progress=lambda t, d, n: seen.append((t, d, n)))
    assert r.task == "mine" and r.n == 20 and r.limit == 20 and r.metric == "acc_norm"
    assert set(r.metrics) == {"acc", "acc_norm"}
    for m in ("acc", "acc_norm"):
        assert 0.0 <= r.metrics[m] <= 1.0 and r.metrics[m] * 20 == pytest.approx(round(r.metrics[m] * 20))
        p = r.metrics[m]
        assert r.stderr[m] == pytest.approx(math.sqrt(p * (1 - p) / 19))
    assert seen[0] == ("mine", 0, 20) and seen[-1] == ("mine", 20, 20)
    assert [d for _, d, _ in seen] == sorted(d for _, d, _ in seen)
    assert 8 in [d for _, d, _ in seen] and len(seen) > 4  # chunk boundaries and per-batch updates
    # A cache hit returns the same numbers without calling the model.
    cache = ResultCache(tmp_path / "cache")
    key = config_hash({"model": "toy"})
    first = evaluate_task(str(spec_path), fn, tok, data_dir=tmp_path, limit=20, cache=cache, config=key)
    assert first.metrics == r.metrics

    def boom(ids, mask):
        raise AssertionError("model called despite a cached result")

    again = evaluate_task(str(spec_path), boom, tok, data_dir=tmp_path, limit=20, cache=cache, config=key)
    assert again == first
