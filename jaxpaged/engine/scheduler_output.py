"""The two contracts around a step: scheduler -> runner, and runner -> scheduler.

The runner keeps its own copy of every running request (tokens, block table, sampling
settings) keyed by request id, so a step sends only what changed:

    new request / resumed after preemption   -> NewRequestData (everything)
    request already in the runner's batch    -> CachedRequestData (new blocks, progress)
    finished, aborted or preempted           -> finished_req_ids (runner drops its copy)

For each scheduled request the runner computes `num_scheduled_tokens[req_id]` tokens starting
at `num_computed_tokens`, and samples a token only when that reaches the end of the tokens it
knows (a partial prefill chunk samples nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jaxpaged.engine.request import Request
from jaxpaged.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    req_id: str
    token_ids: list[int]
    """Prompt plus any output generated before a preemption; the runner's starting copy."""
    num_prompt_tokens: int
    sampling_params: SamplingParams
    seed: int
    """Resolved seed of the request's random stream (the engine draws one if none given)."""
    block_ids: list[int]
    """The request's whole block table so far."""
    num_computed_tokens: int
    """Tokens already in the KV cache (prefix-cache hits), where this step starts."""


@dataclass
class CachedRequestData:
    req_ids: list[str] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)
    """Blocks appended to each request's table this step (often empty)."""
    num_computed_tokens: list[int] = field(default_factory=list)
    """Where each request's scheduled tokens start."""


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: dict[str, int]
    """req_id -> tokens to compute this step; the sum is <= max_num_batched_tokens."""
    total_num_scheduled_tokens: int
    finished_req_ids: set[str]
    """Requests finished, aborted or preempted since the last step: the runner frees their slot."""
    preempted_req_ids: set[str] = field(default_factory=set)
    """Subset of finished_req_ids that will come back later as NewRequestData."""

    @property
    def num_reqs(self) -> int:
        return len(self.num_scheduled_tokens)

    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class LogprobsLists:
    """Top logprobs of sampled tokens, one row per sampled token."""

    token_ids: list[list[int]]
    """Per row: the sampled token, then the top-N ids (N = MAX_LOGPROBS)."""
    logprobs: list[list[float]]
    ranks: list[int]
    """Rank of the sampled token in the full distribution (1 = most likely)."""


@dataclass
class ModelRunnerOutput:
    req_ids: list[str]
    sampled_token_ids: list[list[int]]
    """Per scheduled request (same order as req_ids): [] for a partial prefill, else [token]."""
    logprobs: dict[str, LogprobsLists] = field(default_factory=dict)
    """Only for requests that asked for logprobs and sampled this step."""


@dataclass
class RequestUpdate:
    """What one step did to one request, handed from the scheduler to the output processor."""

    request: Request
    new_token_ids: list[int]
    """Tokens appended this step (empty for a partial prefill)."""
    new_logprobs: LogprobsLists | None
    finished: bool
    """The request stopped this step (EOS, stop token, max_tokens or max_model_len)."""


@dataclass
class SchedulerStats:
    """A snapshot for metrics; the *_total counters are cumulative since start."""

    num_running_reqs: int
    num_waiting_reqs: int
    kv_cache_usage: float
    """Fraction of the pool's blocks (null block excluded) held by requests, in [0, 1]."""
    num_free_blocks: int
    """Blocks not held by any request (evictable cached blocks count as free)."""
    prefix_cache_queries_total: int
    """Prompt tokens looked up in the prefix cache."""
    prefix_cache_hits_total: int
    """Prompt tokens found there."""
    num_preemptions_total: int
