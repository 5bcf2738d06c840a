"""`jaxpaged serve`: vLLM's flags -> LLM (model, tokenizer, runner, Engine) -> uvicorn.

    add_arguments(parser)   the flags, with vLLM's names (jaxpaged/cli.py wires them in)
    run(args) -> int        load the model, serve until SIGTERM/SIGINT, drain, exit 0

Shutdown drains: the first SIGTERM (or Ctrl-C) makes every new request a 503, lets
in-flight requests finish for up to --drain-timeout seconds, aborts what is left, and then
lets uvicorn close the connections. A second signal skips the wait.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging

import uvicorn

from jaxpaged.engine.async_engine import AsyncEngine
from server.app import MAX_BODY_BYTES, build_app

logger = logging.getLogger(__name__)

# LLM keyword -> argparse dest; only flags the user gave are passed on.
_LLM_KWARGS = (
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "gpu_memory_utilization",
    "tensor_parallel_size",
    "enable_prefix_caching",
    "async_scheduling",
    "async_depth",
    "num_kv_blocks",
    "seed",
    "distributed_coordinator",
    "num_processes",
    "process_id",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="HF directory or converted checkpoint (default: bundled SmolLM2)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="model name(s) the API answers to (default: the model path)",
    )
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--tensor-parallel-size", type=int, default=None)
    parser.add_argument(
        "--distributed-coordinator",
        default=None,
        help="HOST:PORT of process 0; every process of a multi-host mesh gets the same one",
    )
    parser.add_argument("--num-processes", type=int, default=None, help="processes (hosts)")
    parser.add_argument("--process-id", type=int, default=None, help="this process, 0..N-1")
    parser.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None
    )
    parser.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="overlap scheduling of step k+1 with step k on the device (default on)",
    )
    parser.add_argument(
        "--async-depth",
        type=int,
        default=None,
        help="async: dispatched steps that may be unread when the next is scheduled (default 1)",
    )
    parser.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="KV cache blocks (CPU sizing; overrides the memory fraction)",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on SIGTERM",
    )
    parser.add_argument("--max-request-body-bytes", type=int, default=MAX_BODY_BYTES)
    parser.add_argument("--log-level", default="info")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first exit signal drains the engine before shutting down.

    uvicorn re-raises captured signals after a graceful exit (the process would then die
    of SIGTERM); a drained shutdown is a clean exit, so signals are not recorded.
    """

    def __init__(self, config: uvicorn.Config, async_engine: AsyncEngine, drain_timeout: float):
        super().__init__(config)
        self.async_engine = async_engine
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self._draining or self._loop is None:
            self.should_exit = True
            return
        self._draining = True
        self.async_engine.accepting = False  # 503 from here on, even before the task runs
        logger.info("signal %s: draining (up to %.0f s)", sig, self.drain_timeout)
        self._loop.call_soon_threadsafe(self._loop.create_task, self._drain())

    async def _drain(self) -> None:
        finished = await self.async_engine.drain(self.drain_timeout)
        logger.info("drained (%s); shutting down", "clean" if finished else "aborted leftovers")
        self.should_exit = True


def build_server(llm, args: argparse.Namespace) -> tuple[DrainingServer, AsyncEngine]:
    engine = llm.engine
    async_engine = AsyncEngine(engine).start()
    names = args.served_model_name or [args.model or getattr(llm, "model_name", "default")]
    app = build_app(
        async_engine,
        llm.get_tokenizer(),
        names,
        engine.max_model_len,
        api_key=args.api_key,
        max_body_bytes=args.max_request_body_bytes,
    )
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level,
        timeout_graceful_shutdown=5, access_log=False,
    )  # fmt: skip
    return DrainingServer(config, async_engine, args.drain_timeout), async_engine


def run(args: argparse.Namespace) -> int:
    from jaxpaged.llm import LLM  # jax is imported here, not when the CLI parses flags

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    kwargs = {k: getattr(args, k) for k in _LLM_KWARGS if getattr(args, k, None) is not None}
    accepted = inspect.signature(LLM).parameters
    for key in [k for k in kwargs if k not in accepted]:
        if key == "tensor_parallel_size" and kwargs[key] == 1:
            del kwargs[key]
        else:
            raise SystemExit(f"--{key.replace('_', '-')} is not supported by this build's LLM.")
    # usage_context: the server's default sizes (vLLM's), shorter steps than offline ones.
    llm = LLM(model=args.model, usage_context="server", **kwargs)
    if (args.num_processes or 1) > 1:
        return _run_multiprocess(llm, args)
    server, async_engine = build_server(llm, args)
    try:
        server.run()
    finally:
        async_engine.shutdown()
    return 0


def _run_multiprocess(llm, args: argparse.Namespace) -> int:
    """Process 0 serves HTTP and schedules; the others replay its steps on their devices
    (jaxpaged/runner/multihost.py) until it shuts down."""
    from jaxpaged.runner.multihost import MirroredRunner, follow

    if args.process_id:
        follow(llm.model_runner)
        return 0
    runner = MirroredRunner(llm.model_runner)
    llm.engine.model_runner = runner
    server, async_engine = build_server(llm, args)
    try:
        server.run()
    finally:
        async_engine.shutdown()
        runner.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxpaged serve")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
