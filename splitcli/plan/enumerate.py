"""The planner of eq. (8): enumerate (l, l_w, Q_w, Q_a, q_bar, tau), keep what fits, rank the rest.

How eq. (8) was read:
- (8c) memory is the EDGE's memory only (DESIGN.md §1): embedding (at embed_bits, as the edge
  shard stores it) + OPSC weights of layers
  [0, l) + the edge KV cache for W_bar tokens at Qa bits + the peak transient activation
  (`splitcli.cost.memory.edge_memory`).
- (8b) accuracy is supplied by the caller as a *drop* (lower is better, e.g. the relative
  perplexity increase) via a callable or a table keyed by Candidate; a candidate passes when
  drop <= max_accuracy_drop. Accuracy is the expensive part, so it is evaluated lazily: only for
  memory-feasible candidates, best-ranked first, until one passes.
- (8a) Psi(Q_a) = sum over all L layers of the activation bits that layer works from: Qa for the
  edge layers [0, l) (their KV cache is kept at Qa bits) and q_bar for the cloud layers [l, L)
  (they compute from the hidden state the TAB-Q codec cut to at most q_bar bits).
- Ties on Psi go to the candidate using the edge more (larger l), then to fewer wire bytes per
  token (hidden state only: the I_kv = 0 payload, which orders candidates the same way the
  I_kv = 1 payload would for a fixed l), then to less edge memory.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Literal, Mapping

from splitcli.cost.memory import EdgeMemory, edge_memory, layer_weight_bits
from splitcli.errors import SplitLLMError
from splitcli.plan.profile import Profile
from splitcli.plan.schema import Budgets, CodecParams, Plan
from splitcli.units import format_bytes


@dataclass(frozen=True)
class Candidate:
    """One point of the search space (layers 0-based: the edge runs [0, split_layer))."""

    split_layer: int
    l_w: int
    method: str
    q_w1: int
    q_w2: int | None
    qa: int
    q_bar: int
    tau: float

    def sort_key(self) -> tuple:
        """A total order for deterministic ranking (q_w2 None sorts first)."""
        return (self.split_layer, self.l_w, self.method, self.q_w1,
                -1 if self.q_w2 is None else self.q_w2, self.qa, self.q_bar, self.tau)


@dataclass(frozen=True)
class SearchSpace:
    """The discrete choices to enumerate. `l_w` None means l_w = split_layer (one OPSC point at l)."""

    split_layers: tuple[int, ...]
    q_w: tuple[tuple[int, int | None], ...]
    qa: tuple[int, ...]
    q_bar: tuple[int, ...]
    tau: tuple[float, ...]
    l_w: tuple[int, ...] | None = None
    methods: tuple[str, ...] = ("front",)
    tau_is_quantile: bool = False

    def __post_init__(self) -> None:
        for name in ("split_layers", "q_w", "qa", "q_bar", "tau", "methods"):
            value = tuple(getattr(self, name))
            object.__setattr__(self, name, value)
            if not value:
                raise SplitLLMError(f"search space {name} must not be empty")
        if self.l_w is not None:
            object.__setattr__(self, "l_w", tuple(self.l_w))
        for method in self.methods:
            if method not in ("front", "back"):
                raise SplitLLMError(f"OPSC method must be 'front' or 'back', got {method!r}")

    def candidates(self, n_layers: int) -> Iterable[Candidate]:
        for l, method, (q_w1, q_w2), qa, q_bar, tau in itertools.product(
            self.split_layers, self.methods, self.q_w, self.qa, self.q_bar, self.tau
        ):
            for l_w in (l,) if self.l_w is None else self.l_w:
                yield Candidate(l, l_w, method, q_w1, q_w2, qa, q_bar, tau)


Status = Literal["chosen", "lost", "rejected"]


@dataclass(frozen=True)
class Ranked:
    """A candidate with its costs and why it won, lost or was rejected."""

    candidate: Candidate
    status: Status
    reason: str
    psi: float = 0.0
    memory: EdgeMemory | None = None
    wire_bytes_per_token: float = 0.0
    accuracy_drop: float | None = None


@dataclass(frozen=True)
class PlanSearch:
    """Outcome of eq. (8): the winner (None if nothing is feasible) and every candidate ranked.

    `min_memory_bytes` is set when nothing is feasible: the smallest memory budget under which
    some candidate would pass both constraints (None if no candidate passes accuracy at all).
    """

    winner: Ranked | None
    ranked: tuple[Ranked, ...]
    min_memory_bytes: int | None
    accuracy_evaluations: int


def psi(split_layer: int, n_layers: int, qa: float, q_bar: float) -> float:
    """Psi(Q_a) = sum_k Q_a,k with Q_a,k = qa for k < l and q_bar for k >= l (module docstring)."""
    return split_layer * qa + (n_layers - split_layer) * q_bar


AccuracySource = Callable[[Candidate], float] | Mapping[Candidate, float]


def _accuracy_fn(accuracy: AccuracySource) -> Callable[[Candidate], float]:
    if callable(accuracy):
        return accuracy
    table = dict(accuracy)

    def lookup(candidate: Candidate) -> float:
        return table.get(candidate, math.nan)

    return lookup


def _objective_key(r: Ranked) -> tuple:
    return (-r.psi, -r.candidate.split_layer, r.wire_bytes_per_token, _total(r),
            r.candidate.sort_key())


def _why_lost(r: Ranked, best: Ranked) -> str:
    if r.psi != best.psi:
        return f"lower Psi ({r.psi:g} < {best.psi:g})"
    if r.candidate.split_layer != best.candidate.split_layer:
        return (f"same Psi, fewer edge layers "
                f"({r.candidate.split_layer} < {best.candidate.split_layer})")
    if r.wire_bytes_per_token != best.wire_bytes_per_token:
        return (f"same Psi and l, more wire bytes/token "
                f"({r.wire_bytes_per_token:g} > {best.wire_bytes_per_token:g})")
    return "tie on Psi, l and wire bytes; lost on memory / order"


def search_plans(
    profile: Profile,
    space: SearchSpace,
    budgets: Budgets,
    max_tokens: int,
    accuracy: AccuracySource,
    evaluate_all: bool = False,
    embed_bits: int = 8,
) -> PlanSearch:
    """Solve eq. (8) by enumeration (see module docstring for the readings).

    accuracy(candidate) -> drop; NaN (or a table miss) counts as "not measured" and rejects.
    evaluate_all: measure accuracy for every memory-feasible candidate, not just until the first
    pass, so that every runner-up carries its drop.
    embed_bits: how the edge stores its embedding table (8 = `splitllm quantize`'s default).
    """
    L = profile.n_layers
    if max_tokens < 1:
        raise SplitLLMError(f"max_tokens (W_bar) must be >= 1, got {max_tokens}")
    accuracy_of = _accuracy_fn(accuracy)
    cache: dict[Candidate, float] = {}

    def drop_of(cand: Candidate) -> float:
        if cand not in cache:
            cache[cand] = float(accuracy_of(cand))
        return cache[cand]

    weight_table, activation_peaks = profile.weight_table(), profile.activation_peaks()
    embedding_bytes = profile.embedding.weight_bytes_at(embed_bits)
    memory_cache: dict[tuple, EdgeMemory | str] = {}
    kv_cache: dict[int, list[float]] = {}

    def kv_of(qa: int) -> list[float]:
        if qa not in kv_cache:
            kv_cache[qa] = profile.kv_bytes_per_token(qa)
        return kv_cache[qa]

    def cost(cand: Candidate) -> EdgeMemory | str:
        """Edge memory of a candidate, or why it is invalid."""
        if not 1 <= cand.split_layer <= L or not 0 <= cand.l_w <= L:
            return f"l or l_w outside 1..{L}"
        method = cand.method  # "front" | "back", checked by SearchSpace
        bits = layer_weight_bits(L, cand.l_w, cand.q_w1, cand.q_w2, method)  # type: ignore[arg-type]
        if any(b is None for b in bits[: cand.split_layer]):
            return "an edge layer has no weights (q_w2 None)"
        try:
            return edge_memory(
                weight_table, cand.split_layer, cand.l_w, cand.q_w1, cand.q_w2,
                kv_of(cand.qa), max_tokens, activation_peaks,
                cand.method, embedding_bytes,  # type: ignore[arg-type]
            )
        except SplitLLMError as exc:
            return str(exc)

    invalid: list[Ranked] = []
    costed: list[Ranked] = []
    wire_cache: dict[tuple[int, float], float] = {}
    for cand in space.candidates(L):
        # Memory does not depend on the codec choice: cost each (l, OPSC, Qa) once.
        memory_key = (cand.split_layer, cand.l_w, cand.method, cand.q_w1, cand.q_w2, cand.qa)
        if memory_key not in memory_cache:
            memory_cache[memory_key] = cost(cand)
        memory = memory_cache[memory_key]
        if isinstance(memory, str):
            invalid.append(Ranked(cand, "rejected", f"invalid: {memory}"))
            continue
        if (cand.q_bar, cand.tau) not in wire_cache:
            wire_cache[cand.q_bar, cand.tau] = profile.wire_bytes_per_token(
                cand.q_bar, cand.tau, space.tau_is_quantile)
        costed.append(Ranked(cand, "lost", "", psi(cand.split_layer, L, cand.qa, cand.q_bar),
                             memory, wire_cache[cand.q_bar, cand.tau]))

    budget, max_drop = budgets.memory_bytes, budgets.max_accuracy_drop
    fits = sorted((r for r in costed if _total(r) <= budget), key=_objective_key)
    over = sorted((r for r in costed if _total(r) > budget), key=_memory_key)

    winner: Ranked | None = None
    lost: list[Ranked] = []
    failed: list[Ranked] = []
    for r in fits:
        if winner is not None and not evaluate_all:
            lost.append(r)
            continue
        r = replace(r, accuracy_drop=drop_of(r.candidate))
        if math.isnan(r.accuracy_drop):  # type: ignore[arg-type]
            failed.append(replace(r, status="rejected", reason="accuracy: not measured"))
        elif r.accuracy_drop > max_drop:  # type: ignore[operator]
            reason = f"accuracy: drop {r.accuracy_drop:.4g} > allowed {max_drop:.4g}"
            failed.append(replace(r, status="rejected", reason=reason))
        elif winner is None:
            winner = replace(r, status="chosen", reason="highest Psi among feasible candidates")
        else:
            lost.append(r)
    if winner is not None:
        lost = [replace(r, reason=_why_lost(r, winner)) for r in lost]

    over_budget = [
        replace(r, status="rejected",
                reason=f"memory: {format_bytes(_total(r))} > budget {format_bytes(budget)}")
        for r in over
    ]

    min_memory = None
    if winner is None:
        # Accuracy does not depend on the budget: the cheapest candidate that passes it is the
        # smallest budget that makes the problem feasible.
        for r in sorted(costed, key=_memory_key):
            drop = drop_of(r.candidate)
            if not math.isnan(drop) and drop <= max_drop:
                min_memory = int(math.ceil(_total(r)))
                break

    ranked = tuple(([winner] if winner else []) + lost + failed + over_budget + invalid)
    return PlanSearch(winner, ranked, min_memory, len(cache))


def _total(r: Ranked) -> float:
    return r.memory.total_bytes if r.memory is not None else math.inf


def _memory_key(r: Ranked) -> tuple:
    return (_total(r), r.candidate.sort_key())


def to_plan(
    candidate: Candidate,
    profile: Profile,
    budgets: Budgets,
    max_tokens: int,
    *,
    delta: float,
    group_size: int,
    tau_is_quantile: bool = False,
    q_bar_min: int = 2,
    i_kv: int = 1,
    embed_bits: int = 8,
    notes: dict | None = None,
) -> Plan:
    """The persisted Plan for a chosen candidate."""
    codec = CodecParams(
        q_bar=candidate.q_bar, delta=delta, q_bar_min=min(q_bar_min, candidate.q_bar),
        tau=None if tau_is_quantile else candidate.tau,
        tau_quantile=candidate.tau if tau_is_quantile else None,
    )
    return Plan(
        model_id=profile.model_id, n_layers=profile.n_layers, split_layer=candidate.split_layer,
        l_w=candidate.l_w, method=candidate.method, q_w1=candidate.q_w1, q_w2=candidate.q_w2,
        qa=candidate.qa, codec=codec, group_size=group_size, max_tokens=max_tokens,
        budgets=budgets, i_kv=i_kv, embed_bits=embed_bits, notes=dict(notes or {}),
    )
