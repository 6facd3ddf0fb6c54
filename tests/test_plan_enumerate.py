import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitcli.cost.memory import edge_memory, layer_weight_bits
from splitcli.errors import SplitLLMError
from splitcli.plan.enumerate import Candidate, SearchSpace, psi, search_plans, to_plan
from splitcli.plan.profile import (
    CodecCost, CodecPoint, DeviceInfo, LayerCost, Profile, StageCost, profile_from_architecture,
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
    # Eq. (8c) over the edge's layers, plus every layer beyond l the edge shard still keeps.
    bits = layer_weight_bits(L, cand.l_w, cand.q_w1, cand.q_w2, cand.method)
    beyond = sum(profile.layers[k].weight_bytes[bits[k]] for k in range(cand.split_layer, L) if bits[k] is not None)
    return beyond + edge_memory(profile.weight_table(), cand.split_layer, cand.l_w, cand.q_w1, cand.q_w2,
                                profile.kv_bytes_per_token(cand.qa), w_bar, profile.activation_peaks(),
                                cand.method, profile.embedding.weight_bytes_at(8)).total_bytes


def _brute_force(profile, space, budget, max_drop, w_bar, accuracy, latency=None, deadline=None):
    """Independent re-statement of eq. (8) and the tie-breaks, over every candidate: Psi, then
    edge layers, then the accuracy drop, the latency, wire bytes and memory."""
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
        seconds = latency(cand) if latency else 0.0
        if memory > budget or not accuracy(cand) <= max_drop:
            continue
        if deadline is not None and seconds > deadline:
            continue
        score = cand.split_layer * cand.qa + (L - cand.split_layer) * cand.q_bar
        wire_bytes = wire.get((cand.q_bar, cand.tau), 64 * cand.q_bar / 8)
        feasible.append(((-score, -cand.split_layer, accuracy(cand), seconds, wire_bytes, memory), cand))
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


def test_lazy_accuracy_evaluates_only_the_best_tie_group():
    calls = []

    def accuracy(cand):
        calls.append(cand)
        return 0.0

    result = search_plans(_profile(), SPACE, Budgets(10**9, 0.01), 8, accuracy)
    # Everything fits, nothing hurts: the whole model on the edge at the highest bits wins.
    best = result.winner
    assert best.candidate.split_layer == L and best.candidate.qa == 16
    # Accuracy decides among ties on (Psi, l), so the whole best group is measured, nothing else.
    group = [c for c in SPACE.candidates(L) if _valid(c)
             and psi(c.split_layer, L, c.qa, c.q_bar) == best.psi and c.split_layer == L]
    assert sorted(calls, key=Candidate.sort_key) == sorted(group, key=Candidate.sort_key)
    assert result.accuracy_evaluations == len(group) < sum(1 for _ in SPACE.candidates(L)) / 10


def test_tie_breaks_edge_layers_then_wire_bytes():
    space = SearchSpace(split_layers=(1, 2), q_w=((4, 16),), qa=(8,), q_bar=(8,), tau=(5.0, 9.0))
    profile = _profile()
    # qa = q_bar: Psi = 8 L whatever l is, so the tie goes to l = 2, then to the smaller codec.
    result = search_plans(profile, space, Budgets(10**9, 1.0), 4, lambda c: 0.0, evaluate_all=True)
    assert result.winner.candidate.split_layer == 2
    # No codec point for q_bar 8: both taus cost the same 64 bytes and the same memory, so
    # nothing but enumeration order separates them.
    assert result.ranked[1].reason == "tie on every rule; lost on enumeration order"
    assert result.runner_up == result.ranked[1] and result.decided_by is None
    space4 = SearchSpace(split_layers=(1,), q_w=((4, 16),), qa=(4,), q_bar=(4,), tau=(5.0, 9.0))
    profile4 = Profile("toy", 64, 1, 8, DeviceInfo("toy"),
                       tuple(dataclass_replace_kv(layer) for layer in profile.layers),
                       profile.embedding, profile.head, profile.codec)
    result = search_plans(profile4, space4, Budgets(10**9, 1.0), 4, lambda c: 0.0, evaluate_all=True)
    assert result.winner.candidate.tau == 9.0  # 35 bytes/token beats 40
    assert result.ranked[1].reason == "same Psi, l, accuracy and latency, more wire bytes/token (40 > 35)"
    assert result.decided_by == "fewer wire bytes"


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


# --- what a user would pick among ties on Psi and l (issue 12, item 4) ----------------------------

# One (Psi, l) tie group: l = 2, Qa 8, q_bar 4 at one tau; only the edge's weight bits differ.
TIE_SPACE = SearchSpace(split_layers=(2,), q_w=((4, None), (16, None), (4, 16)), qa=(8,), q_bar=(4,),
                        tau=(5.0,), l_w=(1, 2))


def _bits_latency(per_bit):
    """A latency model: seconds per edge layer by its weight bits (like a profile's decode_ms_by_bits)."""
    return lambda c: sum(per_bit[b] for b in c.edge_bits(L))


def test_tie_break_smaller_accuracy_drop_beats_memory():
    # Old behaviour: the least memory (all 4-bit) won the tie although it loses accuracy.
    drops = {(4, 4): 0.004, (4, 16): 0.001, (16, 16): 0.0}
    result = search_plans(_profile(), TIE_SPACE, Budgets(10**9, 0.01), 8, lambda c: drops[c.edge_bits(L)])
    assert result.winner.candidate.edge_bits(L) == (16, 16)
    assert result.decided_by == "smaller accuracy drop"
    assert result.runner_up.candidate.edge_bits(L) == (4, 16)
    assert result.winner.reason == "chosen over the runner-up by: same Psi and l, smaller accuracy drop (0% < 0.1%)"
    # Every member of the tie group was measured and lost with its own reason.
    reasons = {r.candidate.edge_bits(L): r.reason for r in result.ranked if r.status == "lost"}
    assert reasons[(4, 4)] == "same Psi and l, larger accuracy drop (0.4% > 0%)"


def test_tie_break_accuracy_comes_before_latency():
    drops = {(4, 4): 0.004, (4, 16): 0.001, (16, 16): 0.0}
    # Full precision is the slowest here, yet the smaller drop still wins.
    slow_fp = _bits_latency({4: 0.001, 16: 0.010})
    result = search_plans(_profile(), TIE_SPACE, Budgets(10**9, 0.01), 8, lambda c: drops[c.edge_bits(L)],
                          latency=slow_fp)
    assert result.winner.candidate.edge_bits(L) == (16, 16)
    assert result.decided_by == "smaller accuracy drop"


def test_tie_break_lower_latency_beats_memory():
    # Equal drops: the faster edge wins even though it needs more memory.
    fast_fp = _bits_latency({4: 0.030, 16: 0.005})
    result = search_plans(_profile(), TIE_SPACE, Budgets(10**9, 0.01), 8, lambda c: 0.001, latency=fast_fp)
    assert result.winner.candidate.edge_bits(L) == (16, 16)
    assert result.decided_by == "lower predicted latency"
    assert result.winner.latency_s == pytest.approx(0.010)
    assert "(10.0 ms < 35.0 ms per token)" in result.winner.reason
    mixed = next(r for r in result.ranked if r.candidate.edge_bits(L) == (4, 16))
    assert mixed.reason.startswith("same Psi, l and accuracy, higher predicted latency (35.0 ms > 10.0 ms")


def test_tie_break_memory_only_last():
    # Equal drops, equal latency, equal wire bytes: only then does the smaller edge win.
    result = search_plans(_profile(), TIE_SPACE, Budgets(10**9, 0.01), 8, lambda c: 0.001,
                          latency=lambda c: 0.02)
    assert result.winner.candidate.edge_bits(L) == (4, 4)
    assert result.decided_by == "less edge memory"
    assert result.winner.reason.startswith("chosen over the runner-up by: same Psi, l, accuracy, latency and "
                                           "wire bytes, less edge memory")


def test_same_configuration_spellings_are_not_the_runner_up():
    # (4, 16) with l_w = 0 and (16, None) put the same float weights on the edge.
    space = SearchSpace(split_layers=(2,), q_w=((16, None), (4, 16), (4, None)), qa=(8,), q_bar=(4,),
                        tau=(5.0,), l_w=(0, 2))
    drops = {(4, 4): 0.004, (16, 16): 0.0}
    result = search_plans(_profile(), space, Budgets(10**9, 0.01), 8, lambda c: drops[c.edge_bits(L)])
    assert result.winner.candidate.edge_bits(L) == (16, 16)
    assert result.runner_up.candidate.edge_bits(L) == (4, 4)
    twin = next(r for r in result.ranked if r.status == "lost" and r.candidate.edge_bits(L) == (16, 16))
    assert twin.reason.startswith("same edge configuration as the chosen plan")


def _smollm_like_profile():
    """SmolLM2-135M's shape with per-bit decode times like those measured here (full precision
    runs fastest on this CPU's fp32 path); no model needed."""
    params = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    base = profile_from_architecture("smollm2-135m", 30, 576, 3, 64, params, 49152 * 576,
                                     weight_bits=(4, 8, 16), kv_bits=(4, 8, 16))
    layers = tuple(LayerCost(layer.prefill_ms, 5.0, layer.weight_bytes, layer.kv_bytes_per_token, 6e6,
                             decode_ms_by_bits={4: 9.0, 8: 12.0, 16: 5.0}) for layer in base.layers)
    return Profile(base.model_id, 576, 3, 64, base.device, layers, base.embedding, base.head)


def _proxy_like_drop(c: Candidate) -> float:
    # Perplexity proxy shape: every quantized edge layer adds a little, 4-bit far more than 8.
    per_layer = {4: 0.0004, 8: 0.00005, 16: 0.0}
    return sum(per_layer[b] for b in c.edge_bits(30)) + {4: 0.02, 8: 0.001, 16: 0.0}[c.qa]


def test_roomy_budget_keeps_full_precision_and_tight_budget_quantizes():
    from splitcli.plan.advise import canonical, default_space, latency_model

    profile = _smollm_like_profile()
    space = default_space(profile)
    latency = latency_model(profile, None, None)
    roomy = search_plans(profile, space, Budgets(16 * 10**9, 0.01), 256, _proxy_like_drop, latency=latency)
    # 16 GB holds the float edge a hundred times over: nothing is quantized.
    assert roomy.winner.candidate.split_layer == 29 and roomy.winner.candidate.qa == 16
    assert set(roomy.winner.candidate.edge_bits(30)) == {16}
    assert canonical(roomy.winner.candidate, 30).q_w1 == 16
    assert roomy.decided_by == "smaller accuracy drop"
    tight = search_plans(profile, space, Budgets(100 * 2**20, 0.01), 256, _proxy_like_drop, latency=latency)
    assert tight.winner is not None and tight.winner.memory.total_bytes <= 100 * 2**20
    assert min(tight.winner.candidate.edge_bits(30)) < 16


# --- deadline (issue 12, item 3) --------------------------------------------------------------------

def _layer_latency(c: Candidate) -> float:
    # 1 ms per edge layer, 2 ms more per layer at float weights: more edge = slower.
    return sum(0.001 + (0.002 if b >= 16 else 0.0) for b in c.edge_bits(L))


@pytest.mark.parametrize("deadline", [0.0015, 0.0025, 0.004, 0.006, 0.02])
@pytest.mark.parametrize("budget", [450, 800, 5000])
def test_deadline_matches_brute_force(deadline, budget):
    profile = _profile()
    result = search_plans(profile, SPACE, Budgets(budget, 0.1, deadline), 8, _accuracy, latency=_layer_latency)
    expected = _brute_force(profile, SPACE, budget, 0.1, 8, _accuracy, _layer_latency, deadline)
    if expected is None:
        assert result.winner is None
    else:
        assert result.winner.candidate in expected
        assert result.winner.latency_s <= deadline
    for r in result.ranked:
        if r.rejected_by == "deadline":
            assert r.latency_s > deadline and r.memory.total_bytes <= budget
            assert r.reason == f"misses deadline ({r.latency_s * 1e3:.1f} ms > {deadline * 1e3:.1f} ms)"
            assert r.accuracy_drop is None  # rejected before its accuracy was paid for


def test_deadline_rejects_the_otherwise_best_plan():
    space = SearchSpace(split_layers=(1, 2, 3), q_w=((16, None),), qa=(16,), q_bar=(4,), tau=(5.0,))
    free = search_plans(_profile(), space, Budgets(10**9, 0.1), 8, lambda c: 0.0, latency=_layer_latency)
    assert free.winner.candidate.split_layer == 3  # no deadline: the most edge layers
    timed = search_plans(_profile(), space, Budgets(10**9, 0.1, 0.007), 8, lambda c: 0.0, latency=_layer_latency)
    assert timed.winner.candidate.split_layer == 2
    rejected = [r for r in timed.ranked if r.rejected_by == "deadline"]
    assert [r.candidate.split_layer for r in rejected] == [3]
    assert rejected[0].reason == "misses deadline (9.0 ms > 7.0 ms)"


def test_every_candidate_misses_the_deadline():
    space = SearchSpace(split_layers=(1, 2, 3), q_w=((4, None), (16, None)), qa=(16,), q_bar=(4,), tau=(5.0,))
    result = search_plans(_profile(), space, Budgets(10**9, 0.1, 0.0005), 8, lambda c: 0.0, latency=_layer_latency)
    assert result.winner is None and result.min_memory_bytes is None
    assert result.fastest.latency_s == pytest.approx(0.001)
    assert result.fastest.candidate.split_layer == 1 and result.fastest.candidate.q_w1 == 4
    assert all(r.rejected_by == "deadline" for r in result.ranked)


def test_deadline_without_latency_model_is_recorded_only():
    space = SearchSpace(split_layers=(1, 2, 3), q_w=((16, None),), qa=(16,), q_bar=(4,), tau=(5.0,))
    result = search_plans(_profile(), space, Budgets(10**9, 0.1, 1e-9), 8, lambda c: 0.0)
    assert result.winner.candidate.split_layer == 3 and result.fastest is None
    assert not any(r.rejected_by == "deadline" for r in result.ranked)


# --- memory as deployed ------------------------------------------------------------------------------

def test_memory_counts_every_layer_the_edge_shard_keeps():
    profile = _profile()  # layer k: 4-bit 100 + 10 k bytes, 16-bit four times that
    lean = Candidate(2, 2, "front", 4, None, 8, 4, 5.0)      # keeps layers 0, 1
    wide = Candidate(2, 4, "front", 4, None, 8, 4, 5.0)      # same edge, keeps 0..3
    mixed = Candidate(2, 1, "front", 4, 16, 8, 4, 5.0)       # 4-bit layer 0, float 1..3
    space = SearchSpace(split_layers=(2,), q_w=((4, None), (4, 16)), qa=(8,), q_bar=(4,), tau=(5.0,), l_w=(1, 2, 4))
    result = search_plans(profile, space, Budgets(10**9, 1.0), 8, lambda c: 0.0, evaluate_all=True)
    memory = {r.candidate: r.memory.weights_bytes for r in result.ranked if r.memory is not None}
    embedding = 20  # the profile's 8-bit embedding
    assert memory[lean] == embedding + 100 + 110
    assert memory[wide] == embedding + 100 + 110 + 120 + 130
    assert memory[mixed] == embedding + 100 + 4 * (110 + 120 + 130)
    # Equivalent spellings tie on everything but memory: the lean one is what gets saved.
    assert result.winner.candidate == lean
    assert any(r.candidate == wide and r.reason.startswith("same edge configuration") for r in result.ranked)


def test_split_as_l_w_adds_the_lean_spelling():
    space = SearchSpace(split_layers=(1, 3), q_w=((4, None),), qa=(8,), q_bar=(4,), tau=(5.0,), l_w=(0, 4),
                        split_as_l_w=True)
    assert [(c.split_layer, c.l_w) for c in space.candidates(L)] == [(1, 0), (1, 1), (1, 4), (3, 0), (3, 3), (3, 4)]
    result = search_plans(_profile(), space, Budgets(10**9, 1.0), 8, lambda c: 0.0)
    assert (result.winner.candidate.split_layer, result.winner.candidate.l_w) == (3, 3)


def test_widths_without_a_kernel_are_refused_with_the_reason():
    from splitcli.plan.enumerate import KERNEL_BITS

    assert KERNEL_BITS == (4, 8, 16)
    base = _profile()
    layers = tuple(LayerCost(prefill_ms={1: 1.0}, decode_ms=1.0, weight_bytes={2: 50, 3: 75, 4: 100, 8: 200, 16: 400},
                             kv_bytes_per_token={8: 2.0, 16: 4.0}, activation_peak_bytes=10.0) for _ in range(L))
    profile = Profile("toy", 64, 1, 8, DeviceInfo("toy"), layers, base.embedding, base.head, base.codec)
    space = SearchSpace(split_layers=(2,), q_w=((3, None), (2, 16), (8, None)), qa=(8,), q_bar=(4,), tau=(5.0,))
    result = search_plans(profile, space, Budgets(memory_bytes=10**12, max_accuracy_drop=1.0), 8, lambda c: 0.0)
    by_bits = {(r.candidate.q_w1, r.candidate.q_w2): r for r in result.ranked}
    for key in ((3, None), (2, 16)):
        r = by_bits[key]
        assert r.status == "rejected" and r.rejected_by == "invalid" and "no fast kernel" in r.reason
    assert result.winner is not None and result.winner.candidate.q_w1 == 8
