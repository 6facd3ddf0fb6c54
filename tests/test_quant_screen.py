"""quant/screen: the int8-screened LM head returns the exact top k of x @ W.T — every row that can
reach the k-th largest value is computed in float, including near-ties the int8 codes cannot tell
apart — and declines (None) where the kernel leaves the input to float. The fast path uses it
for greedy steps only, with the same tokens as the float head."""

from __future__ import annotations

import copy

import pytest
import torch

from splitcli.errors import SplitLLMError
from splitcli.quant import kernels
from splitcli.quant.screen import Int8Screen

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.why_unavailable()}")]


def _check_exact(screen: Int8Screen, w: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """Asserts the screen's promise for one input; returns its logits."""
    got = screen.top(x, k, w)
    assert got is not None
    out, n = got
    kept = torch.isfinite(out)
    assert int(kept.sum()) == n >= k
    # kept rows hold a float32 product of those rows: within its rounding bound of the exact value
    exact = w.double() @ x.double()
    bound = 1.01 * w.shape[1] * 2.0**-24 * (w.double().abs() @ x.double().abs())
    assert bool(((out[kept].double() - exact[kept]).abs() <= bound[kept]).all())
    # no skipped row reaches the k-th largest kept value, even in exact arithmetic (float64)
    kth = out.topk(k).values[-1].double()
    assert bool((exact[~kept] < kth).all())
    return out


@pytest.mark.parametrize("k", [1, 3, 64])
def test_top_k_equals_the_float_products_top_k(k):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4096, 256, generator=g) * 0.05
    screen = Int8Screen(w)
    for i in range(20):
        x = torch.randn(256, generator=g) * (1 + 10 * i)
        out = _check_exact(screen, w, x, k)
        full = w @ x
        assert torch.equal(out.topk(k).indices.sort().values, full.topk(k).indices.sort().values)


def test_near_ties_below_the_int8_step_are_all_computed():
    # 512 rows within a fifth of an int8 step of each other (most of their codes are the same),
    # so the screen cannot order them; adjacent rows' products still differ by ~100 float32 ulps
    g = torch.Generator().manual_seed(1)
    base = torch.randn(128, generator=g)
    x = base + 0.1 * torch.randn(128, generator=g)  # the tied block holds the largest products
    step = base.abs().max() / 127
    eps = torch.linspace(0, 0.2, 512)[:, None] * step * torch.sign(x)[None]  # row j: x.w grows with j
    w = torch.cat([base[None] + eps, torch.randn(1000, 128, generator=g) * 0.01])
    screen = Int8Screen(w)
    out = _check_exact(screen, w, x, 1)
    assert int(out.argmax()) == int((w @ x).argmax()) == int((w.double() @ x.double()).argmax()) == 511
    assert int(torch.isfinite(out).sum()) >= 500  # it did have to compute the tied block


def test_a_zero_input_ties_every_row_and_computes_the_whole_product():
    w = torch.randn(300, 64)
    out, n = Int8Screen(w).top(torch.zeros(64), 1, w)
    assert n == 300 and torch.equal(out, w @ torch.zeros(64)) and int(out.argmax()) == 0


def test_constant_rows_and_a_one_row_weight():
    w = torch.ones(50, 64)
    x = torch.randn(64)
    out, n = Int8Screen(w).top(x, 1, w)
    assert n == 50 and torch.equal(out, w @ x)
    one = torch.randn(1, 64)
    out, n = Int8Screen(one).top(x, 1, one)
    assert n == 1 and torch.equal(out, one @ x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e31, 1e-31])
def test_inputs_the_kernel_leaves_to_float_are_declined(bad):
    w = torch.randn(100, 64)
    x = torch.randn(64)
    x[7] = bad
    if abs(bad) < 1:
        x = torch.full((64,), bad)
    assert Int8Screen(w).top(x, 1, w) is None


def test_huge_and_tiny_but_handled_inputs_stay_exact():
    w = torch.randn(2000, 128)
    screen = Int8Screen(w)
    for scale in (1e-20, 1e20):
        _check_exact(screen, w, torch.randn(128) * scale, 5)


def test_bad_weights_and_k_are_refused():
    with pytest.raises(SplitLLMError):
        Int8Screen(torch.randn(10, 60))  # not whole groups of 64
    with pytest.raises(SplitLLMError):
        Int8Screen(torch.randn(10, 64, dtype=torch.float64))
    w = torch.randn(10, 64)
    w[3, 5] = float("nan")
    with pytest.raises(SplitLLMError):
        Int8Screen(w)
    ok = torch.randn(10, 64)
    for k in (0, 11):
        with pytest.raises(SplitLLMError):
            Int8Screen(ok).top(torch.randn(64), k, ok)


def test_strided_weight_views_are_read_as_given():
    wt = torch.randn(64, 700)  # the fast path's head: a [V, K] view of [K, V] storage
    w = wt.t()
    _check_exact(Int8Screen(w), w, torch.randn(64), 2)


def test_greedy_fast_split_screens_its_head_with_the_float_heads_tokens(real_lm):
    from splitcli.deploy import SplitSpec, build_split
    from splitcli.runtime.fast import FastUnsplitSession, fast_split_session
    from splitcli.runtime.generate import SamplingConfig, encode_prompts, generate

    lm = copy.copy(real_lm)
    lm.model = copy.deepcopy(real_lm.model)  # the fast path re-lays out the weights it runs
    split = build_split(lm, SplitSpec(split_layer=15))
    ids, mask = encode_prompts(lm.tokenizer, ["The three primary colors are"])
    cfg = SamplingConfig(max_new_tokens=12)
    session = fast_split_session(split)
    head = session.cloud.head
    assert head.screen is None  # built only once SCREEN_AFTER_STEPS greedy steps asked for it
    assert head.build_screen() is head.screen is not None
    before = head.screened[0]
    screened = generate(session, ids, mask, cfg).tokens
    assert head.screened[0] - before == 12  # prefill + 11 decode steps, each decided by the screen
    # the same steps with every logit computed
    full = fast_split_session(split)
    logits = full.prefill(ids, mask)[:, -1]
    tokens = []
    for _ in range(12):
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        logits = full.forward(nxt[:, None])[:, -1]
        assert bool(torch.isfinite(logits).all())
    assert torch.equal(screened, torch.stack(tokens, 1))
    # split and unsplit still agree bit for bit with the screen on
    unsplit = FastUnsplitSession(lm.model)
    unsplit.model.head.build_screen()
    a = fast_split_session(split).prefill(ids, mask, top=1)
    b = unsplit.prefill(ids, mask, top=1)
    assert torch.equal(a, b) and int(torch.isfinite(a).sum()) < 100
    ref = fast_split_session(split).prefill(ids, mask)  # every logit, the float head
    kept = torch.isfinite(a)
    assert int(a.argmax()) == int(ref.argmax()) and torch.allclose(a[kept], ref[kept], rtol=0, atol=1e-4)


def test_the_head_builds_its_screen_in_the_background_after_enough_greedy_steps(monkeypatch):
    import time

    from conftest import _tiny
    from splitcli.model.fast import _Head
    from splitcli.runtime.fast import FastUnsplitSession

    monkeypatch.setattr(_Head, "SCREEN_AFTER_STEPS", 3)
    session = FastUnsplitSession(_tiny("llama"))
    head = session.model.head
    session.prefill(torch.tensor([[1, 2, 3]]))  # every logit asked for: no count, no screen
    session.forward(torch.tensor([[4]]), top=1)
    session.forward(torch.tensor([[5]]), top=1)
    assert head.screen is None and head.screened[0] == 0
    full = session.forward(torch.tensor([[6]]), top=1)  # the third: starts the build, still on the float head
    assert bool(torch.isfinite(full).all())
    deadline = time.monotonic() + 30
    while head.screen is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert head.screen is not None
    logits = session.forward(torch.tensor([[7]]), top=1)
    assert head.screened[0] == 1 and int(torch.isfinite(logits).sum()) == head.screened[1] >= 1


def test_the_bound_coefficients_cover_each_term():
    # a_j >= E_j + reference rounding, b_j >= 0.51 ||w_hat_j||_1, m_j >= 2.02 K u max|w_j| (module
    # docstring): a screen with any term left out fails here
    g = torch.Generator().manual_seed(4)
    w = torch.randn(500, 192, generator=g) * torch.logspace(-3, 1, 500)[:, None]
    screen = Int8Screen(w)
    w_hat = screen.codes.double() * screen.scales.double()[:, None]
    e = (w.double() - w_hat).abs().amax(-1)
    u, k = 2.0**-24, w.shape[1]
    assert bool((screen.a.double() >= e + 1.01 * k * u * w.double().abs().amax(-1)).all())
    assert bool((screen.b.double() >= 0.51 * w_hat.abs().sum(-1)).all())
    assert bool((screen.m.double() >= 2.02 * k * u * w.double().abs().amax(-1)).all())


def test_rows_decided_by_the_inputs_int16_rounding_are_computed():
    # (review 12) weights on the int8 grid, so E = 0; x has one large entry and small ones that the
    # kernel's int16 rounds to 0 (row 0: ten of 0.49 steps) or to 1 (row 1: one of 0.51 steps):
    # row 0's value (4.9 steps) beats row 1's (0.51) while its int8 product is 0 < row 1's
    x = torch.zeros(64)
    x[0] = 1.0
    x[1:11] = 0.49 / 32767
    x[11] = 0.51 / 32767
    w = torch.zeros(16, 64)
    w[0, 1:11] = 127 / 128
    w[1, 11] = 127 / 128
    w[2:, 0] = -127 / 128
    out, _ = Int8Screen(w).top(x, 1, w)
    assert int(out.argmax()) == int((w @ x).argmax()) == 0


def test_subnormal_products_keep_the_float_heads_argmax():
    # (review 12) logits in float32's subnormal range: the relative bounds underflow to 0 and the
    # roundings to the subnormal grid decide; the absolute slack keeps every contender
    x16 = torch.full((64,), 32767.0)
    x16[5] = 20796.0
    x = (x16 * 2.0**-38).float()
    w = torch.zeros(16, 64)
    w[0, 5] = 127 * 2.0**-127  # 40.3 subnormal steps
    w[1, :] = 66 * 2.0**-133  # 63 products of ~0.5 steps: 63 steps in float32's sum
    w[1, 0] = 127 * 2.0**-133
    out, _ = Int8Screen(w).top(x, 1, w)
    full = w @ x
    assert int(out.argmax()) == int(full.argmax()) and bool(torch.isfinite(out[:2]).all())


def test_inputs_whose_products_could_overflow_are_declined_and_unfit_weights_refused():
    w = torch.randn(64, 64)
    w[3] *= 1e25  # max|W| ~ 2^85
    assert Int8Screen(w).top(torch.randn(64) * 1e10, 1, w) is None  # ||x||_1 max|W| past 2^100
    assert Int8Screen(w).top(torch.randn(64), 1, w) is not None
    huge = torch.full((8, 64), 3e38)
    with pytest.raises(SplitLLMError):  # its error bounds overflow float32
        Int8Screen(huge)


def test_a_head_written_in_place_drops_its_stale_screen():
    from conftest import _tiny
    from splitcli.runtime.fast import FastUnsplitSession

    model = _tiny("llama")
    head = FastUnsplitSession(model).model.head
    assert head.build_screen() is not None
    hidden = torch.randn(1, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    before = int(head(hidden, 1, top=1).argmax())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"][5] = 3 * state["lm_head.weight"][before]  # row 5 becomes the largest
    model.load_state_dict(state)  # copies into the head's weight in place
    screened = head(hidden, 1, top=1)
    assert head.screen is None and int(screened.argmax()) == int(head(hidden, 1).argmax()) == 5


@pytest.mark.parametrize("v", [1, 7, 8, 1000, 49152])
def test_the_screens_c_passes_are_the_torch_formulas(v):
    # abs_stats, argmax and screen_keep (kernels.c) against the torch ops they replace, tails and
    # ties included: the same rows kept, in ascending order, and every screened value set to -inf
    g = torch.Generator().manual_seed(v)
    x = torch.randn(576, generator=g)
    l1, amax = kernels.abs_stats(x)
    assert l1 == pytest.approx(float(x.abs().double().sum()), rel=2**-23) and amax == float(x.abs().max())
    s = torch.round(torch.randn(v, generator=g) * 4) / 4  # coarse values: many ties
    assert kernels.argmax(s) == int(s.argmax())
    a, b = torch.rand(v, generator=g) * 1e-3, torch.rand(v, generator=g) * 1e-2
    r, m = torch.randn(3, generator=g), torch.rand(3, generator=g) * 1e-3
    slack, tiny, c = 1 + 2.0**-4, 1e-35, amax / 32767
    l1t = torch.tensor(l1)
    e = (a * l1t).add_(b, alpha=c).mul_(slack).add_(tiny)
    threshold = (r - m * l1t * slack - tiny).min()
    want = (s + e >= threshold).nonzero().squeeze(1)
    got = kernels.screen_keep(s, a, b, l1, c, slack, tiny, r, m)
    assert torch.equal(got, want) and bool((s == float("-inf")).all())
    # a threshold that is not finite (as torch's min: a NaN anywhere, -inf, or +inf everywhere): nothing written
    for bad in ([0.0, float("nan")], [float("nan"), 0.0], [0.0, float("-inf")], [float("inf")] * 2):
        s2 = torch.randn(v, generator=g)
        before = s2.clone()
        assert not bool(torch.isfinite((torch.tensor(bad) - m[:2] * l1t * slack - tiny).min()))
        assert kernels.screen_keep(s2, a, b, l1, c, slack, tiny, torch.tensor(bad), m[:2]) is None
        assert torch.equal(s2, before)
