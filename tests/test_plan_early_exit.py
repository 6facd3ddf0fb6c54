import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitcli.cost.latency import LinkModel
from splitcli.errors import SplitLLMError
from splitcli.plan.early_exit import (
    ExitPolicy, Step, decide_step, max_tokens_under_deadline, wire_bytes_model,
)
from splitcli.plan.schema import Budgets, CodecSettings, Plan

LINK = LinkModel(bandwidth_hz=1e6, snr=100.0, eps=0.01)
POLICY = ExitPolicy(deadline_s=0.05, q_bar=6, q_bar_min=2, i_kv=1, link=LINK)
ORDER = [Step.KEEP, Step.COMPRESS, Step.DROP_KV, Step.STOP]


def wire(q_bar: int, i_kv: int, w: int) -> float:
    # 576-wide hidden state at q_bar bits plus a 300-byte KV increment when I_kv = 1.
    return 576 * q_bar / 8 + i_kv * 300


def _run(trace, compute_s=0.01):
    """Drive the policy like the runtime does: feed back I_kv, stop at STOP."""
    decisions, i_kv = [], None
    for w, rate in enumerate(trace, start=1):
        d = decide_step(POLICY, rate_bps=rate, w=w, compute_s=compute_s, wire_bytes=wire,
                        current_i_kv=i_kv)
        decisions.append(d)
        i_kv = d.i_kv
        if d.step is Step.STOP:
            break
    return decisions


def test_hand_value_keep():
    # R = W, gamma = 100: P_o = 1 - exp(-0.01), ln 0.01 / ln P_o = 0.9989 -> 1 try;
    # (432 + 300) bytes * 8 / 1e6 s + 10 ms compute = 15.856 ms.
    d = decide_step(POLICY, rate_bps=1e6, w=1, compute_s=0.01, wire_bytes=wire)
    assert d.step is Step.KEEP and (d.q_bar, d.i_kv) == (6, 1)
    assert d.latency_s == pytest.approx(0.015856, rel=1e-12)


def test_good_link_keeps_plan():
    decisions = _run([2e6, 1e6, 5e5, 3e5] * 5)
    assert len(decisions) == 20
    assert all(d.step is Step.KEEP and (d.q_bar, d.i_kv) == (6, 1) for d in decisions)
    assert all(d.latency_s <= POLICY.deadline_s for d in decisions)


def test_degrading_link_escalates_in_order():
    trace = [1e6, 3e5, 1.5e5, 1.2e5, 1e5, 8e4, 6e4, 5e4, 3e4, 2e4, 1e4]
    decisions = _run(trace)
    steps = [d.step for d in decisions]
    assert steps == [Step.KEEP] * 3 + [Step.COMPRESS] * 2 + [Step.DROP_KV] * 4 + [Step.STOP]
    ranks = [ORDER.index(s) for s in steps]
    assert ranks == sorted(ranks)
    # Compression deepens as the rate falls; every non-stop decision meets the deadline.
    assert [d.q_bar for d in decisions[3:5]] == [4, 2]
    assert all(d.latency_s <= POLICY.deadline_s for d in decisions[:-1])
    assert decisions[-1].latency_s == math.inf


@pytest.mark.parametrize("rate", [0.0, -5.0, math.nan, math.inf])
def test_dead_link_stops(rate):
    d = decide_step(POLICY, rate_bps=rate, w=3, compute_s=0.0, wire_bytes=wire)
    assert d.step is Step.STOP and "link down" in d.reason


def test_kv_stays_off_but_q_bar_recovers():
    d = decide_step(POLICY, rate_bps=2e6, w=9, compute_s=0.01, wire_bytes=wire, current_i_kv=0)
    assert d.step is Step.DROP_KV and (d.q_bar, d.i_kv) == (6, 0)
    d = decide_step(POLICY, rate_bps=5e4, w=9, compute_s=0.01, wire_bytes=wire, current_i_kv=0)
    assert d.step is Step.DROP_KV and d.i_kv == 0 and d.q_bar == 3


def test_compute_alone_over_deadline_stops():
    d = decide_step(POLICY, rate_bps=1e9 / 1e3, w=1, compute_s=0.06, wire_bytes=wire)
    assert d.step is Step.STOP


def _reference(rate, compute_s, i_kv_now):
    """Independent statement of the escalation order: first setting that meets D."""
    settings_ = [(6, i_kv_now)] + [(q, i_kv_now) for q in range(5, 1, -1)]
    if i_kv_now == 1:
        settings_ += [(q, 0) for q in range(6, 1, -1)]
    for q, i in settings_:
        if LINK.step_seconds(compute_s, wire(q, i, 1), rate) <= POLICY.deadline_s:
            return q, i
    return None


@settings(max_examples=60, deadline=None)
@given(st.floats(1e3, 1e7), st.floats(0.0, 0.06), st.sampled_from([0, 1]))
def test_matches_reference_order(rate, compute_s, i_kv_now):
    d = decide_step(POLICY, rate_bps=rate, w=1, compute_s=compute_s, wire_bytes=wire,
                    current_i_kv=i_kv_now)
    expected = _reference(rate, compute_s, i_kv_now)
    if expected is None:
        assert d.step is Step.STOP
    else:
        assert (d.q_bar, d.i_kv) == expected
        assert d.latency_s <= POLICY.deadline_s


def test_policy_from_plan_and_validation():
    plan = Plan(model_id="m", n_layers=30, split_layer=10, l_w=10, method="front", q_w1=4,
                q_w2=None, qa=16, codec=CodecSettings(q_bar=5, delta=0.5, tau=5.0, q_bar_min=3),
                group_size=64, max_tokens=64, budgets=Budgets(2**30, 0.05, deadline_s=0.2))
    policy = ExitPolicy.from_plan(plan, LINK)
    assert (policy.deadline_s, policy.q_bar, policy.q_bar_min, policy.i_kv) == (0.2, 5, 3, 1)
    assert ExitPolicy.from_plan(plan, LINK, deadline_s=0.1).deadline_s == 0.1
    no_deadline = Plan.from_dict({**plan.to_dict(), "budgets": {"memory_bytes": 2**30,
                                                               "max_accuracy_drop": 0.05}})
    with pytest.raises(SplitLLMError, match="no deadline"):
        ExitPolicy.from_plan(no_deadline, LINK)
    with pytest.raises(SplitLLMError, match="deadline"):
        ExitPolicy(0.0, 6, 2, 1, LINK)
    with pytest.raises(SplitLLMError, match="q_bar_min"):
        ExitPolicy(0.1, 3, 4, 1, LINK)
    with pytest.raises(SplitLLMError, match="I_kv"):
        decide_step(POLICY, rate_bps=1e6, w=1, compute_s=0.0, wire_bytes=wire, current_i_kv=2)


def test_max_tokens_under_deadline():
    # L_t(w) = 0.01 w: the largest w with L_t <= 0.055 is 5.
    assert max_tokens_under_deadline(10, lambda w: 0.01 * w, 0.055) == 5
    assert max_tokens_under_deadline(3, lambda w: 0.01 * w, 0.055) == 3
    assert max_tokens_under_deadline(10, lambda w: 1.0, 0.5) == 0
    assert max_tokens_under_deadline(0, lambda w: 0.0, 0.5) == 0
    with pytest.raises(SplitLLMError):
        max_tokens_under_deadline(-1, lambda w: 0.0, 0.5)


def test_wire_bytes_model_and_end_to_end():
    """Analytic SmolLM2 profile -> eq. (8) plan -> per-step wire model -> Algorithm 2."""
    from splitcli.plan.enumerate import SearchSpace, search_plans, to_plan
    from splitcli.plan.profile import CodecCost, CodecPoint, profile_from_architecture
    import dataclasses

    params = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    profile = profile_from_architecture("smollm2", 30, 576, 3, 64, params, 49152 * 576)
    profile = dataclasses.replace(profile, codec=CodecCost(0.0, 0.0, (CodecPoint(6, 0.99, 300.0, True),)))
    space = SearchSpace(split_layers=tuple(range(1, 31)), q_w=((4, None), (4, 16)), qa=(8, 16),
                        q_bar=(4, 6), tau=(0.99,), tau_is_quantile=True)
    budgets = Budgets(memory_bytes=150 * 2**20, max_accuracy_drop=0.1, deadline_s=0.05)
    result = search_plans(profile, space, budgets, 256, lambda c: 0.002 * c.split_layer)
    best = result.winner.candidate
    assert result.winner.memory.total_bytes <= budgets.memory_bytes
    plan = to_plan(best, profile, budgets, 256, delta=0.5, group_size=64, tau_is_quantile=True)
    wire_fn = wire_bytes_model(profile, plan)
    cloud_kv = (30 - plan.split_layer) * 768.0
    measured = 300.0 if plan.codec.q_bar == 6 else 576 * plan.codec.q_bar / 8
    assert wire_fn(plan.codec.q_bar, 0, 1) == measured
    assert wire_fn(plan.codec.q_bar, 1, 1) == measured + cloud_kv
    assert wire_fn(4, 0, 1) == 576 * 4 / 8  # unmeasured point: hidden * q_bar / 8
    policy = ExitPolicy.from_plan(plan, LINK)
    assert decide_step(policy, rate_bps=5e6, w=1, compute_s=0.0, wire_bytes=wire_fn).step is Step.KEEP
    assert decide_step(policy, rate_bps=0.0, w=1, compute_s=0.0, wire_bytes=wire_fn).step is Step.STOP
    with pytest.raises(SplitLLMError, match="layers"):
        wire_bytes_model(dataclasses.replace(profile, layers=profile.layers[:5]), plan)
