"""The link emulator: spec parsing, emulated times, loss and jitter, the rate estimate, the wire."""

from __future__ import annotations

import time

import pytest
import torch

from splitcli.errors import SplitLLMError
from splitcli.runtime.link import EmulatedLink, LinkSpec, LinkWire, inner_wire, parse_link, span_seconds, transfer
from splitcli.runtime.wire import RawWire


def test_parse_the_cli_examples():
    spec = parse_link("2Mbit/s,20ms,jitter=5ms,loss=0.01")
    assert spec == LinkSpec(((0, 2e6),), 0.02, 0.005, 0.01, 0)
    sched = parse_link("10Mbit/s@0;0.5Mbit/s@8,20ms")
    assert sched.schedule == ((0, 10e6), (8, 0.5e6)) and sched.latency_s == pytest.approx(0.02)
    assert [sched.rate_at(s) for s in (0, 7, 8, 100)] == [10e6, 10e6, 0.5e6, 0.5e6]
    assert parse_link(" 1 MB/s , latency=1s, loss=2%, seed=7 ") == LinkSpec(((0, 8e6),), 1.0, 0.0, 0.02, 7)
    assert "500.0 kbit/s from step 8" in sched.describe()


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("fast", "bit rate"),
    ("0bit/s", "> 0"),
    ("10Mbit/s@3", "start at step 0"),
    ("1Mbit/s@0;2Mbit/s@0", "ascend"),
    ("1Mbit/s;2Mbit/s@3", "RATE@STEP"),
    ("1Mbit/s@x", "step number"),
    ("1Mbit/s,20ms,latency=3ms", "twice"),
    ("1Mbit/s,color=red", "unknown field"),
    ("1Mbit/s,20ms,30ms", "unknown field"),
    ("1Mbit/s,loss=1", "below 1"),
    ("1Mbit/s,loss=-0.1", "negative"),
    ("1Mbit/s,jitter=5parsecs", "unknown unit"),
    ("1Mbit/s,seed=-3", "seed"),
    ("1Mbit/s," + "x" * 5000, "longer than"),
])
def test_bad_specs_say_what_is_wrong_on_one_line(text, words):
    with pytest.raises(SplitLLMError) as err:
        parse_link(text)
    message = str(err.value)
    assert words in message and "\n" not in message


@pytest.mark.parametrize("kwargs", [
    dict(schedule=()), dict(schedule=((1, 1e6),)), dict(schedule=((0, 0.0),)),
    dict(schedule=((0, float("inf")),)), dict(schedule=((0, 1e6), (0, 2e6))),
    dict(schedule=((0, 1e6),), latency_s=-1.0), dict(schedule=((0, 1e6),), jitter_s=float("nan")),
    dict(schedule=((0, 1e6),), loss=1.0), dict(schedule=((0, 1e6),), seed=-1),
])
def test_spec_validates_direct_construction(kwargs):
    with pytest.raises(SplitLLMError):
        LinkSpec(**kwargs)


def test_lossless_frame_time_is_serialization_plus_latency_on_a_virtual_clock():
    link = EmulatedLink(parse_link("1Mbit/s@0;0.5Mbit/s@2,20ms"))
    start = time.perf_counter()
    big = link.transmit(1_250_000)                 # 10 Mbit at 1 Mbit/s: 10 emulated seconds
    assert time.perf_counter() - start < 1.0        # ... and no real sleeping
    assert big.seconds == pytest.approx(10.02) and big.tries == 1 and big.retransmissions == 0
    link.begin_step(2)
    small = link.transmit(1000)
    assert small.rate_bps == 0.5e6 and small.seconds == pytest.approx(8000 / 0.5e6 + 0.02)
    assert small.sent_at_s == pytest.approx(10.02)  # the step began after the last frame arrived


def test_frames_of_one_step_pipeline_behind_one_latency():
    link = EmulatedLink(parse_link("8Mbit/s,30ms"))
    link.begin_step(1)
    frames = [link.transmit(1000), link.transmit(3000)]  # 1 ms and 3 ms of serialization
    assert frames[1].sent_at_s == pytest.approx(frames[0].sent_at_s + 0.001)
    assert span_seconds(frames) == pytest.approx(0.004 + 0.030)
    assert span_seconds([]) == 0.0


def test_rate_estimate_is_delivery_rate_over_the_window():
    link = EmulatedLink(parse_link("10Mbit/s@0;0.5Mbit/s@3,20ms"), estimate_window=2)
    assert link.rate_estimate() is None
    for step in range(3):
        link.begin_step(step)
        link.transmit(1000)
    assert link.rate_estimate() == pytest.approx(10e6)   # latency is not in the estimate
    link.begin_step(3)
    record = link.transmit(1000)
    # one frame at 10 Mbit/s and one at 0.5 Mbit/s, equal sizes: 2 x 8000 bits over both times
    assert record.estimate_bps == pytest.approx(16000 / (8000 / 10e6 + 8000 / 0.5e6))
    link.begin_step(4)
    link.transmit(1000)
    assert link.rate_estimate() == pytest.approx(0.5e6)


def test_loss_is_seeded_and_retransmits_at_the_spec_rate():
    def run(seed):
        link = EmulatedLink(parse_link(f"1Mbit/s,10ms,jitter=2ms,loss=0.3,seed={seed}"))
        return [link.transmit(100) for _ in range(3000)]

    first, again, other = run(1), run(1), run(2)
    assert [(r.tries, r.propagation_s) for r in first] == [(r.tries, r.propagation_s) for r in again]
    assert [r.tries for r in first] != [r.tries for r in other]
    mean_tries = sum(r.tries for r in first) / len(first)
    assert mean_tries == pytest.approx(1 / (1 - 0.3), rel=0.05)  # geometric number of tries
    assert all(r.serialize_s == pytest.approx(r.tries * 800 / 1e6) for r in first)
    assert all(0.008 - 1e-12 <= r.propagation_s <= 0.012 + 1e-12 for r in first)
    # the estimate counts retransmissions: the goodput is below the line rate
    assert first[-1].estimate_bps < 1e6


def test_jitter_never_makes_propagation_negative():
    link = EmulatedLink(parse_link("1Mbit/s,1ms,jitter=50ms"))
    assert min(link.transmit(10).propagation_s for _ in range(500)) == 0.0


def test_real_time_link_sleeps():
    link = EmulatedLink(parse_link("1Mbit/s,20ms"), real_time=True)
    start = time.perf_counter()
    link.transmit(1250)                 # 10 ms of serialization
    link.begin_step(1)                  # waits for the 20 ms in flight
    assert time.perf_counter() - start >= 0.029


def test_link_wire_charges_frames_and_passes_bytes_through():
    link = EmulatedLink(parse_link("1Mbit/s,5ms"))
    raw = RawWire("fp32")
    wire = LinkWire(raw, link)
    hidden = torch.randn(3, 8)
    frame = wire.encode(hidden)
    assert frame == raw.encode(hidden) and torch.equal(wire.decode(frame), hidden)
    assert link.records[-1].nbytes == len(frame)
    assert transfer(wire, b"x" * 100) == b"x" * 100 and link.records[-1].nbytes == 100
    assert transfer(raw, b"abc") == b"abc" and len(link.records) == 2  # a plain wire charges nothing
    assert inner_wire(LinkWire(wire, link)) is raw and wire.name == "raw-fp32+link"


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_link_rejects_bad_steps_and_sizes(bad):
    link = EmulatedLink(parse_link("1Mbit/s"))
    with pytest.raises(SplitLLMError):
        link.begin_step(bad)
    with pytest.raises(SplitLLMError):
        link.transmit(bad)


@pytest.mark.parametrize("bad", [0, 2.0, True])
def test_link_rejects_bad_estimate_windows(bad):
    with pytest.raises(SplitLLMError, match="window"):
        EmulatedLink(parse_link("1Mbit/s"), estimate_window=bad)
