"""Algorithm 2 acting live: before every decode step the edge measures the link, asks
`splitcli.plan.early_exit.decide_step` what to do under the deadline D, and does it.

Per decode step t (the forward that produces token t; the prefill is step 0 and is not decided):
1. R = the link's measured delivery rate (`EmulatedLink.rate_estimate`; with no frame yet the
   edge sends a probe of `probe_bytes` first).
2. L_c = the edge compute of the previous step (before the first decode step: the prefill's per
   position) plus the link's base latency: eq. (9) has no propagation term, and a latency the edge
   knows belongs with the fixed part of L_t (eq. 11). Jitter is unknown to it.
3. decide_step(policy, R, w = t, L_c, wire_bytes, current I_kv) and act on the decision:
   - keep / compress: this step's frame is coded at the decision's q̄ (the CodecWire's config is
     swapped with `with_q_bar` for the frame; q̄ is re-chosen every step). A raw wire cannot
     compress: the frame goes out as it is and the trace row says so.
   - drop_kv: I_kv = 0 from now on (sticky).
   - stop: generation ends here with the tokens produced so far.
4. The trace row records the decision, q̄, I_kv, the predicted L_t, and the measured latency =
   measured edge compute + the emulated link's time for the step's frames; outage = measured > D.

What I_kv moves on the wire in a running split (the reading of eq. (2)-(3) used here):
- I_kv = 1: every step also sends the KV rows the step added to the edge's layers [0, ℓ), which
  the cloud keeps in the same cache as its own layers: the cloud then holds the whole session's
  KV (all L layers, eq. 2) and could carry on alone (Fig. 5: the edge offloads the rest) with no
  re-processing. A `HandoffSession` handing off under I_kv = 1 therefore sends all L layers.
- I_kv = 0: only the hidden state at ℓ; the cloud keeps only its own layers. Once a step's rows
  are skipped the cloud's copy has a gap, hence the policy keeps I_kv = 0 for good.
The edge's cache must expose its rows (a float cache); with a Qa-bit edge cache I_kv starts at 0
and the summary says why. `splitcli.cost.memory.io_bytes_per_step` counts the cloud layers' rows
instead; the runtime's own `session_wire_bytes` predicts what this module sends.

With a `HandoffSession` and `local_tokens` = w the edge first generates w tokens alone (rows
"local": no frames, no decision); the step after them is the handoff, decided like any step with
the handoff payload (KV of all layers, or the hidden states of every position at q̄) added to its
bytes: Algorithm 2 as the paper states it, where stopping means ending with the local tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..codec import CodecConfig, CodecStats
from ..codec.config import MAX_Q_BAR
from ..cost.latency import LinkModel
from ..errors import SplitLLMError
from ..plan.early_exit import ExitPolicy, Step, WireBytes, decide_step
from .codec_wire import CodecWire
from .generate import SamplingConfig, TokenStream
from .handoff import HandoffMixin, HandoffReport, decode_kv, encode_kv, kv_layout, kv_payload_bytes, kv_rows_bytes
from .link import EmulatedLink, LinkSpec, LinkWire, inner_wire, span_seconds, transfer
from .session import SplitSession

_ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def with_q_bar(cfg: CodecConfig, q_bar: int) -> CodecConfig:
    """`cfg` coding at most q_bar bits: q_min follows it down. A static symbol model is cut to
    widths q_min..q_bar when it covers them all, else dropped (frames then carry their own model):
    encoder and decoder must hold the same one, and both use this config."""
    q_min = min(cfg.q_min, q_bar)
    model = cfg.symbol_model
    if model is not None:
        if q_min != cfg.q_min or q_bar > cfg.q_bar:
            model = None
        else:
            classes = max(cfg.channel_class) + 1 if cfg.channel_class is not None else 1
            model = model[: (q_bar - q_min + 1) * classes]
    return dataclasses.replace(cfg, q_bar=q_bar, q_min=q_min, symbol_model=model)


def link_model_for(spec: LinkSpec, eps: float, bandwidth_factor: float = 10.0) -> LinkModel:
    """A Rayleigh `LinkModel` (eq. 10) whose outage at the spec's first rate equals its frame loss.

    W = bandwidth_factor x that rate; gamma solves P_o(R) = loss, so eq. (9)'s ceil(ln eps / ln P_o)
    retransmissions are the ones the emulator's losses call for (a lossless spec gets P_o ~ 0).
    """
    rate = spec.schedule[0][1]
    bandwidth = bandwidth_factor * rate
    p_o = max(spec.loss, 1e-12)
    snr = math.expm1(math.log(2.0) * rate / bandwidth) / -math.log1p(-p_o)
    return LinkModel(bandwidth, snr, eps)


def codec_frame_bound(cfg: CodecConfig, rows: int, hidden: int, q_bar: int, sparse_per_row: float = 0.0) -> int:
    """Upper estimate of a codec frame of [rows, hidden] at q_bar: full header and calibration
    crcs, per-row width/scale/zero, the sparse part seen so far, symbols bit-packed at q_bar
    (TAB-Q never widens a token past q_bar; rANS is used only when it comes out smaller)."""
    header = 36 + 4 * 3 + 4  # full header, up to three calibration crcs, frame crc
    # width u8 + scale f32 + zero i32, the symbols, a CSR row count u16, the outliers
    per_row = 9 + math.ceil(hidden * q_bar / 8) + 2 + sparse_per_row
    return int(math.ceil(header + rows * per_row))


def frame_bytes_model(wire, hidden: int, last_stats: Callable[[], CodecStats | None] | None = None):
    """frame(q_bar, rows) -> bytes of one frame of `rows` hidden states of width `hidden` on `wire`:
    exact for a raw wire (its size does not depend on the values), `codec_frame_bound` for a codec
    wire, with the sparse part per row of `last_stats()` (default: the wire's last frame; None: no
    sparse part); the token-predictive wire's mean under its own models, whatever q̄ (it has one rate)."""
    plain = inner_wire(wire)
    if getattr(plain, "needs_ids", False):
        return lambda q_bar, rows: plain.expected_frame_bytes(rows)
    stats = last_stats if last_stats is not None else (lambda: getattr(plain, "last_stats", None))
    sizes: dict[int, int] = {}

    def frame(q_bar: int, rows: int) -> float:
        if isinstance(plain, CodecWire):
            last = stats()
            sparse = last.sparse_bytes / last.tokens if last is not None and last.tokens else 0.0
            return float(codec_frame_bound(plain.cfg, rows, hidden, q_bar, sparse))
        if rows not in sizes:
            sizes[rows] = len(plain.encode(torch.zeros(rows, hidden)))
        return float(sizes[rows])

    return frame


def cannot_compress(wire, q_bar: int) -> str:
    """The trace note of a step the policy asked to code at q̄ on a wire that has no q̄."""
    if getattr(inner_wire(wire), "needs_ids", False):
        return f"the predictive wire has one rate (no q̄): frame sent as coded (policy asked for q̄ {q_bar})"
    return f"raw wire cannot compress: frame sent uncompressed (policy asked for q̄ {q_bar})"


def handoff_wire_bytes(per_step: WireBytes, kv_bytes: float, history_frame: Callable[[int], float]) -> WireBytes:
    """The handoff step's bytes: its own frame (`per_step`) plus the session so far, as KV rows
    (`kv_bytes`, I_kv = 1) or as one frame of every position's hidden state at q̄
    (`history_frame(q_bar)`, I_kv = 0: the cloud re-processes them)."""

    def wire_bytes(q_bar: int, i_kv: int, w: int) -> float:
        payload = kv_bytes if i_kv else history_frame(q_bar)
        return float(payload + per_step(q_bar, i_kv, w))

    return wire_bytes


def session_wire_bytes(session: SplitSession, batch: int, kv_dtype: torch.dtype | None = None) -> WireBytes:
    """wire_bytes(q_bar, i_kv, w) of one decode step of `batch` rows as this module sends it:
    the hidden-state frame (`frame_bytes_model`) plus, with I_kv = 1, the KV payload of that
    step's rows of layers [0, ℓ)."""
    parts = session.cloud.parts
    itemsize = _ITEMSIZE[kv_dtype or _param_dtype(session.edge)]
    kv = kv_payload_bytes(kv_layout(parts, range(session.edge.split_layer), batch), 1, itemsize)
    frame = frame_bytes_model(session.wire, parts.config.hidden_size)

    def wire_bytes(q_bar: int, i_kv: int, w: int) -> float:
        return float(frame(q_bar, batch) + i_kv * kv)

    return wire_bytes


def measured_link_model(eps: float) -> LinkModel:
    """The eq. (9) model for a rate measured on a real link: one try at any rate (P_o ~ 0). The
    transport's own retransmissions are already inside a measured delivery rate, so eps has no
    lever there; the deadline still does."""
    return LinkModel(1e18, 1e12, eps)


def decide_on(link, policy: ExitPolicy, step: int, compute_s: float, wire_bytes: WireBytes, i_kv: int):
    """decide_step on what `link` measured (`rate_estimate()`, R; `latency_s`, the fixed latency
    added to the compute L_c); returns (decision, the rate used or None)."""
    rate = link.rate_estimate()
    decision = decide_step(policy, rate_bps=rate if rate is not None else 0.0, w=step,
                           compute_s=compute_s + link.latency_s, wire_bytes=wire_bytes, current_i_kv=i_kv)
    return decision, rate


def _param_dtype(half) -> torch.dtype:
    """The dtype an edge or cloud half computes (and caches) in."""
    return next(half.parts.layers[half.split_layer - 1].parameters()).dtype


@dataclass(frozen=True)
class TraceRow:
    """One step of the live loop. Times in ms; None where nothing applies (e.g. a stop runs nothing)."""

    step: int
    stage: str                 # prefill | local | handoff | split
    decision: str              # prefill | local | keep | compress | drop_kv | stop
    reason: str
    q_bar: int | None          # q̄ the frame was coded at (None: raw wire or no frame)
    i_kv: int
    rate_bps: float | None     # the measured rate the decision used
    predicted_ms: float | None  # L_t of the chosen setting
    compute_ms: float | None
    link_ms: float
    measured_ms: float | None
    wire_bytes: int
    kv_bytes: int
    retransmissions: int
    outage: bool
    note: str = ""
    # A networked edge (splitcli.serve.adaptive) also records what it measured beside the link:
    cloud_ms: float | None = None    # the time the cloud says it held the step (in measured_ms)
    latency_ms: float | None = None  # the link's fixed latency the decision added to L_c


@dataclass(frozen=True)
class AdaptiveSummary:
    deadline_s: float
    eps: float
    steps: int                 # decode steps that ran
    decisions: dict[str, int]  # decision -> count (stop included)
    outages: int
    outage_rate: float         # outages / steps
    stopped_early: bool
    stop_reason: str
    tokens: int
    wire_bytes: int            # every frame of the run, the prefill's included
    link_s: float
    notes: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        counted = ", ".join(f"{k} {v}" for k, v in self.decisions.items())
        out = [f"decode steps run: {self.steps}, tokens: {self.tokens} ({counted})",
               f"outages (measured > D = {self.deadline_s * 1e3:.1f} ms): {self.outages} of {self.steps} "
               f"= {self.outage_rate:.3f}, eps requested {self.eps:g}",
               f"wire: {self.wire_bytes} bytes, {self.link_s * 1e3:.1f} ms on the link"]
        if self.stopped_early:
            out.append(f"stopped early: {self.stop_reason}")
        return out + [f"note: {n}" for n in self.notes]


@dataclass
class AdaptiveResult:
    tokens: torch.Tensor       # [B, n] generated ids
    rows: list[TraceRow]       # the prefill first, then one per decode step (a stop included)
    summary: AdaptiveSummary
    handoff: HandoffReport | None = None
    stopped_on_eos: bool = False


def _finite_ms(seconds: float) -> float | None:
    return seconds * 1e3 if math.isfinite(seconds) else None


class _Loop:
    """The state of one adaptive generation (kept out of the public function for readability)."""

    def __init__(self, session, policy: ExitPolicy, link: EmulatedLink, batch: int,
                 wire_bytes: WireBytes | None, kv_dtype, fixed_compute_s, probe_bytes: int):
        self.session, self.policy, self.link = session, policy, link
        self.kv_dtype, self.fixed, self.probe_bytes = kv_dtype, fixed_compute_s, probe_bytes
        self.notes: list[str] = []
        self.codec = inner_wire(session.wire)
        self.codec = self.codec if isinstance(self.codec, CodecWire) else None
        if self.codec is not None and policy.q_bar > MAX_Q_BAR:
            raise SplitLLMError(f"the policy's q̄ {policy.q_bar} exceeds the codec's widest code {MAX_Q_BAR}")
        self.base_cfg = self.codec.cfg if self.codec else None
        self.cfgs: dict[int, CodecConfig] = {}
        self.i_kv = policy.i_kv
        if self.i_kv and not session.edge_exposes_rows():
            self.i_kv = 0
            self.notes.append("I_kv = 0 from the start: the edge's Qa-bit KV cache does not expose rows to send")
        self.policy = dataclasses.replace(policy, i_kv=self.i_kv)
        self.wire_bytes = wire_bytes or session_wire_bytes(session, batch, kv_dtype)
        self.replica = 0           # positions of layers [0, ℓ) the cloud holds
        self.last_compute_s = 0.0

    def set_q_bar(self, q_bar: int) -> int | None:
        if self.codec is None:
            return None
        if q_bar not in self.cfgs:
            self.cfgs[q_bar] = with_q_bar(self.base_cfg, q_bar)
        self.codec.cfg = self.cfgs[q_bar]
        return q_bar

    def send_edge_rows(self) -> int:
        """I_kv = 1: the rows the cloud lacks of layers [0, ℓ), over the link; returns the bytes."""
        s = self.session
        ell = s.edge.split_layer
        length, rows = s.edge_rows(range(ell), self.replica)
        if length == self.replica:
            return 0
        payload = transfer(s.wire, encode_kv(rows, self.replica, length - self.replica, self.kv_dtype))
        batch = rows[0].keys.shape[0]
        s.receive_rows(decode_kv(payload, kv_layout(s.cloud.parts, range(ell), batch)))
        self.replica = length
        return len(payload)

    def handoff_bytes(self, batch: int) -> WireBytes:
        """The handoff step's bytes: the step's own frame plus all L layers' KV or every hidden state."""
        s = self.session
        _, rows = s.edge_rows(range(s.cloud.parts.num_layers), 0)
        kv = kv_rows_bytes(rows, _ITEMSIZE[self.kv_dtype or rows[0].keys.dtype])
        frame = frame_bytes_model(s.wire, s.cloud.parts.config.hidden_size, last_stats=lambda: None)
        return handoff_wire_bytes(self.wire_bytes, kv, lambda q_bar: frame(q_bar, batch * s.length))

    def decide(self, step: int, wire_bytes: WireBytes):
        rate = self.link.rate_estimate()
        if rate is None:  # nothing measured yet (the edge prefilled alone): probe the link first
            self.link.transmit(self.probe_bytes)
            rate = self.link.rate_estimate()
        compute = self.fixed if self.fixed is not None else self.last_compute_s
        return decide_on(self.link, self.policy, step, compute, wire_bytes, self.i_kv)


def adaptive_generate(
    session: SplitSession,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cfg: SamplingConfig,
    policy: ExitPolicy,
    link: EmulatedLink,
    *,
    wire_bytes: WireBytes | None = None,
    local_tokens: int = 0,
    eos_token_ids: set[int] | None = None,
    kv_dtype: torch.dtype | None = None,
    fixed_compute_s: float | None = None,
    probe_bytes: int = 1500,
) -> AdaptiveResult:
    """Generate with Algorithm 2 deciding every decode step (module docstring); returns the trace.

    `session`: a fresh split or handoff session, eager or fast (its wire is wrapped in a `LinkWire` on
    `link` for the run unless it already is one). `wire_bytes`: the policy's byte model (default
    `session_wire_bytes`). `local_tokens`: tokens the edge generates alone first (HandoffSession
    only). `fixed_compute_s`: pin the edge compute time instead of measuring it (reproducible
    tests and what-if runs). `kv_dtype`: dtype of sent KV (None: the cache's own, exact).
    """
    if session.length:
        raise SplitLLMError("adaptive_generate needs a fresh session (nothing prefilled yet)")
    handing_off = isinstance(session, HandoffMixin) and session.local
    if isinstance(local_tokens, bool) or not isinstance(local_tokens, int) or local_tokens < 0:
        raise SplitLLMError(f"local tokens w must be an integer >= 0, got {local_tokens!r}")
    if local_tokens and not handing_off:
        raise SplitLLMError("local tokens need a HandoffSession (an edge holding every layer)")
    if fixed_compute_s is not None and not (math.isfinite(fixed_compute_s) and fixed_compute_s >= 0):
        raise SplitLLMError(f"fixed compute time must be finite seconds >= 0, got {fixed_compute_s!r}")
    if isinstance(probe_bytes, bool) or not isinstance(probe_bytes, int) or probe_bytes < 1:
        raise SplitLLMError(f"probe size must be an integer >= 1 byte, got {probe_bytes!r}")
    original_wire = session.wire
    codec = inner_wire(original_wire)
    base_cfg = codec.cfg if isinstance(codec, CodecWire) else None
    if not (isinstance(session.wire, LinkWire) and session.wire.link is link):
        session.wire = LinkWire(session.wire, link)
    try:
        return _generate(session, input_ids, attention_mask, cfg, policy, link, wire_bytes, local_tokens,
                         eos_token_ids, kv_dtype, fixed_compute_s, probe_bytes, handing_off)
    finally:
        # the session may be reused: give it back its own wire and codec settings
        session.wire = original_wire
        if base_cfg is not None:
            codec.cfg = base_cfg


def _generate(session, input_ids, attention_mask, cfg, policy, link, wire_bytes, local_tokens, eos_token_ids,
              kv_dtype, fixed_compute_s, probe_bytes, handing_off) -> AdaptiveResult:
    batch = input_ids.shape[0]
    loop = _Loop(session, policy, link, batch, wire_bytes, kv_dtype, fixed_compute_s, probe_bytes)
    deadline_ms = policy.deadline_s * 1e3
    rows: list[TraceRow] = []
    if handing_off and local_tokens == 0:
        session.handoff(loop.i_kv, edge_layers=bool(loop.i_kv), kv_dtype=kv_dtype)
        loop.replica = 0

    # step 0: the prefill (not decided: D bounds a token step, not the prompt)
    link.begin_step(0)
    mark = len(link.records)
    q_bar = loop.set_q_bar(policy.q_bar)
    logits = session.prefill(input_ids, attention_mask)[:, -1]
    kv_bytes = loop.send_edge_rows() if loop.i_kv and not getattr(session, "local", False) else 0
    compute_s = sum(s.edge_ms + s.encode_ms for s in session.stats) / 1e3
    frames = link.frames_since(mark)
    loop.last_compute_s = compute_s / max(input_ids.shape[1], 1)
    rows.append(_row(0, "local" if getattr(session, "local", False) else "prefill", "prefill", "", q_bar,
                     loop.i_kv, None, None, compute_s * 1e3, frames, kv_bytes, deadline_ms, check=False))

    stream = TokenStream(cfg, batch, eos_token_ids)
    stopped, stop_reason = False, ""
    while True:
        nxt = stream.sample(logits)
        if stream.finished:
            break
        step = len(stream.out)
        link.begin_step(step)
        mark = len(link.records)
        if handing_off and session.local and step < local_tokens:
            logits = session.forward(nxt[:, None])[:, -1]
            compute_ms = _compute_ms(loop, session.stats[-1], 0.0)
            rows.append(_row(step, "local", "local", "the edge generates alone", None, loop.i_kv, None, None,
                             compute_ms, [], 0, deadline_ms))
            loop.last_compute_s = compute_ms / 1e3
            continue
        is_handoff = handing_off and session.local
        decision, rate = loop.decide(step, loop.handoff_bytes(batch) if is_handoff else loop.wire_bytes)
        stage = "handoff" if is_handoff else "split"
        if decision.step is Step.STOP:
            stopped, stop_reason = True, decision.reason
            rows.append(_row(step, stage, decision.step.value, decision.reason, None, loop.i_kv, rate, None,
                             None, link.frames_since(mark), 0, deadline_ms, check=False))
            break
        note = ""
        q_bar = loop.set_q_bar(decision.q_bar)
        if q_bar is None and decision.q_bar < policy.q_bar:
            note = cannot_compress(session.wire, decision.q_bar)
        loop.i_kv = min(loop.i_kv, decision.i_kv)  # sticky: once off, KV stays off
        kv_bytes, handoff_s = 0, 0.0
        if is_handoff:
            report = session.handoff(loop.i_kv, edge_layers=bool(loop.i_kv), kv_dtype=kv_dtype)
            kv_bytes, handoff_s = report.kv_bytes, report.edge_ms / 1e3  # the edge's share of the handoff
            loop.replica = session.length if loop.i_kv else 0
        logits = session.forward(nxt[:, None])[:, -1]
        t1 = time.perf_counter()
        kv_bytes += loop.send_edge_rows() if loop.i_kv else 0
        kv_s = time.perf_counter() - t1
        compute_ms = _compute_ms(loop, session.stats[-1], handoff_s + kv_s)
        rows.append(_row(step, stage, decision.step.value, decision.reason, q_bar, loop.i_kv, rate,
                         _finite_ms(decision.latency_s), compute_ms, link.frames_since(mark), kv_bytes,
                         deadline_ms, note=note))
        loop.last_compute_s = compute_ms / 1e3

    tokens = stream.tokens()
    summary = summarize(rows, policy, stopped, stop_reason, tokens.shape[1], loop.notes)
    report = session.report if isinstance(session, HandoffMixin) else None
    return AdaptiveResult(tokens, rows, summary, report, stream.all_eos)


def summarize(rows: list[TraceRow], policy: ExitPolicy, stopped: bool, stop_reason: str, tokens: int,
              notes=()) -> AdaptiveSummary:
    """The summary of a trace whose first row is the prefill (or the first local step)."""
    ran = [r for r in rows[1:] if r.measured_ms is not None]
    outages = sum(r.outage for r in ran)
    return AdaptiveSummary(
        deadline_s=policy.deadline_s, eps=policy.link.eps, steps=len(ran),
        decisions=dict(Counter(r.decision for r in rows[1:])), outages=outages,
        outage_rate=outages / len(ran) if ran else 0.0, stopped_early=stopped, stop_reason=stop_reason,
        tokens=tokens, wire_bytes=sum(r.wire_bytes for r in rows),
        link_s=sum(r.link_ms for r in rows) / 1e3, notes=tuple(notes))


def _compute_ms(loop: _Loop, stats, extra_s: float) -> float:
    if loop.fixed is not None:
        return loop.fixed * 1e3
    return stats.edge_ms + stats.encode_ms + extra_s * 1e3


def _row(step, stage, decision, reason, q_bar, i_kv, rate, predicted_ms, compute_ms, frames, kv_bytes,
         deadline_ms, note="", check=True) -> TraceRow:
    link_ms = span_seconds(frames) * 1e3
    measured = None if compute_ms is None else compute_ms + link_ms
    return TraceRow(step, stage, decision, reason, q_bar, i_kv, rate, predicted_ms, compute_ms, link_ms, measured,
                    sum(f.nbytes for f in frames), kv_bytes, sum(f.retransmissions for f in frames),
                    bool(check and measured is not None and measured > deadline_ms), note)


def format_trace(result: AdaptiveResult) -> list[str]:
    """A per-step table and the summary, for printing."""
    head = f"{'step':>4} {'stage':<8} {'decision':<8} {'q̄':>2} {'Ikv':>3} {'R est':>12} {'L_t pred':>9} " \
           f"{'measured':>9} {'bytes':>7} {'':<6}"
    lines = [head]
    for r in result.rows:
        rate = f"{r.rate_bps / 1e6:.3f} Mbit/s" if r.rate_bps else "-"
        pred = f"{r.predicted_ms:.1f} ms" if r.predicted_ms is not None else "-"
        meas = f"{r.measured_ms:.1f} ms" if r.measured_ms is not None else "-"
        q = str(r.q_bar) if r.q_bar is not None else "-"
        lines.append(f"{r.step:>4} {r.stage:<8} {r.decision:<8} {q:>2} {r.i_kv:>3} {rate:>12} {pred:>9} "
                     f"{meas:>9} {r.wire_bytes:>7} {'OUTAGE' if r.outage else ''}")
    return lines + result.summary.lines()


def write_trace(path: str | Path, result: AdaptiveResult) -> None:
    """JSONL: one {"kind": "step", ...} per trace row, then {"kind": "summary", ...}."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in result.rows:
            fh.write(json.dumps({"kind": "step", **dataclasses.asdict(row)}) + "\n")
        summary = dataclasses.asdict(result.summary)
        summary["notes"] = list(summary["notes"])
        if result.handoff is not None:
            summary["handoff"] = {**dataclasses.asdict(result.handoff), "total_bytes": result.handoff.total_bytes}
        fh.write(json.dumps({"kind": "summary", **summary}) + "\n")

