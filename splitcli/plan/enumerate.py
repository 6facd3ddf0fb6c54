"""The planner of eq. (8): enumerate (l, l_w, Q_w, Q_a, q_bar, tau, codec recipe), keep what fits,
rank the rest.

How eq. (8) was read:
- (8c) memory is the EDGE's memory only (DESIGN.md §1): embedding (at embed_bits, as the edge
  shard stores it) + OPSC weights of layers
  [0, l) + the edge KV cache for W_bar tokens at Qa bits + the peak transient activation
  (`splitcli.cost.memory.edge_memory`), plus the weights of every layer beyond l that the OPSC
  assignment still gives bits: `splitllm quantize --config` writes those into the edge shard
  too, so a plan that left them out would not fit the budget it was chosen for. The lean
  spelling of a uniform edge (q_w2 None, l_w = l) keeps exactly [0, l);
  `SearchSpace(split_as_l_w=True)` enumerates it.
- (8b) accuracy is supplied by the caller as a *drop* (lower is better, e.g. the relative
  perplexity increase) via a callable or a table keyed by Candidate; a candidate passes when
  drop <= max_accuracy_drop. Accuracy is the expensive part, so it is evaluated lazily: only for
  memory- and deadline-feasible candidates, best (Psi, l) tie group first, until a group holds
  one that passes (the whole group is measured: see the tie-breaks below).
- (8a) Psi(Q_a) = sum over all L layers of the activation bits that layer works from: Qa for the
  edge layers [0, l) (their KV cache is kept at Qa bits) and q_bar for the cloud layers [l, L)
  (they compute from the hidden state the TAB-Q codec cut to at most q_bar bits).
- Ties on Psi go to the candidate using the edge more (larger l). Eq. (8) stops there, but Psi
  does not see the edge's weight bits at all, so one (Psi, l) tie holds every OPSC choice from
  all-4-bit to full precision. Among those the planner prefers what a user would pick: the
  smaller accuracy drop, then the lower predicted per-token latency (`latency`, when given),
  then fewer wire bytes per token (hidden state only: the I_kv = 0 payload), and only then less
  edge memory. Accuracy is therefore measured for every memory- and deadline-feasible member of
  the best (Psi, l) tie group that has one, not just the first that passes.
- Deadline (`budgets.deadline_s`, enforced when a `latency` model is given): a candidate whose
  predicted per-token latency exceeds it is rejected before its accuracy is measured.
- Codec recipe (rotation, channel alpha; `splitcli.plan.recipes`, not in the paper): one more
  enumerated choice. Psi does not see it. With `max_codec_error`, a candidate whose recipe's
  measured codec error (the profile's `rel_error` at its q_bar, tau, recipe, nearest measured
  split layer; its wire bytes come from the same point) exceeds the bound is
  rejected on accuracy before the (expensive) accuracy source runs; an unmeasured error (a
  format-1 profile) is not checked. Among recipes that pass, the ranking above decides: an
  accuracy source that does not see the codec gives them one drop, so the smaller frame wins
  (lower latency over a link, else fewer wire bytes). On a full tie the paper's recipe goes
  first, and with `measured_recipes_only` another recipe is only enumerated where the profile
  measured it (else it would tie the paper's on the same estimate).
- The token-predictive codec (`PREDICTIVE_RECIPE`, measured by `splitllm profile --predictive`)
  is one more recipe, enumerated once per edge at the q̄ its nearest profile point records (the
  width Ψ counts it at, `splitcli.plan.recipes`); its frame, error and encode time are its own
  point's, and a chosen one becomes a plan of wire "predictive".
- The winner's reason names the rule that put it ahead of the runner-up (the best candidate that
  passed every constraint with another edge configuration), e.g. "smaller accuracy drop".
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields, replace
from typing import Callable, Iterable, Literal, Mapping

from splitcli.cost.memory import EdgeMemory, edge_memory, layer_weight_bits
from splitcli.errors import SplitLLMError
from splitcli.plan.profile import Profile
from splitcli.plan.codec_settings import CodecSettings
from splitcli.plan.ranking import Decision, decide, format_ms, total_memory, why_lost
from splitcli.plan.recipes import PAPER_RECIPE, Recipe
from splitcli.plan.schema import PREDICTIVE_TABLE_BITS, Budgets, Plan
from splitcli.units import format_bytes

#: Weight widths with a fast CPU kernel (4: Int4Linear on the int4 kernel, 8: Int8Linear on the
#: int8 kernel, 16: as loaded). Other widths (2, 3) only run dequantized at every call, slower than
#: keeping the weights in fp32 (measured 7-10x per layer), so the planner refuses them with this
#: reason rather than hand a user a plan that is small and slow.
KERNEL_BITS: tuple[int, ...] = (4, 8, 16)

#: How the edge stores its embedding when nobody says otherwise: the plan's own default (which
#: is `splitllm quantize`'s), read from the Plan schema so the planner never carries a copy.
DEFAULT_EMBED_BITS: int = next(f.default for f in fields(Plan) if f.name == "embed_bits")  # type: ignore[assignment]


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
    rotation: str = "none"          # the codec recipe (splitcli.plan.recipes); default: the paper's
    channel_alpha: float = 0.0
    wire: str = "tabq"              # "predictive": the token-predictive codec (q̄, τ nominal)

    @property
    def recipe(self) -> Recipe:
        return Recipe(self.rotation, self.channel_alpha, self.wire)

    def sort_key(self) -> tuple:
        """A total order for deterministic ranking (q_w2 None sorts first)."""
        return (self.split_layer, self.l_w, self.method, self.q_w1,
                -1 if self.q_w2 is None else self.q_w2, self.qa, self.q_bar, self.tau,
                # the paper's recipe first on a full tie: another recipe must win on a measured rule
                self.recipe != PAPER_RECIPE, self.wire, self.rotation, self.channel_alpha)

    def edge_bits(self, n_layers: int) -> tuple[int | None, ...]:
        """Weight bits of the edge layers [0, split_layer) (None: layer not kept)."""
        bits = layer_weight_bits(n_layers, self.l_w, self.q_w1, self.q_w2, self.method)  # type: ignore[arg-type]
        return tuple(bits[: self.split_layer])

    def config_key(self, n_layers: int) -> tuple:
        """Candidates that run identically on the edge share this key: OPSC spellings differ
        (e.g. every l_w >= l, or l_w = 0 with (4, 8) vs all-8-bit) but the edge does not."""
        return (self.split_layer, self.edge_bits(n_layers), self.qa, self.q_bar, self.tau, self.recipe)


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
    # Also try l_w = l at every split layer: with q_w2 None that edge keeps just the layers it runs.
    split_as_l_w: bool = False
    recipes: tuple[Recipe, ...] = (PAPER_RECIPE,)

    def __post_init__(self) -> None:
        for name in ("split_layers", "q_w", "qa", "q_bar", "tau", "methods", "recipes"):
            value = tuple(getattr(self, name))
            object.__setattr__(self, name, value)
            if not value:
                raise SplitLLMError(f"search space {name} must not be empty")
        if self.l_w is not None:
            object.__setattr__(self, "l_w", tuple(self.l_w))
        for method in self.methods:
            if method not in ("front", "back"):
                raise SplitLLMError(f"OPSC method must be 'front' or 'back', got {method!r}")
        if not all(isinstance(r, Recipe) for r in self.recipes):
            raise SplitLLMError("search space recipes must be Recipe entries")

    def candidates(self, n_layers: int) -> Iterable[Candidate]:
        for l, method, (q_w1, q_w2), qa, q_bar, tau, recipe in itertools.product(
            self.split_layers, self.methods, self.q_w, self.qa, self.q_bar, self.tau, self.recipes
        ):
            l_ws = (l,) if self.l_w is None else self.l_w
            if self.split_as_l_w and l not in l_ws:
                l_ws = tuple(sorted((*l_ws, l)))
            for l_w in l_ws:
                yield Candidate(l, l_w, method, q_w1, q_w2, qa, q_bar, tau, recipe.rotation, recipe.channel_alpha,
                                recipe.wire)


Status = Literal["chosen", "lost", "rejected"]
Constraint = Literal["memory", "deadline", "accuracy", "invalid"]


@dataclass(frozen=True)
class Ranked:
    """A candidate with its costs and why it won, lost or was rejected.

    `rejected_by` names the constraint a rejected candidate broke; `latency_s` is the predicted
    per-token latency (None without a latency model)."""

    candidate: Candidate
    status: Status
    reason: str
    psi: float = 0.0
    memory: EdgeMemory | None = None
    wire_bytes_per_token: float = 0.0
    codec_error: float | None = None      # the recipe's measured codec error (None: not measured)
    accuracy_drop: float | None = None
    latency_s: float | None = None
    rejected_by: Constraint | None = None


@dataclass(frozen=True)
class PlanSearch:
    """Outcome of eq. (8): the winner (None if nothing is feasible) and every candidate ranked.

    `min_memory_bytes` is set when nothing is feasible: the smallest memory budget under which
    some candidate would pass the accuracy and deadline constraints (None if none passes them at
    any memory). `runner_up` is the best candidate that passed every constraint with an edge
    configuration other than the winner's, and `decided_by` the rule that put the winner ahead
    of it (e.g. "smaller accuracy drop"; None without a runner-up). `fastest` is the valid
    candidate with the lowest predicted latency (None without a latency model).
    `accuracy_evaluations` counts the candidates whose drop was asked of the accuracy source (a
    source that caches, like the proxy, may run fewer). When nothing passes at any memory and the
    codec-error bound rejected some candidate that met the deadline, `least_lossy` is the one of
    those with the smallest measured codec error, and `codec_bound_only` says the bound rejected
    every such candidate (so no --accuracy-drop could help).
    """

    winner: Ranked | None
    ranked: tuple[Ranked, ...]
    min_memory_bytes: int | None
    accuracy_evaluations: int
    runner_up: Ranked | None = None
    decided_by: str | None = None
    fastest: Ranked | None = None
    least_lossy: Ranked | None = None
    codec_bound_only: bool = False


def candidate_edge_memory(
    weight_table: list[dict[int, float]],
    candidate: Candidate,
    kv_bytes_per_token: list[float],
    max_tokens: int,
    activation_peaks: list[float],
    embedding_bytes: float,
) -> EdgeMemory:
    """Eq. (8c) for one candidate as `splitllm quantize --config` deploys it (module docstring):
    `edge_memory` over [0, l) plus the weights the edge shard keeps for layers [l, L)."""
    L = len(weight_table)
    memory = edge_memory(weight_table, candidate.split_layer, candidate.l_w, candidate.q_w1, candidate.q_w2,
                         kv_bytes_per_token, max_tokens, activation_peaks,
                         candidate.method, embedding_bytes)  # type: ignore[arg-type]
    bits = layer_weight_bits(L, candidate.l_w, candidate.q_w1, candidate.q_w2, candidate.method)  # type: ignore[arg-type]
    beyond = 0.0
    for k in range(candidate.split_layer, L):
        if bits[k] is None:
            continue
        if bits[k] not in weight_table[k]:
            raise SplitLLMError(f"layer {k} has no measured weight size at {bits[k]} bits")
        beyond += weight_table[k][bits[k]]
    return replace(memory, weights_bytes=memory.weights_bytes + beyond)


def edge_embedding_bytes(profile: Profile, candidate: Candidate, embed_bits: int) -> float:
    """The edge's embedding stored at `embed_bits`, plus, for the predictive codec, the 8-bit rows it
    predicts from where those are not the stored table itself."""
    stored = profile.embedding.weight_bytes_at(embed_bits)
    if candidate.recipe.predictive and embed_bits != PREDICTIVE_TABLE_BITS:
        return stored + profile.embedding.weight_bytes_at(PREDICTIVE_TABLE_BITS)
    return stored


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


def _group_key(r: Ranked) -> tuple:
    """Eq. (8)'s objective: higher Psi, then more edge layers."""
    return (-r.psi, -r.candidate.split_layer)


def _objective_key(r: Ranked) -> tuple:
    """The full ranking (module docstring); an unmeasured drop sorts after every measured one."""
    drop = math.inf if r.accuracy_drop is None or math.isnan(r.accuracy_drop) else r.accuracy_drop
    return (*_group_key(r), drop, r.latency_s or 0.0, r.wire_bytes_per_token, total_memory(r),
            r.candidate.sort_key())


def search_plans(
    profile: Profile,
    space: SearchSpace,
    budgets: Budgets,
    max_tokens: int,
    accuracy: AccuracySource,
    evaluate_all: bool = False,
    embed_bits: int = DEFAULT_EMBED_BITS,
    latency: Callable[[Candidate], float] | None = None,
    max_codec_error: float | None = None,
    measured_recipes_only: bool = False,
    predictive_codec_error: float | None = None,
) -> PlanSearch:
    """Solve eq. (8) by enumeration (see module docstring for the readings).

    accuracy(candidate) -> drop; NaN (or a table miss) counts as "not measured" and rejects.
    evaluate_all: measure accuracy for every memory- and deadline-feasible candidate, not just
    the best tie group that has a passing one, so that every runner-up carries its drop.
    embed_bits: how the edge stores its embedding table (the plan's default is quantize's).
    latency(candidate) -> predicted seconds per token (e.g. `advise.latency_model`): breaks
    ties after the accuracy drop and, with `budgets.deadline_s`, rejects what misses it. Without
    it the deadline is only recorded (nothing here could predict a step's time).
    max_codec_error: reject candidates whose recipe's measured codec error exceeds it (module
    docstring); None: not checked. predictive_codec_error: the bound for the predictive wire's
    recipe instead (its fit has its own default target); None: max_codec_error.
    measured_recipes_only: reject (as invalid) a recipe other than the paper's at a (q̄, τ) the
    profile did not measure it at: its size is then the estimate the paper's recipe gets too and
    its error is unknown, so nothing measured could justify switching codec (a caller passes
    False when the user pinned the recipe).
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
    memory_cache: dict[tuple, EdgeMemory | str] = {}
    kv_cache: dict[int, list[float]] = {}
    latency_cache: dict[tuple, float] = {}

    def kv_of(qa: int) -> list[float]:
        if qa not in kv_cache:
            kv_cache[qa] = profile.kv_bytes_per_token(qa)
        return kv_cache[qa]

    def latency_of(cand: Candidate) -> float | None:
        if latency is None:
            return None
        # Candidates that run identically on the edge take the same time: predict each once.
        key = cand.config_key(L)
        if key not in latency_cache:
            latency_cache[key] = float(latency(cand))
        return latency_cache[key]

    def cost(cand: Candidate) -> EdgeMemory | str:
        """Edge memory of a candidate, or why it is invalid."""
        if not 1 <= cand.split_layer <= L or not 0 <= cand.l_w <= L:
            return f"l or l_w outside 1..{L}"
        method = cand.method  # "front" | "back", checked by SearchSpace
        bits = layer_weight_bits(L, cand.l_w, cand.q_w1, cand.q_w2, method)  # type: ignore[arg-type]
        if any(b is None for b in bits[: cand.split_layer]):
            return "an edge layer has no weights (q_w2 None)"
        slow = sorted({b for b in bits if b is not None and b not in KERNEL_BITS})
        if slow:
            return (f"{'/'.join(map(str, slow))}-bit weights have no fast kernel (dequantized at every call, "
                    f"slower than fp32); widths with kernels: {', '.join(map(str, KERNEL_BITS))}")
        try:
            return candidate_edge_memory(weight_table, cand, kv_of(cand.qa), max_tokens,
                                         activation_peaks, edge_embedding_bytes(profile, cand, embed_bits))
        except SplitLLMError as exc:
            return str(exc)

    invalid: list[Ranked] = []
    costed: list[Ranked] = []
    wire_cache: dict[tuple, tuple[float, float | None]] = {}
    for cand in _with_predictive_q_bar(profile, space, space.candidates(L)):
        # Memory depends on the codec only through the predictive codec's table: cost each once.
        memory_key = (cand.split_layer, cand.l_w, cand.method, cand.q_w1, cand.q_w2, cand.qa,
                      cand.recipe.predictive)
        if memory_key not in memory_cache:
            memory_cache[memory_key] = cost(cand)
        memory = memory_cache[memory_key]
        if isinstance(memory, str):
            invalid.append(Ranked(cand, "rejected", f"invalid: {memory}", rejected_by="invalid"))
            continue
        codec_key = (cand.q_bar, cand.tau, space.tau_is_quantile, cand.recipe, cand.split_layer)
        if measured_recipes_only and cand.recipe != PAPER_RECIPE and (
                profile.codec is None or profile.codec.point(*codec_key) is None):
            invalid.append(Ranked(cand, "rejected", f"invalid: recipe {cand.recipe.name} not measured at "
                                  f"q̄ {cand.q_bar}, τ {cand.tau:g} (pin it to plan on the estimate)",
                                  rejected_by="invalid"))
            continue
        if codec_key not in wire_cache:
            wire_cache[codec_key] = (profile.wire_bytes_per_token(*codec_key), profile.codec_rel_error(*codec_key))
        wire, codec_error = wire_cache[codec_key]
        costed.append(Ranked(cand, "lost", "", psi(cand.split_layer, L, cand.qa, cand.q_bar),
                             memory, wire, codec_error=codec_error, latency_s=latency_of(cand)))

    budget, max_drop = budgets.memory_bytes, budgets.max_accuracy_drop
    deadline = budgets.deadline_s if latency is not None else None

    def misses_deadline(r: Ranked) -> bool:
        return deadline is not None and r.latency_s is not None and r.latency_s > deadline

    def bound_for(r: Ranked) -> float | None:
        predictive = r.candidate.recipe.predictive and predictive_codec_error is not None
        return predictive_codec_error if predictive else max_codec_error

    def codec_too_lossy(r: Ranked) -> bool:
        bound = bound_for(r)
        return bound is not None and r.codec_error is not None and r.codec_error > bound

    fits = sorted((r for r in costed if total_memory(r) <= budget), key=_objective_key)
    over = sorted((r for r in costed if total_memory(r) > budget), key=_memory_key)

    # Walk the (Psi, l) tie groups best first. Within the first group holding a candidate that
    # passes accuracy, every member is measured so the smallest drop can win; later groups are
    # only measured with evaluate_all (accuracy is the expensive part).
    winner: Ranked | None = None
    lost: list[Ranked] = []
    failed: list[Ranked] = []
    for _, group in itertools.groupby(fits, key=_group_key):
        passed: list[Ranked] = []
        for r in group:
            if misses_deadline(r):
                reason = f"misses deadline ({format_ms(r.latency_s)} > {format_ms(deadline)})"  # type: ignore[arg-type]
                failed.append(replace(r, status="rejected", reason=reason, rejected_by="deadline"))
                continue
            if codec_too_lossy(r):
                reason = (f"accuracy: codec error {r.codec_error:.3g} > allowed {bound_for(r):.3g} "
                          f"({r.candidate.recipe.describe()}, q̄ {r.candidate.q_bar})")
                failed.append(replace(r, status="rejected", reason=reason, rejected_by="accuracy"))
                continue
            if winner is not None and not evaluate_all:
                lost.append(r)
                continue
            r = replace(r, accuracy_drop=drop_of(r.candidate))
            if math.isnan(r.accuracy_drop):  # type: ignore[arg-type]
                failed.append(replace(r, status="rejected", reason="accuracy: not measured",
                                      rejected_by="accuracy"))
            elif r.accuracy_drop > max_drop:  # type: ignore[operator]
                reason = f"accuracy: drop {r.accuracy_drop:.4g} > allowed {max_drop:.4g}"
                failed.append(replace(r, status="rejected", reason=reason, rejected_by="accuracy"))
            else:
                passed.append(r)
        passed.sort(key=_objective_key)  # now with their drops: the preference order
        if winner is None and passed:
            winner = replace(passed[0], status="chosen")
            passed = passed[1:]
        lost.extend(passed)

    runner_up: Ranked | None = None
    decision: Decision | None = None
    if winner is not None:
        lost = sorted((replace(r, reason=why_lost(r, winner, L)) for r in lost), key=_objective_key)
        winner_key = winner.candidate.config_key(L)
        runner_up = next((r for r in lost if r.candidate.config_key(L) != winner_key), None)
        decision = decide(winner, runner_up) if runner_up is not None else None
        if runner_up is None:
            reason = "the only configuration that passes every constraint"
        elif decision is None:
            reason = "ties with the runner-up on every rule; first in enumeration order"
        else:
            reason = f"chosen over the runner-up by: {decision.won}"
        winner = replace(winner, reason=reason)
    failed.sort(key=_objective_key)

    over_budget = [
        replace(r, status="rejected", rejected_by="memory",
                reason=f"memory: {format_bytes(total_memory(r))} > budget {format_bytes(budget)}")
        for r in over
    ]

    min_memory = None
    if winner is None:
        # Accuracy and latency do not depend on the budget: the cheapest candidate that passes
        # both is the smallest budget that makes the problem feasible.
        for r in sorted(costed, key=_memory_key):
            if misses_deadline(r) or codec_too_lossy(r):
                continue
            drop = drop_of(r.candidate)
            if not math.isnan(drop) and drop <= max_drop:
                min_memory = int(math.ceil(total_memory(r)))
                break

    least_lossy, codec_bound_only = None, False
    if winner is None and min_memory is None:
        # Say whether the codec bound, not the drop, is what no budget can get past.
        timely = [r for r in costed if not misses_deadline(r)]
        lossy = [r for r in timely if codec_too_lossy(r)]
        if lossy:
            least_lossy = min(lossy, key=lambda r: (r.codec_error, r.candidate.sort_key()))
            codec_bound_only = len(lossy) == len(timely)

    fastest = None
    if latency is not None and costed:
        fastest = min(costed, key=lambda r: (r.latency_s, total_memory(r), r.candidate.sort_key()))

    ranked = tuple(([winner] if winner else []) + lost + failed + over_budget + invalid)
    return PlanSearch(winner, ranked, min_memory, len(cache), runner_up,
                      decision.rule if decision is not None else None, fastest, least_lossy, codec_bound_only)


def _with_predictive_q_bar(profile: Profile, space: SearchSpace, candidates: Iterable[Candidate]
                           ) -> Iterable[Candidate]:
    """The candidates, each predictive one once per edge (at the space's first q̄ and τ) and at
    the q̄ its nearest profile point records, the width Ψ counts it at (`splitcli.plan.recipes`);
    none where the profile measured no predictive point."""
    for cand in candidates:
        if cand.recipe.predictive:
            if cand.q_bar != space.q_bar[0] or cand.tau != space.tau[0]:
                continue
            q_bar = profile.codec.predictive_q_bar(cand.split_layer) if profile.codec is not None else None
            if q_bar is None:
                continue   # never measured: no size or error to plan it with
            cand = replace(cand, q_bar=q_bar)
        yield cand


def _memory_key(r: Ranked) -> tuple:
    return (total_memory(r), r.candidate.sort_key())


def to_plan(
    candidate: Candidate,
    profile: Profile,
    budgets: Budgets,
    max_tokens: int,
    *,
    group_size: int,
    tau_is_quantile: bool = False,
    delta: float | None = None,
    q_bar_min: int | None = None,
    i_kv: int = 1,
    embed_bits: int = DEFAULT_EMBED_BITS,
    notes: dict | None = None,
) -> Plan:
    """The persisted Plan for a chosen candidate, its codec recipe (rotation, channel alpha)
    included. The codec settings the search did not choose (delta, q_bar_min, entropy coding,
    the rotation seed, ...) are CodecSettings' defaults unless given. A predictive candidate
    becomes a plan of wire "predictive" with default codec settings: no target_rel_error, so
    deployment fits the codec for its default error, the one `splitllm profile --predictive`
    measured (its TAB-Q settings are not used)."""
    fixed = dict(model_id=profile.model_id, n_layers=profile.n_layers, split_layer=candidate.split_layer,
                 l_w=candidate.l_w, method=candidate.method, q_w1=candidate.q_w1, q_w2=candidate.q_w2,
                 qa=candidate.qa, group_size=group_size, max_tokens=max_tokens, budgets=budgets, i_kv=i_kv,
                 embed_bits=embed_bits, notes=dict(notes or {}))
    if candidate.recipe.predictive:
        return Plan(**fixed, codec=CodecSettings(), wire="predictive")
    chosen: dict = {"q_bar": candidate.q_bar, "tau": None if tau_is_quantile else candidate.tau,
                    "tau_quantile": candidate.tau if tau_is_quantile else None,
                    **candidate.recipe.to_dict()}
    if delta is not None:
        chosen["delta"] = delta
    if q_bar_min is not None:
        chosen["q_bar_min"] = min(q_bar_min, candidate.q_bar)
    return Plan(**fixed, codec=CodecSettings(**chosen))
