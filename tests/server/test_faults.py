"""Faults: clients that hang up (requests aborted, blocks freed), 64 concurrent streams with
random disconnects, SIGTERM drain in a real `serve` process, and a dying engine loop."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from jaxpaged.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from jaxpaged.engine.engine import Engine
from tests.engine.test_engine import FakeModelRunner
from tests.server.conftest import (
    API_KEY,
    MAX_MODEL_LEN,
    MAX_NUM_BATCHED_TOKENS,
    MAX_NUM_SEQS,
    MODEL_NAME,
    NUM_KV_BLOCKS,
    ServerThread,
    free_port,
)
from tests.tokenizer_utils import build_byte_level_tokenizer

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _raw_post(port: int, path: str, body: dict) -> socket.socket:
    """Sends a request on a bare socket, so the test decides exactly when to hang up."""
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head.encode() + data)
    return sock


def _wait(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_request_and_frees_blocks(server, stream):
    server.wait_idle()
    before = server.async_engine.get_stats().generation_tokens_total
    body = {"model": MODEL_NAME, "prompt": "Hello " * 20, "max_tokens": 200, "ignore_eos": True,
            "stream": stream}  # fmt: skip
    sock = _raw_post(server.args.port, "/v1/completions", body)
    stats = server.async_engine.get_stats
    _wait(lambda: stats().generation_tokens_total >= before + 3)  # it is generating
    assert stats().scheduler.num_free_blocks < NUM_KV_BLOCKS - 1
    sock.close()
    server.wait_idle()  # aborted: no request in flight, every block free again
    assert stats().generation_tokens_total - before < 200


def test_load_64_streams_with_random_disconnects(server):
    rng = random.Random(0)
    num_clients, disconnect = 64, set(rng.sample(range(64), 13))
    plans = [(rng.randint(8, 32), rng.randint(1, 6) if i in disconnect else None)
             for i in range(num_clients)]  # fmt: skip

    async def client(h: httpx.AsyncClient, i: int):
        max_tokens, quit_after = plans[i]
        body = {"model": MODEL_NAME, "prompt": f"client {i} says", "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True, "logprobs": 0,
                "stream_options": {"include_usage": True}}  # fmt: skip
        tokens, usage, chunks = 0, None, 0
        async with h.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                chunks += 1
                if chunk["choices"]:
                    tokens += len(chunk["choices"][0]["logprobs"]["tokens"])
                usage = chunk.get("usage") or usage
                if quit_after is not None and chunks >= quit_after:
                    return None  # hang up mid-stream
        return tokens, usage["completion_tokens"]

    async def main():
        limits = httpx.Limits(max_connections=num_clients + 8)
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, limits=limits,
                                     timeout=60) as h:  # fmt: skip
            return await asyncio.wait_for(
                asyncio.gather(*(client(h, i) for i in range(num_clients))), timeout=180
            )

    start = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - start
    for i, result in enumerate(results):
        if i in disconnect:
            assert result is None
        else:
            assert result == (plans[i][0], plans[i][0]), (i, result, plans[i])
    stats = server.wait_idle()
    assert stats.scheduler.num_running_reqs == 0 and stats.scheduler.num_waiting_reqs == 0
    assert httpx.get(server.base_url + "/health").status_code == 200
    print(f"load: {num_clients} clients, {len(disconnect)} disconnects, {elapsed:.2f} s")


def test_sigterm_drains_then_exits_zero(tiny_model_dir):
    port = free_port()
    # The session LLM's sizes, so the persistent compilation cache makes this start fast.
    cmd = [sys.executable, "-m", "server.cli", str(tiny_model_dir), "--port", str(port),
           "--num-kv-blocks", str(NUM_KV_BLOCKS), "--max-model-len", str(MAX_MODEL_LEN),
           "--max-num-seqs", str(MAX_NUM_SEQS),
           "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS), "--drain-timeout", "60",
           "--log-level", "warning"]  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        result = {}
        first_chunk = threading.Event()

        def stream():
            body = {"prompt": "Hello", "max_tokens": 240, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    first_chunk.set()
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        result["usage"] = chunk.get("usage") or result.get("usage")
                        if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                            result["finish"] = chunk["choices"][0]["finish_reason"]

        t = threading.Thread(target=stream)
        t.start()
        assert first_chunk.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        refused = httpx.post(base + "/v1/completions", json={"prompt": "hi"}, timeout=10)
        assert refused.status_code == 503, refused.text
        t.join(120)
        assert result.get("finish") == "length" and result["usage"]["completion_tokens"] == 240
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class _FakeLLM:
    """An LLM-shaped object over the real Engine and a scripted runner (no jax)."""

    def __init__(self, runner_factory) -> None:
        tok = build_byte_level_tokenizer()
        model = ModelConfig(
            model_type="llama", vocab_size=len(tok), hidden_size=8, intermediate_size=16,
            num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
        )  # fmt: skip
        config = EngineConfig(model, CacheConfig(block_size=4, num_blocks=32), SchedulerConfig())
        self.tokenizer = tok
        self.engine = Engine(config, runner_factory(len(tok)), tok)

    def get_tokenizer(self):
        return self.tokenizer


class _DyingRunner(FakeModelRunner):
    def __init__(self, vocab_size: int) -> None:
        super().__init__(lambda r, i: 65, vocab_size)

    def execute_model(self, out):
        if self.num_steps >= 3:
            raise RuntimeError("device fell over")
        return super().execute_model(out)


def test_dead_engine_loop_makes_health_503():
    srv = ServerThread(_FakeLLM(_DyingRunner), served_model_name=["fake"]).start()
    try:
        with httpx.Client(base_url=srv.base_url, timeout=30) as h:
            assert h.get("/health").status_code == 200
            r = h.post("/v1/completions", json={"prompt": "hi", "max_tokens": 10})
            assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
            assert h.get("/health").status_code == 503
            again = h.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert again.status_code == 503
    finally:
        srv.stop()
