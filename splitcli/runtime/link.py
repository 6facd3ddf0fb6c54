"""A link emulator in the wire: every frame the edge sends costs emulated time, no root needed.

A frame of n bytes sent at step t costs

    seconds = tries * 8 n / R(t) + latency + jitter

Frames sent back to back pipeline: the sender is busy only while serializing, so a frame starts
when the previous one's last bit left and arrives `latency + jitter` after its own last bit. A
step's link time (`span_seconds`) is from its first send to its last arrival; the next step starts
no earlier than that (the edge waits for the cloud's token; the downlink is not modelled).

- R(t) is the rate schedule's rate at step t (bit/s). The driver says which step it is sending
  (`EmulatedLink.begin_step`); frames sent before any call belong to step 0.
- tries >= 1: each transmission is lost with probability `loss` and sent again (link-layer
  retransmission, as eq. (9) counts it: every try costs the whole serialization time 8 n / R).
- jitter is drawn uniformly from [-jitter, +jitter] per frame (netem's reading); the propagation
  time latency + jitter is clipped at 0.
- Randomness comes from one `random.Random(seed)`: the same spec and frame sizes give the same
  times, tries and jitter on every machine.
- The clock is virtual by default (`VirtualClock`): nothing sleeps, so tests are fast. With
  `real_time=True` the link also sleeps: each frame's serialization, and at the next
  `begin_step` whatever propagation is still in flight.

What the edge "measures" (`rate_estimate`): bytes over serialization time (retransmissions
included) of the last `estimate_window` frames, i.e. the delivery rate a transport reports (as
BBR's sampler does). Propagation latency is a known per-frame constant the edge adds to its own
compute (see `splitcli.runtime.adaptive`); jitter is unknown to it, which is what outages are made of.

Spec strings (`parse_link`), comma-separated fields:

    RATES[,LATENCY][,latency=T][,jitter=T][,loss=P][,seed=N]

RATES is one rate (`2Mbit/s`) or a schedule `RATE@STEP;RATE@STEP;...` with steps ascending from
0 (`10Mbit/s@0;0.5Mbit/s@8`: 10 Mbit/s for steps 0-7, then 0.5 Mbit/s). A bare second field is
the latency. Rates, times and loss use `splitcli.units` (`500kbit/s`, `20ms`, `1%` or `0.01`).
Quote the spec in a shell: `;` ends a command there.
"""

from __future__ import annotations

import bisect
import math
import random
import time
from dataclasses import dataclass, field, replace

from ..errors import SplitLLMError
from ..units import format_bitrate, format_time, parse_bitrate, parse_percent, parse_time
from .wire import Wire

MAX_SPEC_CHARS = 4096
MAX_SCHEDULE = 1024
MAX_TRIES = 10_000  # with loss < 1 this bounds an emulated frame, never a real one
_EXAMPLE = "2Mbit/s,20ms,jitter=5ms,loss=0.01 or '10Mbit/s@0;0.5Mbit/s@8,20ms'"


def _check_seconds(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value >= 0
    ):
        raise SplitLLMError(f"link {name} must be a finite time >= 0 s, got {value!r}")


@dataclass(frozen=True)
class LinkSpec:
    """A rate schedule ((first step, bit/s), ...) plus latency, jitter (s), frame loss and seed."""

    schedule: tuple[tuple[int, float], ...]
    latency_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, tuple) or not 1 <= len(self.schedule) <= MAX_SCHEDULE:
            raise SplitLLMError(f"link rate schedule needs 1..{MAX_SCHEDULE} (step, rate) entries")
        previous = -1
        for entry in self.schedule:
            if not (isinstance(entry, tuple) and len(entry) == 2):
                raise SplitLLMError(f"link rate schedule entries are (step, bit/s) pairs, got {entry!r}")
            step, rate = entry
            if isinstance(step, bool) or not isinstance(step, int) or step <= previous:
                raise SplitLLMError(f"link schedule steps must be integers ascending from 0, got {step!r}")
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (
                math.isfinite(rate) and rate > 0
            ):
                raise SplitLLMError(f"link rate must be a finite number of bit/s > 0, got {rate!r}")
            previous = step
        if self.schedule[0][0] != 0:
            raise SplitLLMError(f"link schedule must start at step 0, got {self.schedule[0][0]}")
        _check_seconds("latency", self.latency_s)
        _check_seconds("jitter", self.jitter_s)
        if isinstance(self.loss, bool) or not isinstance(self.loss, (int, float)) or not 0 <= self.loss < 1:
            raise SplitLLMError(f"link loss must be a probability in [0, 1), got {self.loss!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SplitLLMError(f"link seed must be an integer >= 0, got {self.seed!r}")

    def rate_at(self, step: int) -> float:
        """R(step) in bit/s: the last schedule entry whose first step is <= step."""
        starts = [s for s, _ in self.schedule]
        return float(self.schedule[max(bisect.bisect_right(starts, step) - 1, 0)][1])

    def describe(self) -> str:
        rates = ", ".join(f"{format_bitrate(r)} from step {s}" for s, r in self.schedule)
        return (f"{rates}; latency {format_time(self.latency_s)}, jitter ±{format_time(self.jitter_s)}, "
                f"loss {self.loss:g}, seed {self.seed}")


def _bad(text: str, detail: str, example: bool = True) -> SplitLLMError:
    tail = f"; expected e.g. {_EXAMPLE}" if example else ""  # unit errors already list their forms
    return SplitLLMError(f"invalid link {text!r}: {detail}{tail}")


def _parse_schedule(text: str, field_text: str) -> tuple[tuple[int, float], ...]:
    entries = []
    parts = [p.strip() for p in field_text.split(";")]
    for i, part in enumerate(parts):
        rate_text, at, step_text = part.partition("@")
        if not at:
            if len(parts) > 1:
                raise _bad(text, f"schedule entry {part!r} needs RATE@STEP")
            step = 0
        else:
            step_text = step_text.strip()
            if not step_text.isdigit() or len(step_text) > 9:
                raise _bad(text, f"schedule step {step_text!r} is not a step number")
            step = int(step_text)
        try:
            rate = parse_bitrate(rate_text.strip())
        except SplitLLMError as exc:
            raise _bad(text, str(exc), example=False) from None
        if rate <= 0:
            raise _bad(text, f"rate {rate_text.strip()!r} must be > 0")
        if entries and step <= entries[-1][0]:
            raise _bad(text, f"schedule steps must ascend, got {step} after {entries[-1][0]}")
        if i == 0 and step != 0:
            raise _bad(text, f"the schedule must start at step 0, got {step}")
        entries.append((step, rate))
    if len(entries) > MAX_SCHEDULE:
        raise _bad(text, f"more than {MAX_SCHEDULE} schedule entries")
    return tuple(entries)


def parse_link(text: str) -> LinkSpec:
    """LinkSpec from a spec string (grammar in the module docstring); SplitLLMError names the fault."""
    if not isinstance(text, str) or not text.strip():
        raise SplitLLMError(f"invalid link {text!r}: empty; expected e.g. {_EXAMPLE}")
    if len(text) > MAX_SPEC_CHARS:
        raise SplitLLMError(f"invalid link spec: longer than {MAX_SPEC_CHARS} characters")
    fields = [f.strip() for f in text.split(",")]
    schedule = _parse_schedule(text, fields[0])
    values: dict[str, str] = {}
    for i, item in enumerate(fields[1:]):
        key, eq, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not eq:
            key, value = ("latency", item) if i == 0 else ("", item)
        if key not in ("latency", "jitter", "loss", "seed"):
            raise _bad(text, f"unknown field {item!r} (fields: latency, jitter, loss, seed)")
        if key in values:
            raise _bad(text, f"{key} given twice")
        values[key] = value
    try:
        latency = parse_time(values.get("latency", 0.0))
        jitter = parse_time(values.get("jitter", 0.0))
        loss = parse_percent(values.get("loss", 0.0))
    except SplitLLMError as exc:
        raise _bad(text, str(exc), example=False) from None
    seed_text = values.get("seed", "0")
    if not seed_text.isdigit() or len(seed_text) > 18:
        raise _bad(text, f"seed {seed_text!r} is not a non-negative integer")
    if loss >= 1:
        raise _bad(text, f"loss {values['loss']!r} must be below 1 (100%)")
    return LinkSpec(schedule, latency, jitter, loss, int(seed_text))


@dataclass
class VirtualClock:
    """Emulated seconds since the link was made; `advance` never sleeps."""

    now_s: float = 0.0

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@dataclass(frozen=True)
class FrameRecord:
    """One frame on the emulated link. `estimate_bps` is the edge's rate estimate after it."""

    index: int
    step: int
    nbytes: int
    rate_bps: float          # the true rate the frame was sent at
    tries: int
    serialize_s: float       # tries * 8 n / R
    propagation_s: float     # latency + jitter (>= 0)
    sent_at_s: float         # clock when the first try started
    estimate_bps: float | None

    @property
    def seconds(self) -> float:
        """This frame's own time from first bit sent to arrival."""
        return self.serialize_s + self.propagation_s

    @property
    def arrival_s(self) -> float:
        return self.sent_at_s + self.serialize_s + self.propagation_s

    @property
    def retransmissions(self) -> int:
        return self.tries - 1


class EmulatedLink:
    """The stateful link: a clock, a seeded RNG and the record of every frame sent."""

    def __init__(self, spec: LinkSpec, *, estimate_window: int = 8, real_time: bool = False,
                 clock: VirtualClock | None = None):
        if isinstance(estimate_window, bool) or not isinstance(estimate_window, int) or estimate_window < 1:
            raise SplitLLMError(f"rate estimate window must be an integer >= 1 frame, got {estimate_window!r}")
        self.spec = spec
        self.estimate_window = estimate_window
        self.real_time = real_time
        self.clock = clock or VirtualClock()
        self.records: list[FrameRecord] = []
        self._step = 0
        self._in_flight_until = 0.0  # latest arrival of any frame sent so far
        self._rng = random.Random(spec.seed)

    @property
    def step(self) -> int:
        return self._step

    @property
    def latency_s(self) -> float:
        """The base propagation latency (what the edge would learn from a ping)."""
        return self.spec.latency_s

    def begin_step(self, step: int) -> None:
        """Frames from now on belong to `step` (and are sent at the schedule's rate for it)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise SplitLLMError(f"link step must be an integer >= 0, got {step!r}")
        wait = self._in_flight_until - self.clock.now_s
        if wait > 0:
            self.clock.advance(wait)
            if self.real_time:
                time.sleep(wait)
        self._step = step

    def transmit(self, nbytes: int) -> FrameRecord:
        """Charge one frame of `nbytes` bytes to the link; returns its record."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise SplitLLMError(f"frame size must be an integer >= 0 bytes, got {nbytes!r}")
        rate = self.spec.rate_at(self._step)
        tries = 1
        while self.spec.loss > 0 and self._rng.random() < self.spec.loss:
            tries += 1
            if tries > MAX_TRIES:
                raise SplitLLMError(f"emulated link lost one frame {MAX_TRIES} times in a row")
        jitter = self._rng.uniform(-self.spec.jitter_s, self.spec.jitter_s) if self.spec.jitter_s else 0.0
        serialize = tries * 8.0 * nbytes / rate
        propagation = max(self.spec.latency_s + jitter, 0.0)
        sent_at = self.clock.now_s
        self.clock.advance(serialize)
        self._in_flight_until = max(self._in_flight_until, sent_at + serialize + propagation)
        if self.real_time:
            time.sleep(serialize)
        record = FrameRecord(len(self.records), self._step, nbytes, rate, tries, serialize, propagation,
                             sent_at, None)
        self.records.append(record)
        # the estimate after a frame includes that frame: it is what the edge knows once it is acked
        self.records[-1] = record = replace(record, estimate_bps=self.rate_estimate())
        return record

    def rate_estimate(self) -> float | None:
        """Delivery rate (bit/s) over the last `estimate_window` frames; None before any timed frame."""
        recent = self.records[-self.estimate_window:]
        seconds = sum(r.serialize_s for r in recent)
        if seconds <= 0:
            return None
        return 8.0 * sum(r.nbytes for r in recent) / seconds

    def frames_since(self, index: int) -> list[FrameRecord]:
        """Records of the frames sent since `len(records)` was `index`."""
        return self.records[index:]

    def deliver(self, nbytes: int) -> FrameRecord:
        """Real time only: charge one frame and sleep until it has arrived (serialization, then
        propagation). A shaper in front of a real network: the edge calls it before handing a frame
        to the socket, so the real exchange it times includes this link."""
        if not self.real_time:
            raise SplitLLMError("deliver() sleeps for real: make the link with real_time=True")
        record = self.transmit(nbytes)  # sleeps the serialization
        time.sleep(record.propagation_s)
        self.clock.advance(record.propagation_s)
        return record


class MeasuredLink:
    """What an edge knows of a real link, from its own exchanges: samples (bytes sent, seconds on
    the link), where the seconds are an exchange's wall time (first byte handed to the socket ->
    reply) less the time the peer says it held the request. It fits

        seconds = latency + 8 n / R

    over the last `window` samples: least squares when their sizes differ enough to separate the
    two terms (the largest at least twice the smallest: a prefill or probe beside decode frames),
    else the last fitted latency is kept and R is what remains. The latency is clipped to
    [0, the smallest sample]; R is then 8 sum(n) / sum(seconds - latency) (a delivery rate, the
    transport's own retransmissions inside it). Same interface as `EmulatedLink` for the policy:
    `rate_estimate()` and `latency_s`.
    """

    def __init__(self, window: int = 8):
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise SplitLLMError(f"measured link window must be an integer >= 2 samples, got {window!r}")
        self.window = window
        self.samples: list[tuple[int, float]] = []
        self._latency = 0.0
        self._rate: float | None = None

    @property
    def latency_s(self) -> float:
        return self._latency

    def add(self, nbytes: int, seconds: float) -> None:
        """One exchange: `nbytes` sent, `seconds` on the link (clipped at 0: clocks are coarse)."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise SplitLLMError(f"sample size must be an integer >= 0 bytes, got {nbytes!r}")
        if not math.isfinite(seconds):
            raise SplitLLMError(f"sample time must be finite, got {seconds!r}")
        self.samples = (self.samples + [(nbytes, max(float(seconds), 0.0))])[-self.window:]
        self._fit()

    def _fit(self) -> None:
        n = [float(b) for b, _ in self.samples]
        t = [s for _, s in self.samples]
        floor = min(t)
        if len(n) >= 2 and max(n) > 0 and max(n) >= 2 * min(n):  # sizes far enough apart to fit both terms
            mean_n, mean_t = sum(n) / len(n), sum(t) / len(t)
            var = sum((x - mean_n) ** 2 for x in n)
            slope = sum((x - mean_n) * (y - mean_t) for x, y in zip(n, t)) / var
            if slope > 0:
                self._latency = mean_t - slope * mean_n
        self._latency = min(max(self._latency, 0.0), floor)
        busy = sum(y - self._latency for y in t)
        sent = sum(n)
        self._rate = 8.0 * sent / busy if busy > 0 and sent > 0 else None

    def rate_estimate(self) -> float | None:
        """Delivery rate (bit/s) after the latency; None before a sample that took any time."""
        return self._rate


def span_seconds(frames: list[FrameRecord]) -> float:
    """Link time of a group of frames (one step): first send to last arrival; 0 for none."""
    if not frames:
        return 0.0
    return max(f.arrival_s for f in frames) - min(f.sent_at_s for f in frames)


@dataclass
class LinkWire:
    """A `Wire` whose frames cross an `EmulatedLink`: encode = inner encode + transmit.

    `transfer` sends any other payload (a KV payload, say) over the same link. The charge is made
    on the sending side, inside `encode`; with `real_time=True` a session's encode timer therefore
    includes the link's time.
    """

    inner: Wire
    link: EmulatedLink
    name: str = field(init=False)

    def __post_init__(self) -> None:
        self.name = f"{self.inner.name}+link"

    @property
    def needs_ids(self) -> bool:
        return getattr(self.inner, "needs_ids", False)

    def encode(self, hidden, **ids) -> bytes:  # [N, H] -> frame; `ids`: a token-predictive inner wire's
        frame = self.inner.encode(hidden, **ids)
        self.link.transmit(len(frame))
        return frame

    def decode(self, frame: bytes):  # frame -> [N, H] float32
        return self.inner.decode(frame)

    def transfer(self, payload: bytes) -> bytes:
        self.link.transmit(len(payload))
        return payload


def transfer(wire: Wire, payload: bytes) -> bytes:
    """Send a non-hidden-state payload over `wire`: charged when the wire is a `LinkWire`."""
    if isinstance(wire, LinkWire):
        return wire.transfer(payload)
    return payload


def inner_wire(wire: Wire) -> Wire:
    """The wire under any `LinkWire` layers (the one that actually codes hidden states)."""
    while isinstance(wire, LinkWire):
        wire = wire.inner
    return wire
