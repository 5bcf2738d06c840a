"""The FastAPI app: routes, the gateway middleware, and OpenAI-shaped errors.

    request ─> GatewayMiddleware (503 while draining, 401 without the key on /v1/*,
               413 past the body limit) ─> FastAPI route ─> OpenAIServing* ─> AsyncEngine

Every error leaves as {"error": {"message", "type", "param", "code"}}: FastAPI's 422 for a
bad body becomes 400, a ValueError from validation 400, an unknown model 404, a dead engine
503. Errors raised before a request reaches the engine leave nothing behind; errors after
it close its OutputStream, which aborts it.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxpaged.engine.async_engine import AsyncEngine, EngineDeadError, EngineNotAcceptingError
from server.metrics import CONTENT_TYPE, ServerMetrics
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from server.serving_base import ModelNotFoundError, cancel_on_disconnect, error_json
from server.serving_chat import OpenAIServingChat
from server.serving_completions import OpenAIServingCompletion

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024


class GatewayMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware): it must not get between streaming responses and
    the http.disconnect messages that abort requests of clients that went away."""

    def __init__(self, app, async_engine: AsyncEngine, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.async_engine = async_engine
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if not self.async_engine.accepting and path not in ("/health", "/metrics"):
            msg = "The server is shutting down and accepts no new requests."
            return await error_json(503, msg, "ServiceUnavailableError")(scope, receive, send)
        if self.api_key is not None and path.startswith("/v1"):
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(auth, f"Bearer {self.api_key}"):
                resp = error_json(401, "Invalid or missing API key.", "AuthenticationError")
                return await resp(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body = await self._read_body(scope, receive)
            if body is None:
                msg = f"Request body exceeds the limit of {self.max_body_bytes} bytes."
                return await error_json(413, msg, "RequestEntityTooLarge")(scope, receive, send)
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_body(self, scope, receive) -> bytes | None:
        """The whole body, or None past the limit (by Content-Length or by bytes received)."""
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive):
    """Hands the buffered body to the app once, then the real receive (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "Invalid request: " + "; ".join(parts)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _bad_body(request, exc):
        return error_json(400, _validation_message(exc), "BadRequestError")

    @app.exception_handler(ValueError)
    async def _bad_value(request, exc):
        return error_json(400, str(exc), "BadRequestError")

    @app.exception_handler(ModelNotFoundError)
    async def _no_model(request, exc):
        return error_json(404, str(exc), "NotFoundError", "model")

    @app.exception_handler(EngineDeadError)
    @app.exception_handler(EngineNotAcceptingError)
    async def _unavailable(request, exc):
        return error_json(503, str(exc), "ServiceUnavailableError")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        return error_json(exc.status_code, str(exc.detail), "InvalidRequestError")


def build_app(
    async_engine: AsyncEngine,
    tokenizer,
    served_model_names: list[str],
    max_model_len: int,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    metrics = ServerMetrics(async_engine.get_stats, served_model_names[0])
    serving = (async_engine, tokenizer, served_model_names, metrics)
    completions, chat = OpenAIServingCompletion(*serving), OpenAIServingChat(*serving)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        async_engine.shutdown()

    app = FastAPI(title="jaxpaged", lifespan=lifespan)
    app.state.async_engine, app.state.metrics = async_engine, metrics
    app.add_middleware(
        GatewayMiddleware, async_engine=async_engine, api_key=api_key,
        max_body_bytes=max_body_bytes,
    )  # fmt: skip
    _install_error_handlers(app)
    created = int(time.time())

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, raw: Request):
        return await cancel_on_disconnect(raw, completions.create(body, raw))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, raw: Request):
        return await cancel_on_disconnect(raw, chat.create(body, raw))

    @app.get("/v1/models")
    async def list_models():
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "jaxpaged",
             "root": served_model_names[0], "parent": None, "max_model_len": max_model_len}
            for name in served_model_names
        ]  # fmt: skip
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        return Response(status_code=200 if async_engine.is_healthy() else 503)

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        completions.model_name(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ValueError("Give exactly one of prompt or messages.")
        if body.messages is not None:
            req = ChatCompletionRequest(
                messages=body.messages, add_generation_prompt=body.add_generation_prompt
            )
            tokens = await chat.render(req)
        else:
            tokens = await completions.encode(body.prompt, body.add_special_tokens)
        out = {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens}
        if body.return_token_strs:
            out["token_strs"] = tokenizer.convert_ids_to_tokens(tokens)
        return out

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        completions.model_name(body.model)
        vocab_size = async_engine.engine.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"Token id {bad[0]} is out of vocabulary [0, {vocab_size}).")
        return {"prompt": tokenizer.decode(body.tokens)}

    return app
