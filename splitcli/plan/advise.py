"""What `splitllm plan` computes around eq. (8): the default search space, per-candidate latency
(eq. 11 with the rate of eq. 13), a readable summary of the ranking, and the W_bar sweep table.

Readings:
- Search space: ℓ over 1..L-1; OPSC "front" weights with every profiled bit width used alone
  (q_w2 None, all edge layers at q_w1) and every pair q_w1 < q_w2 (the first l_w layers quantized
  harder), l_w on a grid of step max(1, L // 6) so the accuracy proxy stays cheap, plus l_w = l
  (the lean spelling whose shard keeps only the edge's own layers); Qa over the
  profiled KV bit widths; q_bar and the tau quantile default to the codec points the profile
  measured (the planner can only cost the wire of what was measured; anything else falls back
  to the rough hidden * q_bar / 8 estimate), else to DEFAULT_Q_BARS and a given quantile.
- Link: without a measured rate the planner assumes the eq. (13) rate R* on
  [W / 1000, 2 W log2(1 + gamma)], i.e. around the link's capacity.
- Edge latency per token: embedding + the edge layers at their weight bits (per-bit timings from
  the profile) + the codec's encode time when the profile has one; the wire carries the hidden
  state of one token (the codec frame measured at the candidate's recipe nearest its ℓ, or
  hidden * q_bar / 8) plus, with I_kv = 1, the new token's KV
  for the cloud layers at 16 bits (`io_bytes_per_step`), sent in the eq. (11) epsilon-outage
  time at rate R. The cloud's compute is not included: the profile measures the edge device
  only, so the predicted step is what the edge and the link spend (a lower bound on the whole).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable

from splitcli.cost.latency import LinkModel
from splitcli.cost.memory import io_bytes_per_step
from splitcli.errors import SplitLLMError
from splitcli.plan.codec_settings import DEFAULT_TAU_QUANTILE, MAX_Q_BAR, MIN_Q
from splitcli.plan.enumerate import (
    DEFAULT_EMBED_BITS, Candidate, PlanSearch, Ranked, SearchSpace, candidate_edge_memory, edge_embedding_bytes,
)
from splitcli.plan.profile import Profile
from splitcli.plan.sweep import SweepPoint, sweep_max_tokens

#: q_bar values to consider when the profile measured no codec points (a synthetic or codec-less
#: profile): the same three widths `splitllm profile` measures.
DEFAULT_Q_BARS: tuple[int, ...] = (4, 6, 8)


def measured_codec_points(profile: Profile) -> tuple[float | None, tuple[int, ...]]:
    """(tau quantile, q_bars) of the codec points the profile measured at a tau quantile; the
    quantile measured at the most q_bars wins (the larger one on a tie). (None, ()) if none."""
    if profile.codec is None:
        return None, ()
    by_tau: dict[float, set[int]] = {}
    for point in profile.codec.points:
        if point.tau_is_quantile and not point.recipe.predictive:   # its q̄ is nominal
            by_tau.setdefault(point.tau, set()).add(point.q_bar)
    if not by_tau:
        return None, ()
    tau = max(by_tau, key=lambda t: (len(by_tau[t]), t))
    return tau, tuple(sorted(by_tau[tau]))


def default_space(profile: Profile, q_bars: Iterable[int] | None = None,
                  tau_quantile: float | None = None) -> SearchSpace:
    """The search space `splitllm plan` enumerates (module docstring). q_bars / tau_quantile
    None: the profile's measured codec points, else DEFAULT_Q_BARS and the codec settings'
    default quantile. Every q_bar must lie within the codec's bounds."""
    L = profile.n_layers
    if L < 2:
        raise SplitLLMError("a split needs a model with at least 2 layers")
    measured_tau, measured_q_bars = measured_codec_points(profile)
    if tau_quantile is None:
        tau_quantile = DEFAULT_TAU_QUANTILE if measured_tau is None else measured_tau
    if q_bars is None:
        q_bars = measured_q_bars if measured_tau == tau_quantile and measured_q_bars else DEFAULT_Q_BARS
    q_bars = tuple(q_bars)
    # Checked here, before any accuracy is measured, rather than when the winner becomes a plan.
    for q_bar in q_bars:
        if not MIN_Q <= q_bar <= MAX_Q_BAR:
            raise SplitLLMError(f"codec q_bar values must lie in [{MIN_Q}, {MAX_Q_BAR}], got {q_bar}")
    bits = sorted(set.intersection(*(set(layer.weight_bytes) for layer in profile.layers)))
    qas = sorted(set.intersection(*(set(layer.kv_bytes_per_token) for layer in profile.layers)))
    q_w: list[tuple[int, int | None]] = [(b, None) for b in bits]
    q_w += [(lo, hi) for lo in bits for hi in bits if lo < hi]
    step = max(1, L // 6)
    l_ws = tuple(sorted(set(range(0, L + 1, step)) | {L}))
    return SearchSpace(split_layers=tuple(range(1, L)), q_w=tuple(q_w), qa=tuple(qas),
                       q_bar=tuple(q_bars), tau=(tau_quantile,), l_w=l_ws, tau_is_quantile=True,
                       split_as_l_w=True)


def default_rate(link: LinkModel) -> float:
    """R* of eq. (13) on [W / 1000, 2 W log2(1 + gamma)] (bit/s)."""
    r_max = 2 * link.bandwidth_hz * math.log2(1 + link.snr)
    return link.optimal_rate(link.bandwidth_hz / 1000, r_max)


def edge_weight_bits(candidate: Candidate, n_layers: int) -> tuple[int | None, ...]:
    return candidate.edge_bits(n_layers)


def canonical(candidate: Candidate, n_layers: int) -> Candidate:
    """The same edge configuration in its plainest OPSC spelling: a uniform edge (e.g. l_w = 0
    with (4, 8), i.e. every edge layer at 8 bits) becomes l_w = L, q_w1 = that width, q_w2 None.

    Not what `splitllm plan` saves: with l_w = L the edge shard keeps every layer, more than the
    edge runs. The planner saves the winner as costed; its search includes the lean spelling
    (l_w = l, q_w2 None), which wins among equivalent spellings on memory."""
    bits = edge_weight_bits(candidate, n_layers)
    if len(set(bits)) == 1 and bits[0] is not None:
        return replace(candidate, l_w=n_layers, q_w1=bits[0], q_w2=None)
    return candidate


def describe_weights(bits: tuple[int | None, ...]) -> str:
    """'4b x 10 + 8b x 5': runs of equal bit widths over the edge layers ('float': unquantized)."""
    runs: list[list] = []
    for b in bits:
        if runs and runs[-1][0] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    return " + ".join(f"{'float' if b is None or b >= 16 else f'{b}b'} x {n}" for b, n in runs)


@dataclass(frozen=True)
class StepLatency:
    """Predicted per-token latency of one decode step (seconds)."""

    compute_s: float
    wire_bytes: float
    comm_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s


def cloud_kv_bytes_per_token(profile: Profile, split_layer: int) -> float:
    qa = 16 if all(16 in layer.kv_bytes_per_token for layer in profile.layers) else max(profile.layers[0].kv_bytes_per_token)
    return float(sum(profile.kv_bytes_per_token(qa)[split_layer:]))


def step_latency(profile: Profile, candidate: Candidate, link: LinkModel | None, rate_bps: float | None,
                 i_kv: int = 1, tau_is_quantile: bool = True) -> StepLatency:
    """Eq. (11) for one decode step of `candidate` (module docstring)."""
    compute = profile.edge_decode_ms_at(edge_weight_bits(candidate, profile.n_layers)) / 1e3
    if profile.codec is not None:
        point = profile.codec.point(candidate.q_bar, candidate.tau, tau_is_quantile, candidate.recipe,
                                    candidate.split_layer)
        own = point.encode_ms if point is not None else None   # the predictive codec's, measured apart
        compute += (profile.codec.encode_ms_per_token if own is None else own) / 1e3
    # the frame of the candidate's own recipe at the measured split layer nearest its ℓ: frames
    # differ by recipe and by layer (the paper's q8 at the middle layer vs at ℓ = 29: 304 vs 391 B)
    hidden = profile.wire_bytes_per_token(candidate.q_bar, candidate.tau, tau_is_quantile, candidate.recipe,
                                          candidate.split_layer)
    wire = io_bytes_per_step(i_kv, 1, hidden, cloud_kv_bytes_per_token(profile, candidate.split_layer))
    comm = link.comm_seconds(wire, rate_bps) if link is not None and rate_bps else 0.0
    return StepLatency(compute, wire, comm)


def latency_model(profile: Profile, link: LinkModel | None, rate_bps: float | None, i_kv: int = 1,
                  tau_is_quantile: bool = True) -> Callable[[Candidate], float]:
    """candidate -> predicted seconds per token (`step_latency`), for `search_plans(latency=)`."""
    def predict(candidate: Candidate) -> float:
        return step_latency(profile, candidate, link, rate_bps, i_kv, tau_is_quantile).total_s

    return predict


def config_key(r: Ranked, n_layers: int) -> tuple:
    """Candidates that run identically on the edge (e.g. every l_w >= l) share this key."""
    return r.candidate.config_key(n_layers)


def summary_rows(search: PlanSearch, n_layers: int, runner_ups: int = 5, rejected: int = 3) -> list[Ranked]:
    """Winner, then the runner-ups (those rejected on accuracy or the deadline that ranked higher
    first, so the reader sees what would have won), then the cheapest over-budget candidates; one
    row per distinct edge configuration. The runner-up the winner was compared with is always a
    row: it is the first distinct "lost" candidate."""
    seen: set[tuple] = set()
    rows: list[Ranked] = []

    def take(items: Iterable[Ranked], limit: int) -> None:
        n = 0
        for r in items:
            key = config_key(r, n_layers)
            if n >= limit or key in seen:
                continue
            seen.add(key)
            rows.append(r)
            n += 1

    if search.winner is not None:
        take([search.winner], 1)
    take((r for r in search.ranked if r.rejected_by in ("accuracy", "deadline")), runner_ups)
    take((r for r in search.ranked if r.status == "lost"), runner_ups)
    take((r for r in search.ranked if r.rejected_by == "memory"), rejected)
    return rows


@dataclass(frozen=True)
class SweepRow:
    point: SweepPoint
    edge_memory_bytes: float
    fits: bool


def sweep_rows(profile: Profile, candidate: Candidate, memory_budget: int, total_tokens: int,
               w_bars: Iterable[int] | None = None, embed_bits: int = DEFAULT_EMBED_BITS) -> list[SweepRow]:
    """Fig. 5(b)/6-style rows for the chosen configuration: per W_bar, who generates how many of
    `total_tokens`, the wire bytes (vs an fp16 hidden state) and whether edge memory still fits."""
    if w_bars is None:
        w_bars = sorted({0, total_tokens // 8, total_tokens // 4, total_tokens // 2, total_tokens, 2 * total_tokens})
    w_bars = list(w_bars)
    per_token = profile.wire_bytes_per_token(candidate.q_bar, candidate.tau, True, candidate.recipe,
                                             candidate.split_layer)
    points = sweep_max_tokens(w_bars, total_tokens, per_token, profile.hidden_size * 2.0)
    kv = profile.kv_bytes_per_token(candidate.qa)
    embedding_bytes = edge_embedding_bytes(profile, candidate, embed_bits)
    rows = []
    for point in points:
        memory = candidate_edge_memory(profile.weight_table(), candidate, kv, point.w_bar, profile.activation_peaks(),
                                       embedding_bytes).total_bytes
        rows.append(SweepRow(point, memory, memory <= memory_budget))
    return rows
