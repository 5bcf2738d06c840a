"""POST /v1/completions: prompts (text, token ids, or lists of either) -> text completions.

Choice index = prompt_index * n + sample_index, as OpenAI numbers them. Logprobs use the
legacy completions shape (tokens, token_logprobs, top_logprobs, text_offset); with echo,
the prompt text is prepended and its tokens carry no logprob (prompt_logprobs unsupported).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from jaxpaged.outputs import Logprob
from server.protocol import CompletionRequest
from server.serving_base import ChoiceState, OpenAIServing, guard_stream, now_s, sse, usage


class LogprobsBuilder:
    """Builds the completions logprobs object, keeping text offsets across stream chunks."""

    def __init__(self, tokenizer, text_offset: int = 0) -> None:
        self.tokenizer = tokenizer
        self.text_offset = text_offset

    def build(
        self, token_ids: list[int], entries: list[dict[int, Logprob]], echo_ids: list[int] = ()
    ) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id in echo_ids:
            self._add(out, self.tokenizer.decode([token_id]), None, None)
        for token_id, entry in zip(token_ids, entries, strict=False):
            sampled = entry[token_id]
            top = {lp.decoded_token: lp.logprob for lp in entry.values()}
            # Distinct ids can decode alike (e.g. partial UTF-8 bytes): the sampled one wins.
            top[sampled.decoded_token] = sampled.logprob
            self._add(out, sampled.decoded_token, sampled.logprob, top)
        return out

    def _add(self, out: dict, token: str, logprob: float | None, top: dict | None) -> None:
        out["tokens"].append(token)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(self.text_offset)
        self.text_offset += len(token)


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, body: CompletionRequest, raw: Request):
        model = self.model_name(body.model)
        params = body.to_sampling_params()
        prompts = []
        for p in body.prompts():
            if isinstance(p, str):
                prompts.append((p, await self.encode(p)))
            else:
                prompts.append((None, list(p)))
        ids, stream = await self.add("cmpl", prompts, params, body.priority)
        ctx = _Ctx(self, body, model, ids, prompts, params.n)
        if body.stream:
            gen = guard_stream(self._stream(ctx, stream))
            return StreamingResponse(gen, media_type="text/event-stream")
        async with stream:
            async for out in self.timed(stream):
                i = ctx.index[out.request_id]
                for c in out.outputs:
                    ctx.choices[i * ctx.n + c.index].add(c)
        return JSONResponse(self._response(ctx))

    def _prompt_text(self, ctx: _Ctx, i: int) -> str:
        text, token_ids = ctx.prompts[i]
        return text if text is not None else self.tokenizer.decode(token_ids)

    def _response(self, ctx: _Ctx) -> dict:
        choices, num_completion = [], 0
        for k, st in enumerate(ctx.choices):
            i = k // ctx.n
            text, logprobs = st.text, None
            if ctx.body.echo:
                text = self._prompt_text(ctx, i) + text
            if ctx.body.logprobs is not None:
                echo_ids = ctx.prompts[i][1] if ctx.body.echo else []
                logprobs = LogprobsBuilder(self.tokenizer).build(
                    st.token_ids, st.logprobs, echo_ids
                )
            num_completion += len(st.token_ids)
            choices.append(
                {
                    "index": k,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": st.finish_reason,
                    "stop_reason": st.stop_reason,
                }
            )
        return {
            "id": ctx.id,
            "object": "text_completion",
            "created": ctx.created,
            "model": ctx.model,
            "choices": choices,
            "usage": usage(ctx.num_prompt_tokens, num_completion),
        }

    async def _stream(self, ctx: _Ctx, stream) -> AsyncIterator[str]:
        num_choices = len(ctx.choices)
        builders = [LogprobsBuilder(self.tokenizer) for _ in range(num_choices)]
        started = [False] * num_choices
        num_completion = 0
        async with stream:
            async for out in self.timed(stream):
                i = ctx.index[out.request_id]
                for c in out.outputs:
                    k = i * ctx.n + c.index
                    text, echo_ids = c.text, []
                    if ctx.body.echo and not started[k]:
                        text = self._prompt_text(ctx, i) + text
                        echo_ids = ctx.prompts[i][1]
                    started[k] = True
                    num_completion += len(c.token_ids)
                    logprobs = None
                    if ctx.body.logprobs is not None:
                        logprobs = builders[k].build(c.token_ids, c.logprobs or [], echo_ids)
                    choice = {
                        "index": k,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                    }
                    yield sse(ctx.chunk([choice]))
        if ctx.body.include_usage:
            yield sse(ctx.chunk([], usage=usage(ctx.num_prompt_tokens, num_completion)))
        yield sse("[DONE]")


class _Ctx:
    """One /v1/completions call: its prompts, ids and accumulating choices."""

    def __init__(self, serving, body, model, request_ids, prompts, n) -> None:
        self.body, self.model, self.prompts, self.n = body, model, prompts, n
        self.id = f"cmpl-{request_ids[0].split('-')[1]}"
        self.created = now_s()
        self.index = {rid: i for i, rid in enumerate(request_ids)}
        self.choices = [ChoiceState() for _ in range(len(prompts) * n)]
        self.num_prompt_tokens = sum(len(ids) for _, ids in prompts)

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            out["usage"] = usage
        return out
