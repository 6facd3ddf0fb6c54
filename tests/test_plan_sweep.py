import math

import pytest

from splitcli.errors import SplitLLMError
from splitcli.plan.sweep import SweepPoint, sweep_max_tokens


def test_hand_values():
    points = sweep_max_tokens([0, 100, 250, 350, 1000], total_tokens=300,
                              wire_bytes_per_token=130.5, baseline_bytes_per_token=1152,
                              prompt_tokens=20)
    assert points[0] == SweepPoint(0, 0, 300, 300, 0.0, 0.0)
    assert points[1] == SweepPoint(100, 100, 200, 300, 120 * 130.5, 120 * 1152)
    assert points[2] == SweepPoint(250, 250, 50, 300, 270 * 130.5, 270 * 1152)
    assert points[3] == SweepPoint(350, 300, 0, 300, 320 * 130.5, 320 * 1152)
    assert points[4].edge_tokens == 300 and points[4].cloud_tokens == 0


def test_monotone_and_conserving():
    points = sweep_max_tokens(range(0, 500, 7), 333, 10.0, 20.0, 5)
    for p in points:
        assert p.edge_tokens + p.cloud_tokens == p.cloud_only_tokens == 333
        assert p.wire_bytes <= p.baseline_wire_bytes
    assert [p.cloud_tokens for p in points] == sorted((p.cloud_tokens for p in points), reverse=True)


def test_empty_and_zero():
    assert sweep_max_tokens([], 10, 1.0, 2.0) == ()
    (point,) = sweep_max_tokens([5], 0, 1.0, 2.0)
    assert point == SweepPoint(5, 0, 0, 0, 0.0, 0.0)


@pytest.mark.parametrize("kwargs", [
    dict(w_bars=[-1], total_tokens=1, wire_bytes_per_token=1.0, baseline_bytes_per_token=1.0),
    dict(w_bars=[1.5], total_tokens=1, wire_bytes_per_token=1.0, baseline_bytes_per_token=1.0),
    dict(w_bars=[1], total_tokens=-1, wire_bytes_per_token=1.0, baseline_bytes_per_token=1.0),
    dict(w_bars=[1], total_tokens=1, wire_bytes_per_token=math.nan, baseline_bytes_per_token=1.0),
    dict(w_bars=[1], total_tokens=1, wire_bytes_per_token=1.0, baseline_bytes_per_token=math.inf),
    dict(w_bars=[1], total_tokens=1, wire_bytes_per_token=1.0, baseline_bytes_per_token=1.0,
         prompt_tokens=-3),
])
def test_bad_inputs(kwargs):
    with pytest.raises(SplitLLMError):
        sweep_max_tokens(**kwargs)
