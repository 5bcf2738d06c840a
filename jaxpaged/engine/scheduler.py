"""Token-centric scheduler (vLLM V1): decides which requests compute how many tokens each step.

    add_request ──> waiting ──schedule()──> running ──update_from_output()──> finished
                      ^                        │
                      └──── preempted ─────────┘  (blocks freed, recomputed from the cache)

schedule() spends a token budget (max_num_batched_tokens) over at most max_num_seqs requests:
running requests first (decode tokens or the next prefill chunk), then, if nothing had to be
preempted, waiting requests in policy order, each starting after its prefix-cache hit.
num_computed_tokens advances at schedule time; update_from_output() appends the sampled
token of every request whose scheduled tokens reached the end of its tokens, checks stop
conditions, and caches the blocks the step filled.

Async scheduling (SchedulerConfig.async_scheduling): schedule() for step k+1 runs while
step k is still on the device, so update_from_output(k) comes after schedule(k+1). A request
that samples in a step gets an output placeholder at schedule time; the next schedule()
counts it as a token (the runner feeds it on device) and update_from_output() replaces it
with the real token. Steps are updated in the order they were scheduled, against the
Request objects they were scheduled with (a finished request's id may be reused at once).
A request whose placeholder already reaches its length limit is not scheduled again; one
that stops on a token while its next step is in flight has that step's output dropped.
Device steps run in order, so KV that an in-flight step writes is there for any later step
that reads it (prefix hits on just-filled blocks included).

No deadlock when blocks are tight: the oldest (fcfs) or most important (priority) running
request is never the victim while another is running, and a lone request fits the pool
(the engine rejects requests that cannot), so some request always progresses.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections import deque
from collections.abc import Iterable, Iterator

from jaxpaged.config import CacheConfig, SchedulerConfig
from jaxpaged.engine.block_pool import KVCacheBlock
from jaxpaged.engine.kv_cache_manager import KVCacheManager, cdiv
from jaxpaged.engine.request import Request, RequestStatus
from jaxpaged.engine.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    RequestUpdate,
    SchedulerOutput,
    SchedulerStats,
)

logger = logging.getLogger(__name__)

_RUNNING, _PREEMPTED = RequestStatus.RUNNING, RequestStatus.PREEMPTED


class WaitingQueue:
    """Waiting requests in admission order.

    fcfs: arrival order, and a preempted request goes back to the front.
    priority: sorted by (priority, arrival_time); a preempted request goes before its equals.
    """

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self._keys: list[tuple[int, float, int]] = []
        self._requests: list[Request] = []
        # Tie-breaker that keeps add order among equal keys, and front-of-ties for prepend.
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests)

    def _key(self, request: Request, front: bool) -> tuple[int, float, int]:
        seq = -next(self._counter) if front else next(self._counter)
        if self.policy == "priority":
            return (request.priority, request.arrival_time, seq)
        return (0, 0.0, seq)

    def add(self, request: Request, front: bool = False) -> None:
        key = self._key(request, front)
        i = bisect.bisect(self._keys, key)
        self._keys.insert(i, key)
        self._requests.insert(i, request)

    def peek(self) -> Request:
        return self._requests[0]

    def pop(self) -> Request:
        self._keys.pop(0)
        return self._requests.pop(0)

    def remove(self, request: Request) -> None:
        i = self._requests.index(request)
        del self._keys[i], self._requests[i]


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig) -> None:
        if not scheduler_config.enable_chunked_prefill and (
            scheduler_config.max_num_batched_tokens < scheduler_config.max_model_len
        ):
            raise ValueError(
                f"without chunked prefill, max_num_batched_tokens "
                f"({scheduler_config.max_num_batched_tokens}) must be >= max_model_len "
                f"({scheduler_config.max_model_len}), or long prompts could never run."
            )
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.block_size = cache_config.block_size
        self.max_model_len = scheduler_config.max_model_len
        threshold = scheduler_config.long_prefill_token_threshold
        self._prefill_chunk_cap = (
            threshold if threshold > 0 and scheduler_config.enable_chunked_prefill else 0
        )
        """Most tokens one request computes per step (0: no cap besides the budget)."""
        self.kv_cache_manager = KVCacheManager(
            num_blocks=cache_config.num_blocks,
            block_size=cache_config.block_size,
            enable_caching=cache_config.enable_prefix_caching,
            max_model_len=scheduler_config.max_model_len,
        )
        self.requests: dict[str, Request] = {}
        """Unfinished requests (waiting or running) by id."""
        self.waiting = WaitingQueue(scheduler_config.policy)
        self.running: list[Request] = []
        """In admission order: fcfs preempts from the end."""
        self.finished_req_ids: set[str] = set()
        """Finished or aborted since the last schedule(); sent so the runner drops them."""
        self.num_preemptions_total = 0
        self.async_scheduling = scheduler_config.async_scheduling
        self._scheduled: deque[dict[str, tuple[Request, bool]]] = deque()
        """Per scheduled step not yet updated: req_id -> (request, whether it samples)."""

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        # The engine rejects these with a clear error; reaching here is an engine bug.
        max_kv_tokens = request.num_prompt_tokens + request.max_tokens - 1
        assert request.num_prompt_tokens + request.max_tokens <= self.max_model_len, request
        assert cdiv(max_kv_tokens, self.block_size) <= self.cache_config.num_blocks - 1, request
        assert request.request_id not in self.requests, f"duplicate id {request.request_id}"
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_requests(
        self, request_ids: str | Iterable[str], finished_status: RequestStatus
    ) -> list[Request]:
        """Abort (or stop, e.g. on a stop string) requests now; unknown or done ids are skipped.

        Their blocks are freed at once and their ids go out in the next finished_req_ids.
        """
        assert RequestStatus.is_finished(finished_status), finished_status
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = finished_status
            self._free_request(request)
            finished.append(request)
        return finished

    def _free_request(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        self.finished_req_ids.add(request.request_id)
        del self.requests[request.request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()

    def make_stats(self) -> SchedulerStats:
        manager = self.kv_cache_manager
        return SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=manager.usage,
            num_free_blocks=manager.get_num_free_blocks(),
            prefix_cache_queries_total=manager.prefix_cache_queries,
            prefix_cache_hits_total=manager.prefix_cache_hits,
            num_preemptions_total=self.num_preemptions_total,
        )

    # ---- schedule ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        step = _Step(self.scheduler_config.max_num_batched_tokens)
        self._schedule_running(step)
        if not step.preempted:
            self._schedule_waiting(step)

        running = step.scheduled_running
        cached = CachedRequestData(
            req_ids=[request.request_id for request in running],
            new_block_ids=[step.new_block_ids[request.request_id] for request in running],
            num_computed_tokens=[request.num_computed_tokens for request in running],
        )
        # vLLM V1 advances progress at schedule time; the runner gets where each chunk starts.
        scheduled = {}
        requests, placeholders = self.requests, self.async_scheduling
        for request_id, num_tokens in step.num_scheduled_tokens.items():
            request = requests[request_id]
            request.num_computed_tokens += num_tokens
            samples = request.num_computed_tokens == (
                len(request.all_token_ids) + request.num_output_placeholders
            )
            if samples and placeholders:
                request.num_output_placeholders += 1
            scheduled[request_id] = (request, samples)
        if scheduled:
            self._scheduled.append(scheduled)

        preempted_ids = {request.request_id for request in step.preempted}
        output = SchedulerOutput(
            scheduled_new_reqs=step.new_reqs,
            scheduled_cached_reqs=cached,
            num_scheduled_tokens=step.num_scheduled_tokens,
            total_num_scheduled_tokens=sum(step.num_scheduled_tokens.values()),
            finished_req_ids=self.finished_req_ids | preempted_ids,
            preempted_req_ids=preempted_ids,
        )
        self.finished_req_ids = set()
        return output

    def _num_new_tokens(self, request: Request, num_computed_tokens: int, budget: int) -> int:
        placeholders = request.num_output_placeholders
        num_tokens = len(request.all_token_ids) + placeholders
        if placeholders and (
            len(request.output_token_ids) + placeholders >= request.max_tokens
            or num_tokens >= self.max_model_len
        ):
            return 0  # the token in flight ends it (length): nothing more to compute
        num_new_tokens = num_tokens - num_computed_tokens
        if self._prefill_chunk_cap:
            num_new_tokens = min(num_new_tokens, self._prefill_chunk_cap)
        return min(num_new_tokens, budget)

    def _schedule_running(self, step: _Step) -> None:
        # Runs for every running request every step: locals instead of attribute lookups.
        num_new, allocate = self._num_new_tokens, self._allocate_or_preempt
        scheduled, new_block_ids = step.scheduled_running, step.new_block_ids
        num_scheduled = step.num_scheduled_tokens
        # Iterate over a snapshot: victims leave self.running (and turn PREEMPTED) mid-loop.
        for request in list(self.running):
            if step.token_budget <= 0:
                break
            if request.status != _RUNNING:
                continue
            num_new_tokens = num_new(request, request.num_computed_tokens, step.token_budget)
            if num_new_tokens <= 0:
                continue  # its sampled token is not back yet, or that token is its last
            new_blocks = allocate(request, num_new_tokens, step)
            if new_blocks is None:
                # It was the victim itself. Under fcfs it was the last running request; under
                # priority the more important ones after it may still fit.
                continue
            scheduled.append(request)
            new_block_ids[request.request_id] = [b.block_id for b in new_blocks]
            num_scheduled[request.request_id] = num_new_tokens
            step.token_budget -= num_new_tokens

    def _allocate_or_preempt(
        self, request: Request, num_new_tokens: int, step: _Step
    ) -> list[KVCacheBlock] | None:
        """Preempt victims until request's slots fit; None if request itself was preempted."""
        while True:
            new_blocks = self.kv_cache_manager.allocate_slots(request, num_new_tokens)
            if new_blocks is not None:
                return new_blocks
            victim = self._pick_victim()
            self._preempt(victim, step)
            if victim is request:
                return None

    def _pick_victim(self) -> Request:
        if self.scheduler_config.policy == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]

    def _preempt(self, request: Request, step: _Step) -> None:
        """Preempt by recompute: free the blocks (they stay cached) and requeue at the front."""
        self.running.remove(request)
        if request in step.scheduled_running:
            # Only under 'priority' can the victim be one already scheduled this step.
            step.scheduled_running.remove(request)
            step.token_budget += step.num_scheduled_tokens.pop(request.request_id)
            del step.new_block_ids[request.request_id]
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        step.preempted.append(request)
        self.waiting.add(request, front=True)
        logger.debug("preempted %s", request)

    def _schedule_waiting(self, step: _Step) -> None:
        manager = self.kv_cache_manager
        max_num_seqs = self.scheduler_config.max_num_seqs
        while len(self.waiting) and step.token_budget > 0 and len(self.running) < max_num_seqs:
            request = self.waiting.peek()
            if request.num_output_placeholders:
                break  # preempted with a token in flight: resume once it is known
            computed_blocks, num_hit_tokens = manager.get_computed_blocks(request)
            num_new_tokens = self._num_new_tokens(request, num_hit_tokens, step.token_budget)
            if (
                not self.scheduler_config.enable_chunked_prefill
                and num_hit_tokens + num_new_tokens < request.num_tokens
            ):
                break  # the whole prompt must fit this step's remaining budget
            new_blocks = manager.allocate_slots(
                request, num_new_tokens, num_hit_tokens, computed_blocks
            )
            if new_blocks is None:
                break  # no head-of-line skipping: later requests wait their turn
            self.waiting.pop()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            step.new_reqs.append(self._new_request_data(request))
            step.num_scheduled_tokens[request.request_id] = num_new_tokens
            step.token_budget -= num_new_tokens

    def _new_request_data(self, request: Request) -> NewRequestData:
        # A resumed request restarts from scratch in the runner, output tokens included.
        return NewRequestData(
            req_id=request.request_id,
            token_ids=list(request.all_token_ids),
            num_prompt_tokens=request.num_prompt_tokens,
            sampling_params=request.sampling_params,
            seed=request.seed,
            block_ids=self.kv_cache_manager.get_block_ids(request.request_id),
            num_computed_tokens=request.num_computed_tokens,
        )

    # ---- after the step ------------------------------------------------------------------

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> list[RequestUpdate]:
        """Apply the oldest scheduled step's sampled tokens (steps update in schedule order)."""
        sampled = dict(
            zip(model_runner_output.req_ids, model_runner_output.sampled_token_ids, strict=True)
        )
        scheduled = self._scheduled.popleft() if scheduler_output.num_scheduled_tokens else {}
        assert scheduled.keys() == scheduler_output.num_scheduled_tokens.keys(), (
            "update_from_output() must follow schedule() order"
        )
        # Runs for every scheduled request every step: locals instead of attribute lookups.
        updates = []
        cache_blocks = self.kv_cache_manager.cache_blocks
        placeholders = self.async_scheduling
        logprobs = model_runner_output.logprobs
        check_stop = self._check_stop
        for request_id, (request, samples) in scheduled.items():
            status = request.status
            if status > _PREEMPTED:
                continue  # aborted or stopped while the step ran: its blocks are already free
            new_token_ids = sampled.get(request_id)
            assert bool(new_token_ids) == samples, (request, new_token_ids)
            running = status == _RUNNING
            if running:
                # The step has written this request's KV, so its full blocks can be shared.
                cache_blocks(request, request.num_computed_tokens)
            if not new_token_ids:
                continue
            if placeholders:
                request.num_output_placeholders -= len(new_token_ids)
            # A request preempted while this step ran keeps the token: it resumes after it.
            request.output_token_ids.extend(new_token_ids)
            request.all_token_ids.extend(new_token_ids)
            finished = check_stop(request)
            if finished:
                if running:
                    self.running.remove(request)
                else:
                    self.waiting.remove(request)
                self._free_request(request)
            lp = logprobs.get(request_id) if logprobs else None
            updates.append(RequestUpdate(request, new_token_ids, lp, finished))
        return updates

    def _check_stop(self, request: Request) -> bool:
        """Stop token first (so an EOS at the length limit reports 'stop'), then lengths."""
        params = request.sampling_params
        output = request.output_token_ids
        if output[-1] in params.all_stop_token_ids and len(output) >= params.min_tokens:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = output[-1] if output[-1] in params.stop_token_ids else None
            return True
        if len(output) >= request.max_tokens or len(request.all_token_ids) >= self.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return True
        return False


class _Step:
    """What one schedule() call has decided so far."""

    def __init__(self, token_budget: int) -> None:
        self.token_budget = token_budget
        self.num_scheduled_tokens: dict[str, int] = {}
        self.scheduled_running: list[Request] = []
        self.new_block_ids: dict[str, list[int]] = {}
        self.new_reqs: list[NewRequestData] = []
        self.preempted: list[Request] = []
