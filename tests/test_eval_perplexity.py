"""Windowed perplexity (GPTQ convention) on hand-made token streams."""

import math

import pytest
import torch
import torch.nn.functional as F

from splitcli.errors import SplitLLMError
from splitcli.eval.metrics import ppl_from_nll
from splitcli.eval.perplexity import perplexity
from splitcli.eval.toy import logits_fn_for, tiny_llama

P = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])


class BigramFn:
    def __init__(self):
        self.calls = []

    def __call__(self, ids, mask):
        self.calls.append(ids.tolist())
        return P.log()[ids]


def lp(a, b):
    return math.log(P[a, b].item())


def test_windows_are_non_overlapping_and_the_remainder_is_dropped():
    fn = BigramFn()
    r = perplexity(fn, [0, 1, 2, 3, 0, 1, 2], seqlen=3)
    assert fn.calls == [[[0, 1, 2]], [[3, 0, 1]]]  # token 2 at the end is dropped
    nll = -(lp(0, 1) + lp(1, 2)) - (lp(3, 0) + lp(0, 1))
    assert r.nll == pytest.approx(nll)
    assert (r.tokens, r.windows, r.seqlen, r.text_tokens) == (4, 2, 3, 7)
    assert r.ppl == pytest.approx(math.exp(nll / 4))


def test_n_windows_limit_and_batching():
    ids = [0, 1, 2, 3, 0, 1, 2, 2, 3]
    one = perplexity(BigramFn(), ids, seqlen=3, n_windows=1)
    assert one.windows == 1 and one.nll == pytest.approx(-(lp(0, 1) + lp(1, 2)))
    fn = BigramFn()
    all3 = perplexity(fn, ids, seqlen=3, n_windows=99, batch_size=2)
    assert all3.windows == 3 and len(fn.calls) == 2 and len(fn.calls[0]) == 2
    assert all3.nll == pytest.approx(perplexity(BigramFn(), ids, seqlen=3).nll)


def test_resume_reuses_done_windows():
    fn = BigramFn()
    seen = []
    r = perplexity(fn, [0, 1, 2, 3, 0, 1], seqlen=3, done_nll=[10.0], on_window=lambda i, v: seen.append(i))
    assert fn.calls == [[[3, 0, 1]]] and seen == [1]
    assert r.nll == pytest.approx(10.0 - (lp(3, 0) + lp(0, 1)))


def test_degenerate_inputs():
    with pytest.raises(SplitLLMError, match="fewer than one window"):
        perplexity(BigramFn(), [0, 1], seqlen=3)
    with pytest.raises(SplitLLMError, match="fewer than one window"):
        perplexity(BigramFn(), [], seqlen=3)
    with pytest.raises(ValueError):
        perplexity(BigramFn(), [0, 1, 2], seqlen=1)
    with pytest.raises(ValueError):
        perplexity(BigramFn(), [0, 1, 2], seqlen=3, n_windows=0)
    with pytest.raises(SplitLLMError, match="NaN"):
        perplexity(lambda i, m: torch.full((*i.shape, 4), float("nan")), [0, 1, 2], seqlen=3)
    # A constant (uniform) model has ppl = vocab size exactly.
    assert perplexity(lambda i, m: torch.zeros((*i.shape, 4)), [0, 1, 2, 3], seqlen=4).ppl == pytest.approx(4.0)
    assert ppl_from_nll(1e6, 10) == float("inf") and math.isnan(ppl_from_nll(1.0, 0))


def test_matches_the_gptq_loop_on_a_tiny_llama():
    model = tiny_llama(64, layers=2, hidden=32)
    ids = torch.randint(0, 64, (1, 100), generator=torch.Generator().manual_seed(1))
    seqlen = 16
    nsamples = ids.numel() // seqlen
    nlls = []
    with torch.no_grad():
        for i in range(nsamples):  # the reference loop of GPTQ's llama_eval
            batch = ids[:, i * seqlen : (i + 1) * seqlen]
            logits = model(batch).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, 64), batch[:, 1:].reshape(-1))
            nlls.append(loss.float() * seqlen)
    ref = torch.exp(torch.stack(nlls).sum() / (nsamples * seqlen)).item()
    r = perplexity(logits_fn_for(model), ids[0], seqlen=seqlen, batch_size=3)
    assert r.windows == 6
    assert r.ppl == pytest.approx(ref, rel=1e-4)
