"""The device-idle measure of benchmarks/device_idle.py: interval union and plane filter."""

from types import SimpleNamespace as NS

import pytest

from benchmarks.device_idle import busy_and_span, device_intervals


def test_busy_is_the_union_of_overlapping_intervals():
    # [0,10) and [5,12) overlap, [20,30) stands alone, [22,25) lies inside it.
    busy, span = busy_and_span([(20, 30), (0, 10), (5, 12), (22, 25)])
    assert (busy, span) == (22, 30)
    assert busy_and_span([]) == (0.0, 0.0)


def test_only_gpu_stream_lines_count():
    ev = lambda start, dur: NS(start_ns=start, duration_ns=dur)  # noqa: E731
    planes = [
        NS(name="/device:GPU:0", lines=[
            NS(name="Stream #13(compute)", events=[ev(0, 5), ev(10, 5)]),
            NS(name="XLA Modules", events=[ev(0, 100)]),  # spans the idle time too
        ]),
        NS(name="/host:CPU", lines=[NS(name="Stream #1", events=[ev(50, 50)])]),
    ]  # fmt: skip
    assert device_intervals(planes) == [(0, 5), (10, 15)]
    busy, span = busy_and_span(device_intervals(planes))
    assert 1 - busy / span == pytest.approx(1 / 3)
