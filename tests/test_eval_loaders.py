"""Loaders for every format in the shared data directory, and their preprocessing."""

import dataclasses
import json
import os
from pathlib import Path

import pytest

from splitcli.errors import SplitLLMError
from splitcli.eval.loaders import ClozeExample, MCExample, hellaswag_example, hellaswag_preprocess, load_examples, load_text
from splitcli.eval.spec import get_task_spec, task_spec_from_dict


def _shared_data() -> Path | None:
    for cand in (os.environ.get("SPLITLLM_DATA"), Path(__file__).resolve().parents[1] / ".." / "shared" / "data", "/work/shared/data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


DATA = _shared_data()
needs_data = pytest.mark.skipif(DATA is None, reason="shared evaluation data not present")

COUNTS = {"hellaswag": 1000, "piqa": 1838, "arc_easy": 2376, "boolq": 3270, "winogrande": 1267, "lambada": 5153}


@needs_data
@pytest.mark.parametrize("task,count", sorted(COUNTS.items()))
def test_counts_match_the_readme(task, count):
    examples = load_examples(get_task_spec(task), DATA)
    assert len(examples) == count
    assert len(load_examples(get_task_spec(task), DATA, limit=3)) == 3


@needs_data
def test_arc_first_row():
    ex = load_examples(get_task_spec("arc_easy"), DATA, limit=1)[0]
    q = "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    assert ex.contexts == (q,) * 4 and ex.gold == 0
    assert ex.continuations[0] == " Sunlight is the source of energy for nearly all ecosystems."
    assert ex.choice_texts[3] == "The producers in all ecosystems are plants."


@needs_data
def test_piqa_uses_the_labels_file():
    ex = load_examples(get_task_spec("piqa"), DATA, limit=5)
    assert ex[0].contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert [e.gold for e in ex] == [0, 1, 1, 1, 0]  # first lines of valid-labels.lst
    assert ex[1].continuations == (" replace drawer with bobby pin ", " finish, woodgrain with  bobby pin ")


@needs_data
def test_boolq_becomes_the_harness_prompt():
    ex = load_examples(get_task_spec("boolq"), DATA, limit=1)[0]
    assert ex.contexts[0].startswith("All biomass goes through")  # "Passage: " removed
    assert ex.contexts[0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert ex.continuations == (" no", " yes") and ex.gold == 0


@needs_data
def test_winogrande_partial_scoring_layout():
    ex = load_examples(get_task_spec("winogrande"), DATA, limit=1)[0]
    assert ex.contexts == (
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    )
    assert ex.continuations == (" always got the easier cases.",) * 2 and ex.gold == 1


@needs_data
def test_lambada_and_hellaswag_first_rows():
    lam = load_examples(get_task_spec("lambada"), DATA, limit=1)[0]
    assert isinstance(lam, ClozeExample) and lam.continuation == " signs"
    assert lam.context.endswith("I don't care about")
    hs = load_examples(get_task_spec("hellaswag"), DATA, limit=1)[0]
    assert hs.contexts[0] == (
        "Pole vault: Pole vault is a sport where you run with a pole and stop and swing your body. A few women"
    )
    assert hs.gold == 3 and hs.continuations[2] == " are in the wading pool."


@needs_data
def test_wikitext_line_ends_normalized_by_default_or_kept_exactly():
    raw = (DATA / "wikitext2" / "wiki.test.raw").read_bytes()
    assert len(raw) == 1_290_547
    spec = get_task_spec("wikitext2")
    text = load_text(spec, DATA)
    assert "\r" not in text and text.startswith(" = Robert Boulter = \n Robert Boulter is")
    assert text == raw.decode("utf-8").replace("\r\n", "\n")
    exact = load_text(dataclasses.replace(spec, normalize_newlines=False), DATA)
    assert exact.encode("utf-8") == raw


def test_lone_carriage_returns_become_newlines(tmp_path):
    (tmp_path / "t.raw").write_bytes(b"a\r\nb\rc\n")
    spec = task_spec_from_dict({"name": "t", "format": "text_ppl", "file": "t.raw", "seqlen": 2, "metric": "ppl"})
    assert load_text(spec, tmp_path) == "a\nb\nc\n"


def test_hellaswag_preprocessing_hand_example():
    row = {
        "activity_label": "Sports and Fitness",
        "ctx_a": "[header] How to bowl [title] Grip the ball.",
        "ctx_b": "THE bowler",
        "endings": ["[title] Run up. [step] Bowl.", " spins  it ", "x", "y"],
        "label": 1,
    }
    ex = hellaswag_example(row)
    # " [title]" -> ". ", tags dropped, one pass of "  " -> " ", capitalize() lowercases the rest.
    assert ex.contexts[0] == "Sports and Fitness: How to bowl. Grip the ball. The bowler"
    # A leading "[title]" has no space before it, so it is dropped, not turned into ". ", and the
    # harness does not strip again afterwards: the leading space stays.
    assert ex.choice_texts == (" Run up. Bowl.", "spins it", "x", "y")
    assert ex.continuations[1] == " spins it" and ex.gold == 1
    assert hellaswag_preprocess("a   b") == "a  b"  # the harness collapses only once
    assert hellaswag_preprocess("") == ""


def _write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_generic_mc_errors_are_clear(tmp_path):
    _write(tmp_path, "t.jsonl", [{"q": "hi", "opts": ["a", "b"], "ans": 5}])
    spec = task_spec_from_dict({"name": "t", "format": "mc_jsonl", "file": "t.jsonl", "context": "{q}",
                                "choices": "opts", "gold": "ans", "metric": "acc"})
    with pytest.raises(SplitLLMError, match=r"t.jsonl:1: gold index 5 outside 0..1"):
        load_examples(spec, tmp_path)
    bad = task_spec_from_dict({"name": "t", "format": "mc_jsonl", "file": "t.jsonl", "context": "{question}",
                               "choices": "opts", "gold": "ans", "metric": "acc"})
    with pytest.raises(SplitLLMError, match="needs 'question'"):
        load_examples(bad, tmp_path)
    (tmp_path / "t.jsonl").write_text("{not json\n")
    with pytest.raises(SplitLLMError, match="not valid JSON"):
        load_examples(spec, tmp_path)


def test_labels_file_count_mismatch(tmp_path):
    _write(tmp_path, "t.jsonl", [{"g": "x", "s1": "a", "s2": "b"}] * 3)
    (tmp_path / "labels.lst").write_text("0\n1\n")
    spec = task_spec_from_dict({"name": "t", "format": "mc_jsonl", "file": "t.jsonl", "labels_file": "labels.lst",
                                "context": "{g}", "choices": ["s1", "s2"], "metric": "acc_norm"})
    with pytest.raises(SplitLLMError, match="2 labels for 3 rows"):
        load_examples(spec, tmp_path, limit=2)


def test_empty_file_gives_no_examples(tmp_path):
    (tmp_path / "t.jsonl").write_text("")
    spec = task_spec_from_dict({"name": "t", "format": "mc_partial_jsonl", "file": "t.jsonl", "contexts": "c",
                                "continuation": "x", "gold": "g", "metric": "acc"})
    assert load_examples(spec, tmp_path) == []


def test_mc_example_validates():
    with pytest.raises(ValueError):
        MCExample(("a",), (" b",), ("b",), 0)
    with pytest.raises(ValueError):
        MCExample(("a", "a"), (" b", " c"), ("b", "c"), 2)
