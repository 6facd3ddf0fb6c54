"""Algorithm 2 on the measured network link: the networked edge decides every decode step.

`serve.client` / `serve.handoff` call a `LiveRun` around each step of `generate_remote` / `generate_remote_handoff`
(`generate --cloud HOST:PORT --deadline D`, and `serve-edge` with a deadline). Per decode step:

1. R and the link's fixed latency come from a `runtime.link.MeasuredLink` fed by this session's
   own gRPC exchanges: bytes of the step's frame vs the time from handing it to gRPC to its
   token, less the time the cloud says it held the step (`Token.cloud_us`). The Open/Opened
   round trip is the first (small) sample; the prefill the first large one. A handoff decides
   before any step has crossed, so there the edge first sends a `Probe` of `probe_bytes`.
2. L_c = the previous step's edge compute (forward + encode) + the cloud's time for it + the
   measured latency; `runtime.adaptive.decide_on` (`plan.early_exit.decide_step`) decides with
   the byte model of `runtime.adaptive` (`frame_bytes_model`, `handoff_wire_bytes`).
3. The edge acts: keep / compress: the frame is coded at the decision's q̄ and the Step names it
   (`Step.q_bar`; the cloud decodes with the session's codec cut to that q̄, `with_q_bar`) —
   only with a server whose Opened says `adaptive_steps`, else the plan's q̄ and a note; a raw
   wire cannot compress (sent as it is, the row says so). drop_kv: at a handoff, the hidden
   states of every position cross instead of the KV rows (the cloud accepts hidden steps in a
   KV_CACHE session). stop: generation ends with the tokens so far (at the handoff: the local ones).
4. The trace row: the decision, q̄, I_kv, R, predicted L_t, edge compute, link time (exchange less
   cloud time), the cloud's time, measured = edge compute + the whole exchange; outage = measured > D.

I_kv on the network: a networked split sends hidden states only (the cloud keeps its own layers
[ℓ, L)), so split steps run with I_kv = 0; I_kv is the handoff's choice of payload (eq. 3).

`RemotePolicy.shape`: an emulated link (`runtime.link.LinkSpec`) the edge's payloads cross in
real time before they reach the socket — a slowed link on top of the real one, for tests and
what-if runs (`generate --cloud ... --link SPEC`). What the policy sees is still only what it
measures.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from splitcli.errors import SplitLLMError
from splitcli.plan.early_exit import ExitPolicy
from splitcli.runtime.adaptive import (AdaptiveResult, TraceRow, cannot_compress, decide_on, frame_bytes_model,
                                       handoff_wire_bytes, summarize, with_q_bar)
from splitcli.runtime.codec_wire import CodecWire
from splitcli.runtime.wire import encode_step
from splitcli.runtime.link import EmulatedLink, LinkSpec, MeasuredLink


@dataclass(frozen=True)
class RemotePolicy:
    """Algorithm 2 for a networked edge: the policy (D, q̄, q̄_min, I_kv, link model; see
    `runtime.adaptive.measured_link_model`), an optional emulated `shape` in front of the socket,
    the probe size and the measurement window (exchanges)."""

    policy: ExitPolicy
    shape: LinkSpec | None = None
    probe_bytes: int = 1500
    window: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.policy, ExitPolicy):
            raise SplitLLMError(f"RemotePolicy needs an ExitPolicy, got {type(self.policy).__name__}")
        if self.shape is not None and not isinstance(self.shape, LinkSpec):
            raise SplitLLMError(f"shape must be a LinkSpec or None, got {type(self.shape).__name__}")
        if isinstance(self.probe_bytes, bool) or not isinstance(self.probe_bytes, int) or not 1 <= self.probe_bytes <= 1 << 20:
            raise SplitLLMError(f"probe size must be an integer in [1, 1 MiB], got {self.probe_bytes!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise SplitLLMError(f"measurement window must be an integer >= 2 exchanges, got {self.window!r}")


@dataclass
class Exchange:
    """What one step's exchange measured (seconds)."""

    nbytes: int
    seconds: float      # handing the payload to gRPC -> the reply
    cloud_s: float      # what the cloud says it held the step

    @property
    def link_s(self) -> float:
        return max(self.seconds - self.cloud_s, 0.0)


class LiveRun:
    """One generation's controller: the measured link, the per-q̄ codec configs, the trace."""

    def __init__(self, settings: RemotePolicy, split, trace: list | None = None):
        self.settings = settings
        self.policy = settings.policy
        self.link = MeasuredLink(settings.window)
        self.shaper = EmulatedLink(settings.shape, real_time=True) if settings.shape is not None else None
        self.hidden = split.edge.parts.config.hidden_size
        self.base_wire = split.wire
        codec = split.wire if isinstance(split.wire, CodecWire) else None
        self.base_cfg = codec.cfg if codec is not None else None
        self.base_q_bar = self.base_cfg.q_bar if codec is not None else None
        self.cfgs = {}
        self.last_stats = None
        self.frame = frame_bytes_model(split.wire, self.hidden, last_stats=lambda: self.last_stats)
        self.rows: list[TraceRow] = [] if trace is None else trace
        self.notes: list[str] = []
        self.adaptive_server = False
        self.i_kv = self.policy.i_kv
        self.last_compute_s = 0.0
        self.last_cloud_s = 0.0
        self.stopped, self.stop_reason = False, ""
        self.step = 0  # the decode step being decided (the prefill is 0)

    # -- measuring -------------------------------------------------------------------------
    def shape(self, nbytes: int) -> None:
        """The emulated link, if any, carries `nbytes` first (sleeps for real)."""
        if self.shaper is not None:
            self.shaper.begin_step(self.step)
            self.shaper.deliver(nbytes)

    def opened(self, opened, nbytes: int, seconds: float) -> None:
        """The Open/Opened round trip: the first sample, and whether the cloud adapts per step."""
        self.adaptive_server = bool(opened.adaptive_steps)
        self.link.add(nbytes, seconds)
        if not self.adaptive_server:
            self.note("the cloud does not decode per-step q̄ (Opened.adaptive_steps unset): frames keep the plan's q̄")

    def measured(self, ex: Exchange) -> None:
        self.link.add(ex.nbytes, ex.link_s)
        self.last_cloud_s = ex.cloud_s

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # -- deciding --------------------------------------------------------------------------
    def per_step_bytes(self, rows: int = 1):
        return lambda q_bar, i_kv, w: self.frame(q_bar, rows)

    def handoff_bytes(self, kv_bytes: int, positions: int):
        return handoff_wire_bytes(self.per_step_bytes(), kv_bytes, lambda q_bar: self.frame(q_bar, positions))

    def decide(self, wire_bytes, policy: ExitPolicy | None = None):
        """(decision, rate) for the current step; the fixed part is the last step's edge and cloud time."""
        policy = policy or dataclasses.replace(self.policy, i_kv=0)  # split steps: hidden states only
        i_kv = min(self.i_kv, policy.i_kv)
        return decide_on(self.link, policy, self.step, self.last_compute_s + self.last_cloud_s, wire_bytes, i_kv)

    def q_bar_for(self, decision) -> tuple[int | None, str]:
        """q̄ this step's frame is coded at (None: raw wire) and a note when it is not the decision's."""
        if self.base_cfg is None:
            if decision.q_bar < self.policy.q_bar:
                return None, cannot_compress(self.base_wire, decision.q_bar)
            return None, ""
        if decision.q_bar != self.base_cfg.q_bar and not self.adaptive_server:
            return self.base_cfg.q_bar, f"the cloud cannot decode q̄ {decision.q_bar}: sent at the plan's q̄"
        return min(decision.q_bar, self.base_cfg.q_bar), ""

    # -- encoding --------------------------------------------------------------------------
    def encode(self, hidden: torch.Tensor, q_bar: int | None, ids: torch.Tensor | None = None,
               prev_id: int | None = None) -> tuple[bytes, int, int | None]:
        """hidden [N, H] -> (frame, Step.q_bar, prev_id for the next step): 0 names the session's own
        q̄. Coded with a config of this run's own, never by changing the split's wire (other requests
        share it). `ids`, `prev_id`: as `runtime.wire.encode_step` (a token-predictive wire's)."""
        if self.base_cfg is None:
            frame, prev_id = encode_step(self.base_wire, hidden, ids, prev_id)
            return frame, 0, prev_id
        from splitcli.codec import encode_with_stats

        q_bar = self.base_cfg.q_bar if q_bar is None else q_bar
        if q_bar not in self.cfgs:
            self.cfgs[q_bar] = self.base_cfg if q_bar == self.base_cfg.q_bar else with_q_bar(self.base_cfg, q_bar)
        frame, self.last_stats = encode_with_stats(hidden.detach(), self.cfgs[q_bar])
        return frame, 0 if q_bar == self.base_cfg.q_bar else q_bar, prev_id

    # -- recording -------------------------------------------------------------------------
    def row(self, stage: str, decision: str, reason: str, q_bar, i_kv: int, rate, predicted_s, compute_s,
            ex: Exchange | None, kv_bytes: int = 0, note: str = "", check: bool = True) -> None:
        deadline_ms = self.policy.deadline_s * 1e3
        link_ms = ex.link_s * 1e3 if ex is not None else 0.0
        measured = None if compute_s is None else 1e3 * (compute_s + (ex.seconds if ex is not None else 0.0))
        predicted = predicted_s * 1e3 if predicted_s is not None and math.isfinite(predicted_s) else None
        self.rows.append(TraceRow(
            self.step, stage, decision, reason, q_bar, i_kv, rate, predicted, None if compute_s is None else compute_s * 1e3,
            link_ms, measured, (ex.nbytes - kv_bytes) if ex is not None else 0, kv_bytes, 0,
            bool(check and measured is not None and measured > deadline_ms), note,
            cloud_ms=ex.cloud_s * 1e3 if ex is not None else None, latency_ms=self.link.latency_s * 1e3))

    def stop(self, stage: str, decision, rate) -> None:
        self.stopped, self.stop_reason = True, decision.reason
        self.row(stage, decision.step.value, decision.reason, None, self.i_kv, rate, None, None, None, check=False)

    def result(self, tokens: list[int]) -> AdaptiveResult:
        summary = summarize(self.rows, self.policy, self.stopped, self.stop_reason, len(tokens), self.notes)
        return AdaptiveResult(torch.tensor([tokens], dtype=torch.long), self.rows, summary)


