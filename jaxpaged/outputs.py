"""What generation returns, shaped like vLLM's `vllm.outputs` so user code ports unchanged.

The engine's OutputProcessor builds these from the scheduler's per-step `RequestUpdate`s:
one `RequestOutput` per user request (its n samples are `outputs[i]`), holding the text and
token ids so far (final mode) or only what is new since the last step (delta mode, used by
the server's streaming responses).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One candidate token's log-probability at one position."""

    logprob: float
    rank: int | None = None
    """1 = most likely token in the full distribution."""
    decoded_token: str | None = None


# One dict per generated token: token id -> Logprob, holding the sampled token and the top-N.
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class RequestMetrics:
    """time.monotonic() seconds of a request's milestones; None until reached."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class CompletionOutput:
    index: int
    """Which of the request's n samples this is."""
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    """Sum of the sampled tokens' logprobs; None unless the request asked for logprobs."""
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    """'stop', 'length', 'abort' or None while running."""
    stop_reason: int | str | None = None
    """The stop string or stop token id that ended the sample; None for EOS or length."""

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (first admission)."""
    prompt_logprobs: None = field(default=None, repr=False)
    """Not supported yet; kept for vLLM's attribute set."""
