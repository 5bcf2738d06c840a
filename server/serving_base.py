"""What the completion and chat handlers share: model check, request fan-in, SSE, errors.

A handler turns its body into one RequestSpec per prompt, adds them all to the AsyncEngine
at once (validation errors -> 400 before any byte is streamed), then either streams SSE
chunks from the delta outputs or folds them into one response. Non-streaming handlers run
under `cancel_on_disconnect`, so a client that hangs up mid-request aborts its requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from jaxpaged.engine.async_engine import AsyncEngine, OutputStream, RequestSpec
from jaxpaged.outputs import CompletionOutput, Logprob, RequestOutput
from jaxpaged.sampling_params import SamplingParams
from server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class ModelNotFoundError(Exception):
    pass


def error_json(status: int, message: str, err_type: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


async def guard_stream(gen: AsyncIterator[str]) -> AsyncIterator[str]:
    """Once streaming has begun the status is sent: report a failure as an error event."""
    try:
        async for chunk in gen:
            yield chunk
    except Exception as exc:  # noqa: BLE001 - e.g. EngineDeadError mid-stream
        logger.exception("stream failed")
        yield sse({"error": {"message": str(exc), "type": type(exc).__name__, "code": 500}})
        yield sse("[DONE]")


def sse(data: dict | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


async def cancel_on_disconnect(request: Request, handler: Awaitable[Response]) -> Response:
    """Runs `handler` until done or until the client disconnects (then cancels it, which
    closes its OutputStream and aborts its requests in the engine)."""

    async def wait_for_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    task = asyncio.ensure_future(handler)
    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return task.result()


@dataclass
class ChoiceState:
    """One output choice accumulated over delta outputs."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, c: CompletionOutput) -> None:
        self.text += c.text
        self.token_ids.extend(c.token_ids)
        self.logprobs.extend(c.logprobs or [])
        if c.finish_reason is not None:
            self.finish_reason, self.stop_reason = c.finish_reason, c.stop_reason


class OpenAIServing:
    def __init__(
        self,
        async_engine: AsyncEngine,
        tokenizer,
        served_model_names: list[str],
        metrics: ServerMetrics,
    ) -> None:
        self.async_engine = async_engine
        self.tokenizer = tokenizer
        self.served_model_names = served_model_names
        self.metrics = metrics

    def model_name(self, requested: str | None) -> str:
        if requested is None:
            return self.served_model_names[0]
        if requested not in self.served_model_names:
            raise ModelNotFoundError(f"The model `{requested}` does not exist.")
        return requested

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # tokenizers releases the GIL; a big prompt must not stall the event loop.
        return await asyncio.to_thread(
            self.tokenizer.encode, text, add_special_tokens=add_special_tokens
        )

    async def add(
        self, prefix: str, prompts: list[tuple[str | None, list[int]]], params: SamplingParams,
        priority: int = 0,
    ) -> tuple[list[str], OutputStream]:  # fmt: skip
        base = f"{prefix}-{uuid.uuid4().hex}"
        ids = [f"{base}-{i}" for i in range(len(prompts))]
        specs = [
            RequestSpec(rid, text, token_ids, params, priority)
            for rid, (text, token_ids) in zip(ids, prompts, strict=True)
        ]
        return ids, await self.async_engine.add_requests(specs)

    async def timed(self, stream: OutputStream) -> AsyncIterator[RequestOutput]:
        timer = self.metrics.timer()
        async for out in stream:
            timer.observe(out)
            yield out


def now_s() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
