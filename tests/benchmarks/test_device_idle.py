"""The device-idle measure of benchmarks/device_idle.py: interval union, plane filter and
the per-kernel table."""

from types import SimpleNamespace as NS

import pytest

from benchmarks.device_idle import (
    busy_and_span,
    device_intervals,
    host_table,
    kernel_table,
    kind_of,
)


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


def test_kernel_table_sums_per_step_and_by_kind():
    ev = lambda name, dur: NS(name=name, start_ns=0, duration_ns=dur)  # noqa: E731
    events = [ev("sm90_xmma_gemm_bf16", 3000), ev("sm90_xmma_gemm_bf16", 1000),
              ev("loop_fusion_7", 500), ev("mosaic_gpu_decode", 2000)]  # fmt: skip
    planes = [
        NS(name="/device:GPU:0", lines=[NS(name="Stream #13(compute)", events=events),
                                        NS(name="XLA Ops", events=[ev("fusion", 99000)])]),
        NS(name="/host:CPU", lines=[NS(name="Stream #1", events=[ev("gemm", 7000)])]),
    ]  # fmt: skip
    table = kernel_table(planes, steps=2)
    assert table["launches_per_step"] == 2.0
    assert table["device_us_per_step"] == pytest.approx(3.25)
    assert table["kernels"][0] == {"name": "sm90_xmma_gemm_bf16", "kind": "matmul",
                                   "launches_per_step": 1.0, "us_per_step": 2.0}  # fmt: skip
    assert table["kinds"]["attention"]["us_per_step"] == pytest.approx(1.0)
    assert table["kinds"]["other"]["launches_per_step"] == 0.5
    assert kind_of("nvjet_tst_128x64") == "matmul" and kind_of("input_scatter_fusion") == "scatter"


def test_host_table_keys_by_thread_and_name():
    ev = lambda name, dur: NS(name=name, start_ns=0, duration_ns=dur)  # noqa: E731
    planes = [
        NS(name="/host:CPU", lines=[
            NS(name="launcher", events=[ev("Execute", 4e6), ev("cuLaunchKernel", 1e6),
                                        ev("cuLaunchKernel", 1e6)]),
            NS(name="main", events=[ev("cuLaunchKernel", 5e5)]),
        ]),
        NS(name="/device:GPU:0", lines=[NS(name="Stream #1", events=[ev("gemm", 9e9)])]),
    ]  # fmt: skip
    rows = host_table(planes, steps=2)
    assert [(r["thread"], r["name"]) for r in rows] == [
        ("launcher", "Execute"),
        ("launcher", "cuLaunchKernel"),
        ("main", "cuLaunchKernel"),
    ]
    assert rows[1]["count_per_step"] == 1.0 and rows[1]["ms_per_step"] == pytest.approx(1.0)
