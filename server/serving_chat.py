"""POST /v1/chat/completions: messages -> chat template -> one request with n samples.

The messages are rendered with the tokenizer's own chat template
(apply_chat_template(add_generation_prompt=True)) and tokenized without adding special
tokens again. Streaming sends, per choice, a first chunk with the assistant role, then
content deltas, then a chunk carrying finish_reason; usage last if asked for.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from jaxpaged.outputs import Logprob
from server.protocol import ChatCompletionRequest
from server.serving_base import ChoiceState, OpenAIServing, guard_stream, now_s, sse, usage


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], top_n: int) -> dict:
    """OpenAI's chat shape: per token its text, logprob, UTF-8 bytes and top alternatives."""

    def item(lp: Logprob) -> dict:
        token = lp.decoded_token or ""
        return {"token": token, "logprob": lp.logprob, "bytes": list(token.encode("utf-8"))}

    content = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        top = sorted(
            (lp for lp in entry.values() if lp.rank is not None and lp.rank <= top_n),
            key=lambda lp: lp.rank,
        )
        content.append({**item(entry[token_id]), "top_logprobs": [item(lp) for lp in top]})
    return {"content": content}


class OpenAIServingChat(OpenAIServing):
    async def render(self, body: ChatCompletionRequest) -> list[int]:
        """The chat template's token ids for `body.messages`."""
        kwargs = dict(body.chat_template_kwargs or {})

        def _render() -> list[int]:
            text = self.tokenizer.apply_chat_template(
                body.rendered_messages(),
                add_generation_prompt=body.add_generation_prompt,
                tokenize=False,
                **kwargs,
            )
            return self.tokenizer.encode(text, add_special_tokens=False)

        try:
            return await asyncio.to_thread(_render)
        except ValueError:
            raise
        except Exception as exc:  # jinja errors, missing template
            raise ValueError(f"Could not apply the chat template: {exc}") from exc

    async def create(self, body: ChatCompletionRequest, raw: Request):
        model = self.model_name(body.model)
        params = body.to_sampling_params()
        prompt_ids = await self.render(body)
        ids, stream = await self.add("chatcmpl", [(None, prompt_ids)], params, body.priority)
        ctx = _ChatCtx(body, model, ids[0], len(prompt_ids), params.n)
        if body.stream:
            gen = guard_stream(self._stream(ctx, stream))
            return StreamingResponse(gen, media_type="text/event-stream")
        async with stream:
            async for out in self.timed(stream):
                for c in out.outputs:
                    ctx.choices[c.index].add(c)
        return JSONResponse(self._response(ctx))

    def _response(self, ctx: _ChatCtx) -> dict:
        choices = []
        for k, st in enumerate(ctx.choices):
            logprobs = None
            if ctx.body.logprobs:
                logprobs = chat_logprobs(st.token_ids, st.logprobs, ctx.body.top_logprobs or 0)
            choices.append(
                {
                    "index": k,
                    "message": {"role": "assistant", "content": st.text},
                    "logprobs": logprobs,
                    "finish_reason": st.finish_reason,
                    "stop_reason": st.stop_reason,
                }
            )
        num_completion = sum(len(st.token_ids) for st in ctx.choices)
        return {
            "id": ctx.id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": ctx.model,
            "choices": choices,
            "usage": usage(ctx.num_prompt_tokens, num_completion),
        }

    async def _stream(self, ctx: _ChatCtx, stream) -> AsyncIterator[str]:
        for k in range(ctx.n):
            role = {"role": "assistant", "content": ""}
            yield sse(
                ctx.chunk([{"index": k, "delta": role, "logprobs": None, "finish_reason": None}])
            )
        num_completion = 0
        async with stream:
            async for out in self.timed(stream):
                for c in out.outputs:
                    num_completion += len(c.token_ids)
                    if not c.text and not c.finished() and not ctx.body.logprobs:
                        continue  # e.g. half a UTF-8 character, or a held-back stop prefix
                    logprobs = None
                    if ctx.body.logprobs:
                        top_n = ctx.body.top_logprobs or 0
                        logprobs = chat_logprobs(c.token_ids, c.logprobs or [], top_n)
                    delta = {"content": c.text} if c.text else {}
                    choice = {
                        "index": c.index,
                        "delta": delta,
                        "logprobs": logprobs,
                        "finish_reason": c.finish_reason,
                    }
                    if c.finished():
                        choice["stop_reason"] = c.stop_reason
                    yield sse(ctx.chunk([choice]))
        if ctx.body.include_usage:
            yield sse(ctx.chunk([], usage=usage(ctx.num_prompt_tokens, num_completion)))
        yield sse("[DONE]")


class _ChatCtx:
    def __init__(self, body, model, request_id, num_prompt_tokens, n) -> None:
        self.body, self.model, self.n = body, model, n
        self.id = request_id.rsplit("-", 1)[0]
        self.created = now_s()
        self.num_prompt_tokens = num_prompt_tokens
        self.choices = [ChoiceState() for _ in range(n)]

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            out["usage"] = usage
        return out
