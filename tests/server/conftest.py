"""Server fixtures: a tiny random Llama checkpoint and a real uvicorn server on loopback.

The checkpoint (2 layers, hidden 32) uses the locally trained byte-level tokenizer with a
ChatML chat template. One LLM is built per session (its compile is the slow part) and served
by uvicorn in a thread, on a free 127.0.0.1 port, with an API key so the 401 path is live.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time

import pytest

from tests.tokenizer_utils import build_byte_level_tokenizer, save_tokenizer

API_KEY = "test-key"
MODEL_NAME = "tiny-llama"
MAX_MODEL_LEN = 256
NUM_KV_BLOCKS = 192
MAX_NUM_SEQS = 16
# Few step buckets: compiling them dominates the suite's time on CPU.
MAX_NUM_BATCHED_TOKENS = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_llama(path) -> None:
    """Random-weight Llama with the tiny tokenizer, saved as an HF directory."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = build_byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_MODEL_LEN,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )
    model.save_pretrained(str(path), safe_serialization=True)
    save_tokenizer(tok, path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(path)
    return path


@pytest.fixture(scope="session")
def llm(tiny_model_dir):
    from jaxpaged.llm import LLM

    return LLM(
        model=str(tiny_model_dir), num_kv_blocks=NUM_KV_BLOCKS, max_model_len=MAX_MODEL_LEN,
        max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
        enable_prefix_caching=True, seed=0, show_progress=False,
    )  # fmt: skip


def server_args(**overrides) -> argparse.Namespace:
    from server.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--port", str(free_port()), "--log-level", "warning"])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


class ServerThread:
    """uvicorn in a thread (no signal handlers off the main thread); stop() joins it."""

    def __init__(self, llm, **overrides) -> None:
        from server.cli import build_server

        self.args = server_args(**overrides)
        self.server, self.async_engine = build_server(llm, self.args)
        self.base_url = f"http://127.0.0.1:{self.args.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.async_engine.shutdown()

    def wait_idle(self, timeout: float = 15.0):
        """Waits until no request is in flight and every block is free again; returns stats."""
        baseline = NUM_KV_BLOCKS - 1
        deadline = time.monotonic() + timeout
        while True:
            stats = self.async_engine.get_stats()
            idle = (
                self.async_engine.num_in_flight == 0
                and not self.async_engine.engine.has_unfinished_requests()
            )
            if idle and stats.scheduler.num_free_blocks == baseline:
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not idle: {self.async_engine.num_in_flight} in flight, "
                    f"{stats.scheduler.num_free_blocks}/{baseline} blocks free"
                )
            time.sleep(0.05)


@pytest.fixture(scope="session")
def server(llm):
    srv = ServerThread(llm, api_key=API_KEY, served_model_name=[MODEL_NAME]).start()
    yield srv
    srv.stop()
