"""From the scheduler's per-step `RequestUpdate`s to user-facing `RequestOutput`s.

    RequestUpdate (one per scheduled child request)
        ├─ detokenize the new tokens, look for stop strings ──> reqs_to_finish (the engine
        │                                                      finishes them as STOPPED)
        ├─ LogprobsLists row ──> {token_id: Logprob} (sampled token + top-N asked for)
        └─ metrics (first token, last token, finish)
    ParentState (one per user request, n children) ──> RequestOutput

A user request with `n` samples is run as n child requests ("{i}_{parent_id}"; the parent id
itself when n == 1). In final mode one RequestOutput with all n CompletionOutputs is returned
once every child has finished; in delta mode each step returns one RequestOutput per parent
holding, for each child that advanced, only its new text, tokens and logprobs (index = i).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from jaxpaged.engine.detokenizer import IncrementalDetokenizer
from jaxpaged.engine.request import Request, RequestStatus
from jaxpaged.engine.scheduler_output import LogprobsLists, RequestUpdate
from jaxpaged.outputs import (
    CompletionOutput,
    Logprob,
    RequestMetrics,
    RequestOutput,
    SampleLogprobs,
)
from jaxpaged.sampling_params import SamplingParams


def child_request_id(index: int, parent_id: str, n: int) -> str:
    """vLLM's naming of parallel-sampling children; n == 1 keeps the user's id."""
    return parent_id if n == 1 else f"{index}_{parent_id}"


@dataclass
class SampleState:
    """One child request's accumulated output."""

    request_id: str
    index: int
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_sent_tokens: int = 0
    """Tokens (and logprob rows) already returned in delta mode."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class ParentState:
    """One user request: its prompt, its n samples and its metrics."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[SampleState]
    metrics: RequestMetrics
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        for sample in self.samples:
            if sample.finish_reason is None:
                return False
        return True


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    reqs_to_finish: list[str]
    """Child request ids that hit a stop string: the scheduler must finish them (STOPPED)."""


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}
        self.child_to_parent: dict[str, str] = {}
        self._decoded_tokens: dict[int, str] = {}
        self._quiet: set[str] = set()
        """Child ids whose steps between the first token and the last change nothing here:
        final mode, no detokenizer, no logprobs. Their tokens are read off the Request when
        an update is processed, so the steps in between are skipped (1000 running requests
        made this loop a third of a decode step's host work)."""

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
    ) -> list[str]:
        """Registers a user request; returns its child request ids (index order)."""
        samples = []
        for i in range(params.n):
            child_id = child_request_id(i, request_id, params.n)
            detok = None
            if params.detokenize and self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
            sample = SampleState(child_id, i, detok)
            if params.logprobs is not None:
                sample.logprobs, sample.cumulative_logprob = [], 0.0
            elif detok is None and params.output_kind == "final":
                self._quiet.add(child_id)
            samples.append(sample)
            self.child_to_parent[child_id] = request_id
        self.parents[request_id] = ParentState(
            request_id, prompt, list(prompt_token_ids), params, samples,
            RequestMetrics(arrival_time=arrival_time),
        )  # fmt: skip
        return [s.request_id for s in samples]

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents)

    def get_num_unfinished_requests(self) -> int:
        return len(self.parents)

    def abort_requests(self, request_ids: list[str]) -> list[str]:
        """Drops parent requests (by parent or child id); returns the child ids to abort."""
        child_ids: list[str] = []
        for request_id in request_ids:
            parent_id = self.child_to_parent.get(request_id, request_id)
            parent = self.parents.pop(parent_id, None)
            if parent is None:
                continue
            for sample in parent.samples:
                self.child_to_parent.pop(sample.request_id, None)
                self._quiet.discard(sample.request_id)
                if not sample.finished:
                    child_ids.append(sample.request_id)
        return child_ids

    def mark_scheduled(self, child_id: str, now: float) -> None:
        parent = self.parents.get(self.child_to_parent.get(child_id, ""))
        if parent is not None and parent.metrics.first_scheduled_time is None:
            parent.metrics.first_scheduled_time = now

    def process_outputs(
        self, updates: list[RequestUpdate], now: float | None = None
    ) -> ProcessedOutputs:
        now = time.monotonic() if now is None else now
        reqs_to_finish: list[str] = []
        touched: dict[str, list[SampleState]] = {}
        quiet = self._quiet
        for update in updates:
            request = update.request
            if (
                not update.finished
                and request.request_id in quiet
                and request.num_output_tokens > len(update.new_token_ids)
            ):
                continue  # neither its first token nor its last: nothing to record
            parent_id = self.child_to_parent.get(request.request_id)
            if parent_id is None:
                continue  # aborted after it was scheduled
            parent = self.parents[parent_id]
            sample = parent.samples[self._index_of(parent, request.request_id)]
            if self._process_update(parent, sample, update, now):
                reqs_to_finish.append(sample.request_id)
            touched.setdefault(parent_id, []).append(sample)
        outputs = []
        for parent_id, samples in touched.items():
            parent = self.parents[parent_id]
            finished = parent.finished
            out = self._make_request_output(parent, samples, now, finished)
            if out is not None:
                outputs.append(out)
            if finished:
                self._drop(parent)
        return ProcessedOutputs(outputs, reqs_to_finish)

    @staticmethod
    def _index_of(parent: ParentState, child_id: str) -> int:
        if parent.params.n == 1:
            return 0
        return int(child_id.split("_", 1)[0])

    def _process_update(
        self, parent: ParentState, sample: SampleState, update: RequestUpdate, now: float
    ) -> bool:
        """Folds one step into `sample`; True if a stop string ended it here."""
        request, new_ids = update.request, update.new_token_ids
        if new_ids:
            if parent.metrics.first_token_time is None:
                parent.metrics.first_token_time = now
                parent.num_cached_tokens = max(request.num_cached_tokens, 0)
            parent.metrics.last_token_time = now
        if sample.request_id in self._quiet:  # skipped steps: the Request has every token
            sample.token_ids[:] = request.output_token_ids
        else:
            sample.token_ids.extend(new_ids)
        if sample.logprobs is not None and update.new_logprobs is not None:
            self._append_logprobs(sample, update.new_logprobs, parent.params.logprobs or 0)
        finished = update.finished
        stop_str = None
        if sample.detokenizer is not None:
            # A stop token (EOS or stop_token_ids) leaves its text out, like vLLM.
            stop_token = finished and request.status == RequestStatus.FINISHED_STOPPED
            stop_str = sample.detokenizer.update(new_ids, finished, skip_last=stop_token)
        if stop_str is not None:
            sample.finish_reason, sample.stop_reason = "stop", stop_str
            return not finished
        if finished:
            self._set_finish_reason(sample, request)
        return False

    @staticmethod
    def _set_finish_reason(sample: SampleState, request: Request) -> None:
        sample.finish_reason = request.get_finish_reason() or "stop"
        sample.stop_reason = request.stop_reason

    def _decode_token(self, token_id: int) -> str:
        text = self._decoded_tokens.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""
            self._decoded_tokens[token_id] = text
        return text

    def _append_logprobs(self, sample: SampleState, lists: LogprobsLists, num: int) -> None:
        """Each row: the sampled token first, then the top MAX_LOGPROBS; keep the top `num`."""
        for ids, lps, rank in zip(lists.token_ids, lists.logprobs, lists.ranks, strict=True):
            entry = {ids[0]: Logprob(lps[0], rank, self._decode_token(ids[0]))}
            for j in range(num):
                if ids[1 + j] not in entry:
                    entry[ids[1 + j]] = Logprob(lps[1 + j], j + 1, self._decode_token(ids[1 + j]))
            sample.logprobs.append(entry)
            sample.cumulative_logprob += lps[0]

    def _make_request_output(
        self, parent: ParentState, touched: list[SampleState], now: float, finished: bool
    ) -> RequestOutput | None:
        if finished:
            parent.metrics.finished_time = now
        delta = parent.params.output_kind == "delta"
        if not delta and not finished:
            return None
        samples = touched if delta else parent.samples
        completions = [self._completion(s, delta) for s in sorted(samples, key=lambda s: s.index)]
        if delta:
            completions = [c for c in completions if c.token_ids or c.text or c.finished()]
            if not completions and not finished:
                return None
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=completions,
            finished=finished,
            metrics=parent.metrics,
            num_cached_tokens=parent.num_cached_tokens,
        )

    @staticmethod
    def _completion(sample: SampleState, delta: bool) -> CompletionOutput:
        detok = sample.detokenizer
        text = detok.get_next_output_text(sample.finished, delta) if detok is not None else ""
        start = sample.num_sent_tokens if delta else 0
        sample.num_sent_tokens = len(sample.token_ids)
        logprobs = sample.logprobs[start:] if sample.logprobs is not None else None
        return CompletionOutput(
            index=sample.index,
            text=text,
            token_ids=sample.token_ids[start:],
            cumulative_logprob=sample.cumulative_logprob,
            logprobs=logprobs,
            finish_reason=sample.finish_reason,
            stop_reason=sample.stop_reason,
        )

    def _drop(self, parent: ParentState) -> None:
        self.parents.pop(parent.request_id, None)
        for sample in parent.samples:
            self.child_to_parent.pop(sample.request_id, None)
            self._quiet.discard(sample.request_id)
