import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitcli.cost.memory import edge_memory
from splitcli.errors import SplitLLMError
from splitcli.plan.enumerate import Candidate, SearchSpace, psi, search_plans, to_plan
from splitcli.plan.profile import (
    CodecCost, CodecPoint, DeviceInfo, LayerCost, Profile, StageCost,
)
from splitcli.plan.schema import Budgets, Plan

L = 4


def _profile(weights=(100, 110, 120, 130), codec=True) -> Profile:
    layers = tuple(
        LayerCost(prefill_ms={1: 1.0}, decode_ms=1.0, weight_bytes={4: w, 16: 4 * w},
                  kv_bytes_per_token={8: 2.0, 16: 4.0}, activation_peak_bytes=10.0 * (k + 1))
        for k, w in enumerate(weights)
    )
    points = (CodecPoint(4, 5.0, 40.0), CodecPoint(4, 9.0, 35.0), CodecPoint(6, 5.0, 55.0))
    return Profile("toy", 64, 1, 8, DeviceInfo("toy"), layers, StageCost(50, weight_bytes_by_bits={8: 20}), StageCost(50),
                   CodecCost(0.0, 0.0, points) if codec else None)


SPACE = SearchSpace(split_layers=(1, 2, 3, 4), q_w=((4, 16), (4, None), (16, 16)), qa=(8, 16),
                    q_bar=(4, 6, 8), tau=(5.0, 9.0), l_w=(0, 1, 2, 4), methods=("front", "back"))


def _memory(profile, cand, w_bar):
    return edge_memory(profile.weight_table(), cand.split_layer, cand.l_w, cand.q_w1, cand.q_w2,
                       profile.kv_bytes_per_token(cand.qa), w_bar, profile.activation_peaks(),
                       cand.method, profile.embedding.weight_bytes_at(8)).total_bytes


def _brute_force(profile, space, budget, max_drop, w_bar, accuracy):
    """Independent re-statement of eq. (8) and the tie-breaks, over every candidate."""
    wire = {(4, 5.0): 40.0, (4, 9.0): 35.0, (6, 5.0): 55.0}
    feasible = []
    for cand in space.candidates(profile.n_layers):
        if cand.method == "front":
            bits = [cand.q_w1 if k < cand.l_w else cand.q_w2 for k in range(cand.split_layer)]
        else:
            bits = [cand.q_w1 if k >= L - cand.l_w else cand.q_w2 for k in range(cand.split_layer)]
        if None in bits:
            continue
        memory = _memory(profile, cand, w_bar)
        if memory > budget or not accuracy(cand) <= max_drop:
            continue
        score = cand.split_layer * cand.qa + (L - cand.split_layer) * cand.q_bar
        wire_bytes = wire.get((cand.q_bar, cand.tau), 64 * cand.q_bar / 8)
        feasible.append(((-score, -cand.split_layer, wire_bytes, memory), cand))
    if not feasible:
        return None
    best = min(key for key, _ in feasible)
    return {cand for key, cand in feasible if key == best}


def _accuracy(cand: Candidate) -> float:
    # A made-up but structured drop: more low-bit layers and fewer bits hurt.
    low_layers = cand.l_w if cand.q_w1 < 16 else 0
    return 0.01 * low_layers + 0.2 / cand.qa + 0.1 / cand.q_bar + (0.001 if cand.tau == 9.0 else 0)


def _accuracy_low_bits(cand: Candidate) -> float:
    # Rejects 16-bit KV and 6-bit wire, so Psi ties across l (qa = q_bar = 8) decide the winner.
    return 1.0 if cand.qa == 16 or cand.q_bar == 6 else _accuracy(cand)


def test_psi_hand_value():
    assert psi(10, 30, 16, 4) == 10 * 16 + 20 * 4
    assert psi(30, 30, 8, 4) == 240


@pytest.mark.parametrize("budget", [300, 450, 600, 800, 1200, 5000])
@pytest.mark.parametrize("max_drop", [0.03, 0.06, 0.1, 1.0])
@pytest.mark.parametrize("accuracy", [_accuracy, _accuracy_low_bits])
def test_matches_brute_force(budget, max_drop, accuracy):
    profile = _profile()
    result = search_plans(profile, SPACE, Budgets(budget, max_drop), 8, accuracy)
    expected = _brute_force(profile, SPACE, budget, max_drop, 8, accuracy)
    if expected is None:
        assert result.winner is None
    else:
        assert result.winner is not None and result.winner.candidate in expected


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 400), min_size=L, max_size=L), st.integers(50, 4000),
       st.floats(0.0, 0.2), st.integers(1, 64))
def test_matches_brute_force_property(weights, budget, max_drop, w_bar):
    profile = _profile(tuple(weights))
    result = search_plans(profile, SPACE, Budgets(budget, max_drop), w_bar, _accuracy)
    expected = _brute_force(profile, SPACE, budget, max_drop, w_bar, _accuracy)
    if expected is None:
        assert result.winner is None
        # The reported minimum budget must make the brute force feasible, and one byte less not.
        if result.min_memory_bytes is not None:
            assert _brute_force(profile, SPACE, result.min_memory_bytes, max_drop, w_bar, _accuracy)
            assert _brute_force(profile, SPACE, result.min_memory_bytes - 1, max_drop, w_bar,
                                _accuracy) is None
    else:
        assert result.winner.candidate in expected
        assert result.min_memory_bytes is None


def test_reasons_and_ranking():
    profile = _profile()
    result = search_plans(profile, SPACE, Budgets(600, 0.06), 8, _accuracy, evaluate_all=True)
    statuses = [r.status for r in result.ranked]
    assert statuses[0] == "chosen"
    # chosen, then lost, then rejected: the order is grouped.
    assert statuses == sorted(statuses, key=["chosen", "lost", "rejected"].index)
    reasons = {r.reason.split(":")[0].split(" (")[0] for r in result.ranked[1:]}
    assert {"memory", "accuracy", "invalid"} <= reasons
    assert any(r.reason.startswith("lower Psi") for r in result.ranked)
    for r in result.ranked:
        if r.reason.startswith("memory"):
            assert r.memory.total_bytes > 600
        if r.reason.startswith("accuracy"):
            assert r.accuracy_drop > 0.06
    total = sum(1 for _ in SPACE.candidates(L))
    assert len(result.ranked) == total


def test_lazy_accuracy_evaluates_few():
    calls = []

    def accuracy(cand):
        calls.append(cand)
        return 0.0

    result = search_plans(_profile(), SPACE, Budgets(10**9, 0.01), 8, accuracy)
    assert result.accuracy_evaluations == 1 and len(calls) == 1
    # Everything fits, nothing hurts: the whole model on the edge at the highest bits wins.
    assert result.winner.candidate.split_layer == L
    assert result.winner.candidate.qa == 16


def test_tie_breaks_edge_layers_then_wire_bytes():
    space = SearchSpace(split_layers=(1, 2), q_w=((4, 16),), qa=(8,), q_bar=(8,), tau=(5.0, 9.0))
    profile = _profile()
    # qa = q_bar: Psi = 8 L whatever l is, so the tie goes to l = 2, then to the smaller codec.
    result = search_plans(profile, space, Budgets(10**9, 1.0), 4, lambda c: 0.0, evaluate_all=True)
    assert result.winner.candidate.split_layer == 2
    # No codec point for q_bar 8: both taus cost the same 64 bytes -> falls to memory/order.
    assert result.ranked[1].reason.startswith("tie on Psi")
    space4 = SearchSpace(split_layers=(1,), q_w=((4, 16),), qa=(4,), q_bar=(4,), tau=(5.0, 9.0))
    profile4 = Profile("toy", 64, 1, 8, DeviceInfo("toy"),
                       tuple(dataclass_replace_kv(layer) for layer in profile.layers),
                       profile.embedding, profile.head, profile.codec)
    result = search_plans(profile4, space4, Budgets(10**9, 1.0), 4, lambda c: 0.0, evaluate_all=True)
    assert result.winner.candidate.tau == 9.0  # 35 bytes/token beats 40
    assert result.ranked[1].reason.startswith("same Psi and l, more wire bytes")


def dataclass_replace_kv(layer):
    return LayerCost(layer.prefill_ms, layer.decode_ms, layer.weight_bytes,
                     {**layer.kv_bytes_per_token, 4: 1.0}, layer.activation_peak_bytes)


def test_infeasible_reports_min_memory():
    profile = _profile()
    result = search_plans(profile, SPACE, Budgets(10, 0.06), 8, _accuracy)
    assert result.winner is None
    cheapest = min(_memory(profile, c, 8) for c in SPACE.candidates(L)
                   if _accuracy(c) <= 0.06 and _valid(c))
    assert result.min_memory_bytes == math.ceil(cheapest)
    result = search_plans(profile, SPACE, Budgets(10, 0.0), 8, _accuracy)
    assert result.winner is None and result.min_memory_bytes is None


def _valid(c):
    bits = ([c.q_w1 if k < c.l_w else c.q_w2 for k in range(c.split_layer)] if c.method == "front"
            else [c.q_w1 if k >= L - c.l_w else c.q_w2 for k in range(c.split_layer)])
    return None not in bits


def test_accuracy_table_and_nan():
    profile = _profile()
    space = SearchSpace(split_layers=(1, 2), q_w=((4, 16),), qa=(8,), q_bar=(4,), tau=(5.0,))
    good = Candidate(1, 1, "front", 4, 16, 8, 4, 5.0)
    result = search_plans(profile, space, Budgets(10**9, 0.1), 4, {good: 0.05})
    assert result.winner.candidate == good
    assert any(r.reason == "accuracy: not measured" for r in result.ranked)
    result = search_plans(profile, space, Budgets(10**9, 0.1), 4, lambda c: math.nan)
    assert result.winner is None and result.min_memory_bytes is None


def test_missing_kv_bits_is_invalid_not_crash():
    space = SearchSpace(split_layers=(1,), q_w=((4, 16),), qa=(3,), q_bar=(4,), tau=(5.0,))
    result = search_plans(_profile(), space, Budgets(10**9, 1.0), 4, lambda c: 0.0)
    assert result.winner is None
    assert result.ranked[0].reason.startswith("invalid") and "Qa=3" in result.ranked[0].reason


def test_errors_and_to_plan(tmp_path):
    with pytest.raises(SplitLLMError, match="max_tokens"):
        search_plans(_profile(), SPACE, Budgets(100, 0.1), 0, _accuracy)
    with pytest.raises(SplitLLMError, match="empty"):
        SearchSpace(split_layers=(), q_w=((4, 16),), qa=(8,), q_bar=(4,), tau=(5.0,))
    result = search_plans(_profile(), SPACE, Budgets(800, 0.06), 8, _accuracy)
    plan = to_plan(result.winner.candidate, _profile(), Budgets(800, 0.06), 8, delta=0.5,
                   group_size=64, tau_is_quantile=False)
    plan.save(tmp_path / "plan.yaml")
    again = Plan.load(tmp_path / "plan.yaml")
    assert again == plan and again.split_layer == result.winner.candidate.split_layer
    assert again.codec.tau == result.winner.candidate.tau


def test_space_enumerates_product():
    cands = list(SPACE.candidates(L))
    assert len(cands) == 4 * 2 * 3 * 2 * 3 * 2 * 4
    assert len(set(cands)) == len(cands)
    only_l = SearchSpace(split_layers=(2, 3), q_w=((4, 16),), qa=(8,), q_bar=(4,), tau=(5.0,))
    assert [c.l_w for c in only_l.candidates(L)] == [2, 3]
    assert list(itertools.islice(only_l.candidates(L), 1))[0] == Candidate(2, 2, "front", 4, 16, 8, 4, 5.0)
