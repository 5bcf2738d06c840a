"""A request as the engine tracks it: its tokens, progress and status.

`num_computed_tokens` counts tokens whose KV is in the cache. The scheduler schedules
`num_tokens - num_computed_tokens` more (capped by budget); when that reaches the end of the
token list, the step samples one token which is appended to `output_token_ids`.
"""

from __future__ import annotations

import enum
import time

from jaxpaged.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    # Everything after PREEMPTED is finished.
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @staticmethod
    def is_finished(status: RequestStatus) -> bool:
        return status > RequestStatus.PREEMPTED

    @staticmethod
    def finish_reason(status: RequestStatus) -> str | None:
        return _FINISH_REASONS.get(status)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        max_tokens: int,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        seed: int = 0,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id}: the prompt is empty.")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.max_tokens = max_tokens
        """Resolved limit of generated tokens (never None here)."""
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority
        """Lower value is served first under the 'priority' policy (vLLM's convention)."""
        self.cache_salt = cache_salt
        self.seed = seed
        """Resolved seed of this request's random stream (sampling_params.seed or drawn)."""
        """Extra key folded into the first block's hash, isolating this prefix from others."""
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_output_placeholders = 0
        """Tokens sampled by steps still on the device (async scheduling): at most
        async_depth when schedule() runs, one more right after it."""
        self.num_cached_tokens = -1
        """Prompt tokens found in the prefix cache at first admission (-1: not admitted yet)."""
        self.num_preemptions = 0
        self.block_hashes: list[int] = []
        """Chained hashes of this request's full blocks, extended as tokens arrive."""

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        return len(self.all_token_ids) + self.num_output_placeholders

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token_ids(self, token_ids: list[int]) -> None:
        self.output_token_ids.extend(token_ids)
        self.all_token_ids.extend(token_ids)

    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    def get_finish_reason(self) -> str | None:
        return RequestStatus.finish_reason(self.status)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens})"
        )
