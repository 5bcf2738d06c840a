"""benchmarks/engine_host.py times the real engine's host stages at full batch."""

from benchmarks.engine_host import run


def test_times_every_stage_at_full_batch():
    res = run(batch=8, rounds=2)
    assert set(res) == {"schedule", "update_from_output", "process_outputs"}
    for vals in res.values():
        assert len(vals) == 2 and all(0 < v < 1e3 for v in vals)
