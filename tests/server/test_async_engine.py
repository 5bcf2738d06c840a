"""AsyncEngine over the real Engine and a scripted runner (no jax): streams, aborts, errors."""

from __future__ import annotations

import asyncio
import time

import pytest

from jaxpaged.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineNotAcceptingError,
    RequestSpec,
)
from jaxpaged.sampling_params import SamplingParams
from tests.engine.test_engine import FakeModelRunner, make_engine


class _SlowRunner(FakeModelRunner):
    """Each step takes a little time, so requests are still running when the test acts."""

    def execute_model(self, out):
        time.sleep(0.002)
        return super().execute_model(out)


def _async_engine(runner_cls=FakeModelRunner, **kw) -> AsyncEngine:
    engine, _, _ = make_engine(lambda r, i: 65, **kw)
    engine.model_runner = runner_cls(lambda r, i: 65, engine.vocab_size)
    return AsyncEngine(engine).start()


def _spec(rid, max_tokens=5, **kw):
    return RequestSpec(
        rid, None, [5, 6, 7], SamplingParams(max_tokens=max_tokens, output_kind="delta", **kw)
    )


def test_streams_many_requests_concurrently():
    ae = _async_engine()

    async def one(i):
        tokens = []
        async for out in ae.generate(_spec(f"r{i}", max_tokens=3 + i)):
            tokens += out.outputs[0].token_ids
        return len(tokens)

    async def main():
        return await asyncio.gather(*(one(i) for i in range(8)))

    try:
        assert asyncio.run(main()) == [3 + i for i in range(8)]
        assert ae.num_in_flight == 0 and ae.is_healthy()
    finally:
        ae.shutdown()


def test_validation_error_reaches_the_caller_and_adds_nothing():
    ae = _async_engine(max_model_len=64)

    async def main():
        with pytest.raises(ValueError, match="maximum context length is 64"):
            await ae.add_requests([_spec("ok", 5), _spec("too-long", 100)])

    try:
        asyncio.run(main())
        assert ae.num_in_flight == 0
        time.sleep(0.05)
        assert not ae.engine.has_unfinished_requests()
    finally:
        ae.shutdown()


def test_closing_a_stream_early_aborts_and_frees_blocks():
    ae = _async_engine(_SlowRunner)
    free = ae.get_stats().scheduler.num_free_blocks

    async def main():
        stream = await ae.add_requests([_spec("a", 100), _spec("b", 100)])
        async with stream:
            async for _ in stream:
                break  # leave after the first output: both requests must be aborted

    try:
        asyncio.run(main())
        deadline = time.monotonic() + 5
        while ae.get_stats().scheduler.num_free_blocks != free or ae.num_in_flight:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert ae.get_stats().generation_tokens_total < 200
    finally:
        ae.shutdown()


def test_drain_stops_accepting_and_aborts_leftovers():
    ae = _async_engine(_SlowRunner)

    async def main():
        stream = await ae.add_requests([_spec("long", 120)])
        finished_cleanly = await ae.drain(timeout=0.05)
        with pytest.raises(EngineNotAcceptingError):
            await ae.add_requests([_spec("late")])
        outs = [o async for o in stream]  # ends once the abort reaches the stream
        return finished_cleanly, outs

    try:
        finished_cleanly, outs = asyncio.run(main())
        assert not finished_cleanly and not any(o.finished for o in outs)
    finally:
        ae.shutdown()


def test_crashing_step_kills_engine_and_fails_streams():
    class Crash(FakeModelRunner):
        def execute_model(self, out):
            raise RuntimeError("boom")

    ae = _async_engine(Crash)

    async def main():
        stream = await ae.add_requests([_spec("x")])
        with pytest.raises(EngineDeadError, match="boom"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await ae.add_requests([_spec("y")])

    asyncio.run(main())
    assert not ae.is_healthy()
    ae.shutdown()


def test_idle_engine_thread_sleeps():
    """No polling: an idle engine thread makes no step calls at all."""
    ae = _async_engine()
    try:
        steps_before = ae.engine.model_runner.num_steps
        time.sleep(0.2)
        assert ae.engine.model_runner.num_steps == steps_before
        assert ae.is_healthy()
    finally:
        ae.shutdown()
    assert not ae._thread.is_alive()
