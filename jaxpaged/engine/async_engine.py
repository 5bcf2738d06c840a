"""asyncio front of the Engine for the server: one engine thread, per-request output queues.

    event loop (many requests)                       engine thread (one)
    add_requests() ──command──> _commands ──notify──> apply adds/aborts ─> engine.step()
          ^                                                                  │
    OutputStream.__anext__ <── asyncio.Queue <── loop.call_soon_threadsafe ──┘ RequestOutputs

The thread sleeps on a condition variable while it has neither commands nor unfinished
requests (no polling). Only the engine thread touches the Engine; the event loop talks to it
through commands, and reads a stats snapshot the thread refreshes after every step.
Adds are validated in the engine thread and their ValueError is handed back to the awaiting
coroutine, so the server can answer 400 before streaming starts. An OutputStream that is
closed before its requests finish (client gone, handler cancelled) aborts them, which frees
their KV blocks. If a step raises, the engine is dead: every stream gets EngineDeadError and
`is_healthy()` turns False (the server's /health answers 503).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from jaxpaged.engine.engine import Engine, EngineStats
from jaxpaged.outputs import RequestOutput
from jaxpaged.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop crashed; no request can be served any more."""


class EngineNotAcceptingError(RuntimeError):
    """The engine is draining for shutdown and takes no new requests."""


@dataclass
class RequestSpec:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    priority: int = 0


class _Aborted:
    """Queue sentinel: the request was aborted from the server side (e.g. shutdown)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id


class OutputStream:
    """The RequestOutputs of one or more requests added together, in arrival order.

    Use as `async with stream: async for out in stream:`; leaving the block early aborts
    whatever has not finished.
    """

    def __init__(self, engine: AsyncEngine, request_ids: list[str], queue: asyncio.Queue) -> None:
        self._engine = engine
        self._queue = queue
        self.unfinished = set(request_ids)

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while self.unfinished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, _Aborted):
                self.unfinished.discard(item.request_id)
                continue
            if item.finished:
                self.unfinished.discard(item.request_id)
            return item
        raise StopAsyncIteration

    async def __aenter__(self) -> OutputStream:
        return self

    async def __aexit__(self, *exc) -> None:
        self.abort()

    def abort(self) -> None:
        if self.unfinished:
            self._engine.abort(list(self.unfinished))
            self.unfinished.clear()


class AsyncEngine:
    def __init__(
        self,
        engine: Engine,
        output_observer: Callable[[RequestOutput, float], None] | None = None,
    ) -> None:
        self.engine = engine
        self.output_observer = output_observer
        """Called in the engine thread for every output (the server's latency metrics)."""
        self.accepting = True
        self.errored: BaseException | None = None
        self._cv = threading.Condition()
        self._commands: collections.deque = collections.deque()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._stats = engine.get_stats()
        self._thread = threading.Thread(target=self._run, name="jaxpaged-engine", daemon=True)

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    def is_healthy(self) -> bool:
        return self.errored is None and self._thread.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Aborts whatever is left and stops the engine thread."""
        self.accepting = False
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def num_in_flight(self) -> int:
        """Requests added and not yet finished or aborted."""
        with self._cv:
            return len(self._queues)

    async def drain(self, timeout: float) -> bool:
        """Stops accepting, waits up to `timeout` s for in-flight requests, aborts the rest.

        Returns True if everything finished by itself.
        """
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self.num_in_flight and time.monotonic() < deadline and self.is_healthy():
            await asyncio.sleep(0.05)
        with self._cv:
            leftover = list(self._queues)
        if leftover:
            logger.warning("drain: aborting %d unfinished requests", len(leftover))
            self.abort(leftover)
        return not leftover

    def get_stats(self) -> EngineStats:
        """The snapshot taken after the engine thread's last step or command batch."""
        return self._stats

    # ---- requests -------------------------------------------------------------------------

    async def add_requests(self, specs: list[RequestSpec]) -> OutputStream:
        """Adds all or none of `specs` (a ValueError from validation adds none)."""
        if self.errored is not None:
            raise EngineDeadError(f"the engine loop died: {self.errored!r}")
        if not self.accepting:
            raise EngineNotAcceptingError("the server is shutting down")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            for spec in specs:
                if spec.request_id in self._queues:
                    raise ValueError(f"Request id {spec.request_id!r} is already in use.")
            for spec in specs:
                self._queues[spec.request_id] = (loop, queue)
            self._commands.append(("add", specs, future))
            self._cv.notify()
        request_ids = [s.request_id for s in specs]
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            self.abort(request_ids)  # the caller is gone (client disconnected) mid-add
            raise
        return OutputStream(self, request_ids, queue)

    async def generate(self, spec: RequestSpec):
        """One request's outputs; aborts it if the caller stops iterating early."""
        stream = await self.add_requests([spec])
        async with stream:
            async for out in stream:
                yield out

    def abort(self, request_ids: list[str]) -> None:
        """Thread-safe and non-blocking; unknown or finished ids are ignored."""
        with self._cv:
            self._commands.append(("abort", list(request_ids), None))
            self._cv.notify()

    # ---- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (
                        self._commands or self._stopping or self.engine.has_unfinished_requests()
                    ):
                        self._cv.wait()
                    commands = list(self._commands)
                    self._commands.clear()
                    stopping = self._stopping
                self._apply(commands)
                if stopping:
                    self._abort_all()
                    return
                outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
                self._stats = self.engine.get_stats()
                self._dispatch(outputs)
        except BaseException as exc:  # noqa: BLE001 - any crash makes the engine dead
            logger.exception("engine loop died")
            self.errored = exc
            self._fail_all(EngineDeadError(f"the engine loop died: {exc!r}"))

    def _apply(self, commands: list) -> None:
        for kind, payload, future in commands:
            if kind == "abort":
                self._abort(payload)
                continue
            added: list[str] = []
            try:
                for spec in payload:
                    self.engine.add_request(
                        spec.request_id, spec.prompt, spec.prompt_token_ids,
                        spec.sampling_params, priority=spec.priority,
                    )  # fmt: skip
                    added.append(spec.request_id)
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                self.engine.abort_request(added)
                with self._cv:
                    for spec in payload:
                        self._queues.pop(spec.request_id, None)
                future.set_exception(exc)
            else:
                future.set_result(None)
        if commands:
            self._stats = self.engine.get_stats()

    def _abort(self, request_ids: list[str]) -> None:
        self.engine.abort_request(request_ids)
        with self._cv:
            targets = [(rid, self._queues.pop(rid, None)) for rid in request_ids]
        for rid, target in targets:
            if target is not None:
                loop, queue = target
                self._post(loop, queue, _Aborted(rid))

    def _abort_all(self) -> None:
        with self._cv:
            request_ids = list(self._queues)
        self._abort(request_ids)
        self._stats = self.engine.get_stats()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            if self.output_observer is not None:
                try:
                    self.output_observer(out, now)
                except Exception:  # noqa: BLE001 - metrics must never kill the engine
                    logger.exception("output observer failed")
            with self._cv:
                target = self._queues.get(out.request_id)
                if out.finished:
                    self._queues.pop(out.request_id, None)
            if target is not None:
                self._post(*target, out)

    def _fail_all(self, exc: BaseException) -> None:
        with self._cv:
            targets = list(self._queues.values())
            self._queues.clear()
            pending = [c for c in self._commands if c[2] is not None]
            self._commands.clear()
        for _, _, future in pending:
            future.set_exception(exc)
        for loop, queue in {id(q): (lp, q) for lp, q in targets}.values():
            self._post(loop, queue, exc)

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:
            pass  # the event loop is closed: nobody is listening any more
