"""The engine: validates requests and drives one scheduler/runner/output step at a time.

    add_request ──validate, resolve seed + max_tokens──> n child Requests ──> Scheduler
    step():  Scheduler.schedule() ──SchedulerOutput──> model_runner.execute_model()
             ──ModelRunnerOutput──> Scheduler.update_from_output() ──RequestUpdates──>
             OutputProcessor ──RequestOutputs──> caller
             (requests that hit a stop string are then finished in the scheduler)

    async scheduling: step() dispatches step k+1 (model_runner.dispatch) before it reads
    step k's tokens (model_runner.collect), so the device runs k+1 while the host updates
    requests and detokenizes k, and schedules k+2. With async_depth d, up to d dispatched
    steps are unread when the next is scheduled (d = 1, the default: k+1 while k runs;
    d = 2: k+2 too, so a slow host step has two device steps to hide behind).

Pure Python: this module never imports jax (the runner is handed in). It is not thread-safe;
the server's AsyncEngine calls it from a single thread.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from jaxpaged.config import EngineConfig
from jaxpaged.engine.output_processor import OutputProcessor, child_request_id
from jaxpaged.engine.request import Request, RequestStatus
from jaxpaged.engine.scheduler import Scheduler
from jaxpaged.engine.scheduler_output import RequestUpdate, SchedulerStats
from jaxpaged.outputs import RequestOutput
from jaxpaged.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_MAX_SEED = 2**31 - 1


@dataclass
class EngineStats:
    """The scheduler's snapshot plus the engine's cumulative token counters."""

    scheduler: SchedulerStats
    prompt_tokens_total: int
    """Prompt tokens of requests that produced their first token (cached ones included)."""
    generation_tokens_total: int
    num_unfinished_requests: int


class Engine:
    def __init__(self, config: EngineConfig, model_runner, tokenizer, seed: int = 0) -> None:
        self.config = config
        self.model_runner = model_runner
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(config.scheduler, config.cache)
        self.output_processor = OutputProcessor(tokenizer)
        self._rng = np.random.default_rng(seed)
        self.eos_token_ids = set(config.model.eos_token_ids)
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._in_flight: deque[tuple] = deque()
        """(SchedulerOutput, runner handle) of each dispatched step not read yet (async),
        oldest first."""
        self.async_depth = config.scheduler.async_depth
        """Dispatched steps that may be unread when the next is scheduled (async)."""

    @property
    def async_scheduling(self) -> bool:
        return self.scheduler.async_scheduling

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.config.model.vocab_size

    # ---- requests -------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> None:
        """Validates and queues a request; raises ValueError (-> HTTP 400) on bad input."""
        n = sampling_params.n
        ids = {request_id} | {child_request_id(i, request_id, n) for i in range(n)}
        parents, children = self.output_processor.parents, self.output_processor.child_to_parent
        if any(i in parents or i in children for i in ids):
            raise ValueError(f"Request id {request_id!r} is already in use.")
        prompt_token_ids = list(prompt_token_ids)
        max_tokens = self._validate(prompt_token_ids, sampling_params)
        params = sampling_params.clone()
        params.update_from_generation_config(self.eos_token_ids)
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        child_ids = self.output_processor.add_request(
            request_id, prompt, prompt_token_ids, params, arrival_time
        )
        for i, child_id in enumerate(child_ids):
            if params.seed is not None:
                seed = params.seed + i
            else:
                seed = int(self._rng.integers(0, _MAX_SEED))
            child_params = params.clone()
            child_params.n = 1
            request = Request(
                child_id, prompt_token_ids, child_params, max_tokens,
                arrival_time=arrival_time, priority=priority, seed=seed,
            )  # fmt: skip
            self.scheduler.add_request(request)

    def _validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Checks the prompt against the model and the pool; returns the resolved max_tokens."""
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("The prompt is empty; at least one token is required.")
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= self.vocab_size:
            bad = next(t for t in prompt_token_ids if not 0 <= t < self.vocab_size)
            raise ValueError(
                f"Token id {bad} is out of vocabulary; token ids must be in [0, {self.vocab_size})."
            )
        max_len = self.max_model_len
        if params.max_tokens is None:
            if num_prompt >= max_len:
                raise ValueError(
                    f"This model's maximum context length is {max_len} tokens. However, your "
                    f"prompt has {num_prompt} tokens, which leaves no room for the completion. "
                    "Please reduce the length of the prompt."
                )
            max_tokens = max_len - num_prompt
        else:
            max_tokens = params.max_tokens
            if num_prompt + max_tokens > max_len:
                raise ValueError(
                    f"This model's maximum context length is {max_len} tokens. However, you "
                    f"requested {num_prompt + max_tokens} tokens ({num_prompt} in the prompt, "
                    f"{max_tokens} for the completion). Please reduce the length of the "
                    "prompt or completion."
                )
        self._check_fits_in_pool(num_prompt, max_tokens)
        return max_tokens

    def _check_fits_in_pool(self, num_prompt: int, max_tokens: int) -> None:
        cache = self.config.cache
        if cache.num_blocks <= 0:
            return  # pool not sized (tests without a pool): nothing to check against
        # The last sampled token is never fed back, so its KV is never written.
        num_kv_tokens = num_prompt + max_tokens - 1
        needed = -(-num_kv_tokens // cache.block_size)
        usable = cache.num_blocks - 1  # block 0 is the null block
        if needed > usable:
            raise ValueError(
                f"The request needs {needed} KV cache blocks ({num_prompt} prompt + "
                f"{max_tokens} completion tokens, {cache.block_size} tokens per block), but "
                f"the pool holds only {usable}. Reduce the prompt or max_tokens, or start "
                "the engine with more KV blocks."
            )

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Aborts user requests (a parent id aborts all its children); unknown ids are ignored."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        child_ids = self.output_processor.abort_requests(list(request_ids))
        if child_ids:
            self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)
        self._settle_if_idle()

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.output_processor.get_num_unfinished_requests()

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self.async_scheduling:
            return self._step_async()
        scheduler_output = self._schedule()
        if scheduler_output is None:
            return []
        runner_output = self.model_runner.execute_model(scheduler_output)
        return self._update(scheduler_output, runner_output)

    def _schedule(self):
        """The next SchedulerOutput, or None if it has nothing for the runner to do."""
        scheduler_output = self.scheduler.schedule()
        now = time.monotonic()
        for new_req in scheduler_output.scheduled_new_reqs:
            self.output_processor.mark_scheduled(new_req.req_id, now)
        if scheduler_output.is_empty() and not scheduler_output.finished_req_ids:
            return None
        return scheduler_output

    def _step_async(self) -> list[RequestOutput]:
        # Schedule and dispatch steps while the oldest unread one runs on the device.
        while len(self._in_flight) <= self.async_depth:
            nxt = self._schedule()
            if nxt is None:
                break
            self._in_flight.append((nxt, self.model_runner.dispatch(nxt)))
        if not self._in_flight:
            return []
        scheduler_output, handle = self._in_flight.popleft()
        outputs = self._update(scheduler_output, self.model_runner.collect(handle))
        self._settle_if_idle()
        return outputs

    def _settle_if_idle(self) -> None:
        """With no unfinished request, nothing waits for the steps in flight: read them now
        (their results are all dropped), so an idle engine holds no device work or
        snapshots."""
        while self._in_flight and not self.has_unfinished_requests():
            scheduler_output, handle = self._in_flight.popleft()
            self._update(scheduler_output, self.model_runner.collect(handle))

    def _update(self, scheduler_output, runner_output) -> list[RequestOutput]:
        updates = self.scheduler.update_from_output(scheduler_output, runner_output)
        self._count_tokens(updates)
        processed = self.output_processor.process_outputs(updates)
        if processed.reqs_to_finish:
            self.scheduler.finish_requests(processed.reqs_to_finish, RequestStatus.FINISHED_STOPPED)
        return processed.request_outputs

    def _count_tokens(self, updates: list[RequestUpdate]) -> None:
        generated = prompts = 0
        for update in updates:
            num_new = len(update.new_token_ids)
            generated += num_new
            if num_new and update.request.num_output_tokens == num_new:
                prompts += update.request.num_prompt_tokens
        self.generation_tokens_total += generated
        self.prompt_tokens_total += prompts

    def get_stats(self) -> EngineStats:
        return EngineStats(
            scheduler=self.scheduler.make_stats(),
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            num_unfinished_requests=self.get_num_unfinished_requests(),
        )
