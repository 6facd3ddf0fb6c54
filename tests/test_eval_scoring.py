"""Log-likelihood scoring: hand-computed values, batching invariance, truncation, sharing."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitcli.errors import SplitLLMError
from splitcli.eval.metrics import mc_correct, mean_stderr
from splitcli.eval.scoring import TokenRequest, encode_pair, score_requests, score_token_requests
from splitcli.eval.toy import logits_fn_for, tiny_llama, toy_tokenizer

# Bigram "model": row a of P is p(next | current token a); logits = log P so log_softmax = log P.
P = torch.tensor(
    [
        [0.5, 0.25, 0.125, 0.125],
        [0.25, 0.25, 0.25, 0.25],
        [0.1, 0.2, 0.3, 0.4],
        [0.7, 0.1, 0.1, 0.1],
    ]
)


class BigramFn:
    def __init__(self):
        self.calls = []

    def __call__(self, ids, mask):
        self.calls.append((ids.clone(), mask.clone()))
        return P.log()[ids]  # [B, T, V]


def lp(a, b):
    return math.log(P[a, b].item())


def test_hand_computed_logliks_and_greedy():
    fn = BigramFn()
    reqs = [
        TokenRequest((0,), (0, 0)),  # 0.5 * 0.5, both argmax -> greedy
        TokenRequest((2, 3), (1,)),  # p(1|3) = 0.1, argmax of row 3 is 0 -> not greedy
        TokenRequest((1, 2), (3, 0)),  # 0.4 * 0.7; row 2 argmax 3, row 3 argmax 0 -> greedy
    ]
    out = score_token_requests(fn, reqs, max_length=16)
    assert out[0].loglik == pytest.approx(2 * lp(0, 0)) and out[0].is_greedy and out[0].n_tokens == 2
    assert out[1].loglik == pytest.approx(lp(3, 1)) and not out[1].is_greedy
    assert out[2].loglik == pytest.approx(lp(2, 3) + lp(3, 0)) and out[2].is_greedy


def test_right_padding_and_longest_first():
    fn = BigramFn()
    score_token_requests(fn, [TokenRequest((1,), (2,)), TokenRequest((0, 1, 2), (3, 0))], max_length=16, batch_size=2)
    ids, mask = fn.calls[0]
    assert ids.tolist()[0] == [0, 1, 2, 3]  # longest row first, input = (ctx + cont)[:-1]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]  # right padding


def test_left_truncation_keeps_the_last_max_length_plus_one_tokens():
    fn = BigramFn()
    out = score_token_requests(fn, [TokenRequest((3, 3, 3, 2), (1, 0))], max_length=3)
    ids, _ = fn.calls[0]
    assert ids.tolist() == [[3, 2, 1]]  # (3,3,3,2,1,0)[-4:][:-1]
    assert out[0].loglik == pytest.approx(lp(2, 1) + lp(1, 0))
    # A continuation longer than the window: only the tokens that still have a prefix are scored.
    out = score_token_requests(BigramFn(), [TokenRequest((0,), (1, 2, 3, 0))], max_length=2)
    assert out[0].n_tokens == 2 and out[0].loglik == pytest.approx(lp(2, 3) + lp(3, 0))


def test_empty_continuation_scores_zero_without_a_model_call():
    fn = BigramFn()
    out = score_token_requests(fn, [TokenRequest((1, 2), ())], max_length=8)
    assert out[0].loglik == 0.0 and out[0].is_greedy and out[0].n_tokens == 0 and fn.calls == []
    assert score_token_requests(fn, [], max_length=8) == []


def test_one_token_choices_share_the_context_row():
    fn = BigramFn()
    reqs = [TokenRequest((0, 1), (c,), group=7) for c in range(4)]
    out = score_token_requests(fn, reqs, max_length=8)
    assert len(fn.calls) == 1 and fn.calls[0][0].shape == (1, 2)
    assert [r.loglik for r in out] == pytest.approx([lp(1, c) for c in range(4)])


def test_prefix_sharing_within_a_group_only():
    fn = BigramFn()
    reqs = [TokenRequest((0,), (1, 2), group=1), TokenRequest((0,), (1, 2, 3), group=1)]
    out = score_token_requests(fn, reqs, max_length=8)
    assert sum(c[0].shape[0] for c in fn.calls) == 1  # (0,1) is a prefix of (0,1,2)
    assert out[0].loglik == pytest.approx(lp(0, 1) + lp(1, 2))
    assert out[1].loglik == pytest.approx(lp(0, 1) + lp(1, 2) + lp(2, 3))
    fn = BigramFn()
    score_token_requests(fn, [TokenRequest((0,), (1, 2), 1), TokenRequest((0,), (1, 2, 3), 2)], max_length=8)
    assert sum(c[0].shape[0] for c in fn.calls) == 2


def test_nan_and_bad_shape_are_user_errors():
    with pytest.raises(SplitLLMError, match="NaN"):
        score_token_requests(lambda i, m: torch.full((*i.shape, 4), float("nan")), [TokenRequest((0,), (1,))], max_length=4)
    with pytest.raises(SplitLLMError, match="expected logits of shape"):
        score_token_requests(lambda i, m: torch.zeros(4), [TokenRequest((0,), (1,))], max_length=4)


def test_minus_inf_logits_are_legal():
    def fn(ids, mask):
        out = torch.zeros((*ids.shape, 4))
        out[..., 3] = float("-inf")
        return out

    out = score_token_requests(fn, [TokenRequest((0,), (1,)), TokenRequest((0,), (3,))], max_length=4)
    assert out[0].loglik == pytest.approx(math.log(1 / 3)) and out[1].loglik == float("-inf")


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(st.integers(0, 3), min_size=1, max_size=6), st.lists(st.integers(0, 3), min_size=0, max_size=4)),
        min_size=1,
        max_size=8,
    ),
    st.integers(1, 5),
    st.integers(2, 8),
)
def test_batching_never_changes_scores(pairs, batch_size, max_length):
    reqs = [TokenRequest(tuple(c), tuple(x), group=i % 2) for i, (c, x) in enumerate(pairs)]
    ref = [score_token_requests(BigramFn(), [r], max_length=max_length, batch_size=1)[0] for r in reqs]
    got = score_token_requests(BigramFn(), reqs, max_length=max_length, batch_size=batch_size, max_batch_tokens=7)
    assert [g.loglik for g in got] == pytest.approx([r.loglik for r in ref])
    assert [g.is_greedy for g in got] == [r.is_greedy for r in ref]


# ---- tiny real model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    tok = toy_tokenizer()
    model = tiny_llama(len(tok))
    return tok, model, logits_fn_for(model)


def manual_loglik(model, tok, context, continuation):
    """Reference: one unpadded forward of the whole text, no batching, no sharing."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def test_tiny_llama_batched_matches_unbatched_and_manual(toy):
    tok, model, fn = toy
    reqs = [
        ("Question: What is the capital of France?\nAnswer:", " Paris", 0),
        ("Question: What is the capital of France?\nAnswer:", " the lazy dog", 0),
        ("The quick brown fox", " jumps over the lazy dog.", 1),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the harder cases.", 2),
        ("A man is", " sitting", 3),
        ("A man is", " sitting on a roof.", 3),
    ]
    batched = score_requests(fn, tok, reqs, max_length=64, batch_size=4)
    single = [score_requests(fn, tok, [r], max_length=64, batch_size=1)[0] for r in reqs]
    manual = [manual_loglik(model, tok, c, x) for c, x, _ in reqs]
    assert [b.loglik for b in batched] == pytest.approx([s.loglik for s in single], abs=1e-4)
    assert [b.loglik for b in batched] == pytest.approx(manual, abs=1e-4)
    assert all(b.loglik < 0 for b in batched)


def test_encode_pair_moves_trailing_space_and_handles_empty_context(toy):
    tok = toy[0]
    ctx, cont = encode_pair(tok, "The quick ", "brown")
    assert ctx == tok("The quick", add_special_tokens=False)["input_ids"]
    assert ctx + cont == tok("The quick brown", add_special_tokens=False)["input_ids"]
    ctx, cont = encode_pair(tok, "", "The fox")
    assert ctx == [tok.bos_token_id] and cont == tok("The fox", add_special_tokens=False)["input_ids"]


# ---- metrics --------------------------------------------------------------------------------


def test_acc_and_acc_norm_differ_where_length_matters():
    # Long choice has the higher total but the lower per-character log-likelihood.
    assert mc_correct([-6.0, -4.0], ["a much longer answer", "no"], gold=0) == (False, True)
    assert mc_correct([-6.0, -4.0], ["a much longer answer", "no"], gold=1) == (True, False)
    # Equal lengths: the two agree.
    assert mc_correct([-1.0, -2.0], ["ab", "cd"], gold=0) == (True, True)
    # Ties go to the first choice; empty choice text must not divide by zero.
    assert mc_correct([-1.0, -1.0], ["x", "y"], gold=0) == (True, True)
    assert mc_correct([-1.0, -3.0], ["", "abc"], gold=0) == (True, True)


def test_mean_stderr_matches_the_binomial_formula():
    x = [1.0] * 30 + [0.0] * 70
    p = 0.3
    assert mean_stderr(x) == pytest.approx(math.sqrt(p * (1 - p) / (len(x) - 1)))
    assert mean_stderr([1.0]) is None and mean_stderr([]) is None
    assert mean_stderr([1.0, 1.0, 1.0]) == 0.0
    big = [0.0, 1.0] * 50_000  # huge n: stays finite and tiny
    assert mean_stderr(big) == pytest.approx(math.sqrt(0.25 / (len(big) - 1)))
