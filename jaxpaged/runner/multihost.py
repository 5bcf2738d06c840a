"""Multi-process serving: process 0 schedules, every process runs the same steps.

    process 0:  Engine ─► MirroredRunner.dispatch(so) ─► publish pickle(so) as step n
                                                      ─► ModelRunner.dispatch(so)
    process i:  follow(runner): read step n ─► ModelRunner.execute_model(so) ─► n + 1

Requests reach only process 0 (the HTTP server), but a jitted step over a mesh that spans
processes needs every process to call it with the same inputs. The SchedulerOutput is the
whole contract between scheduler and runner, so shipping it through jax.distributed's
key-value store (the coordinator that jax.distributed.initialize started) is enough: the
followers' persistent batches apply the same diffs and build the same inputs.

Keys are deleted once read: when the leader's step n returns from the device, every
follower has joined its collectives, so has read step n (and every key before it). Under
async scheduling the leader dispatches step n+1 before it reads step n; the followers run
each step synchronously, which gives the same inputs (the token the leader feeds on device
is on their host already). Steps without device work (only diffs) stay until the next step
that has some.
"""

from __future__ import annotations

import logging
import pickle

from jaxpaged.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

_PREFIX = "jaxpaged/step/"
_STOP = b"stop"
_POLL_MS = 60_000


def _client():
    from jax._src import distributed

    if distributed.global_state.client is None:
        raise RuntimeError("jax.distributed is not initialized (pass --distributed-coordinator).")
    return distributed.global_state.client


class MirroredRunner:
    """Process 0's runner: publishes each step for the followers, then runs it."""

    def __init__(self, runner):
        self.runner = runner
        self.client = _client()
        self.step = 0
        self.pending: list[tuple[int, str]] = []
        """(step number, key) of published steps not known to be read by every follower."""

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def _publish(self, payload: bytes) -> None:
        key = f"{_PREFIX}{self.step}"
        self.client.key_value_set_bytes(key, payload)
        self.pending.append((self.step, key))
        self.step += 1

    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.dispatch(so))

    def dispatch(self, so: SchedulerOutput):
        self._publish(pickle.dumps(so, protocol=pickle.HIGHEST_PROTOCOL))
        return self.step, bool(so.num_scheduled_tokens), self.runner.dispatch(so)

    def collect(self, handle) -> ModelRunnerOutput:
        num_published, has_work, inner = handle
        out = self.runner.collect(inner)
        if has_work:
            # This step's device work synchronised every process, so each has read every
            # key up to it; a step dispatched after it (async scheduling) may not be read yet.
            for _, key in [p for p in self.pending if p[0] < num_published]:
                self.client.key_value_delete(key)
            self.pending = [p for p in self.pending if p[0] >= num_published]
        return out

    def stop(self) -> None:
        """Tell the followers to return from follow()."""
        self._publish(_STOP)


def follow(runner) -> int:
    """Run the leader's steps until it stops; returns the number of steps run."""
    client, step = _client(), 0
    while True:
        key = f"{_PREFIX}{step}"
        try:
            payload = client.blocking_key_value_get_bytes(key, _POLL_MS)
        except Exception as e:  # the client raises a plain error on timeout: keep waiting
            if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                raise
            continue
        if payload == _STOP:
            logger.info("leader stopped after %d steps", step)
            return step
        runner.execute_model(pickle.loads(payload))
        step += 1
