"""The offline API, with vLLM's signatures: `LLM(model=...).generate(prompts, params)`.

LLM(...)  resolve model (default: bundled SmolLM2) -> ModelConfig, tokenizer
          -> params (converted dir, HF dir on the fly, or dummy) -> ModelRunner
          -> size the KV pool -> compile every step bucket -> Engine
generate  tokenize -> engine.add_request for all -> engine.step() until done
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from jaxpaged import envs
from jaxpaged.attention.backend import default_backend_name, get_backend
from jaxpaged.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from jaxpaged.engine.engine import Engine
from jaxpaged.outputs import RequestOutput
from jaxpaged.runner import kv_sizing
from jaxpaged.runner.model_runner import ModelRunner
from jaxpaged.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict


def _enable_compilation_cache() -> None:
    path = envs.compilation_cache_dir()
    if path and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def freeze_startup_heap() -> None:
    """Collect once, then move every object alive now (the model, the compiled steps, JAX's
    and the libraries' own state: ~300k objects) out of the garbage collector's reach. They
    live as long as the engine, yet each full collection walked them all: on the H200 host
    such a pass stalled one step of a throughput run by ~0.5 s, two or three times per run
    (docs/benchmarks.md). Objects made later (the requests) are collected as usual."""
    gc.collect()
    gc.freeze()


def _resolve_dtype(dtype: str | Any) -> Any:
    if dtype == "auto":
        # bf16 on accelerators; CPUs have no fast bf16 matmul.
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(dtype)


def _load_model(model: str | None, load_format: str):
    """-> (model dir or None, ModelConfig)."""
    from jaxpaged.models.loader import PRESETS, config_from_preset

    if load_format == "dummy" and model in PRESETS:
        return None, config_from_preset(model)
    if model is None:
        from jaxpaged.default_model import default_model_path

        model = default_model_path()
    if not os.path.isdir(model):
        raise FileNotFoundError(
            f"Model {model!r} is not a directory (there is no model hub here); pass a "
            "converted or Hugging Face checkpoint dir, or a preset with load_format='dummy'."
        )
    return model, ModelConfig.from_dir(model)


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        tokenizer: str | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        block_size: int = 16,
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        load_format: str = "auto",
        num_kv_blocks: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        scheduling_policy: str = "fcfs",
        attention_backend: str | None = None,
        enable_chunked_prefill: bool = True,
        async_scheduling: bool = True,
        async_depth: int = 1,
        stable_buffers: bool | None = None,
        show_progress: bool = True,
        tensor_parallel_size: int = 1,
        distributed_coordinator: str | None = None,
        num_processes: int = 1,
        process_id: int = 0,
        usage_context: str = "llm",
    ) -> None:
        if distributed_coordinator is not None:
            from jaxpaged.sharding import init_distributed

            init_distributed(distributed_coordinator, num_processes, process_id)
        if usage_context not in ("llm", "server"):
            raise ValueError(f"usage_context must be 'llm' or 'server', got {usage_context!r}.")
        if load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}.")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}."
            )
        _enable_compilation_cache()
        self.model_path, model_config = _load_model(model, load_format)
        self.tokenizer = self._load_tokenizer(tokenizer or self.model_path)
        self.dtype = _resolve_dtype(dtype)
        on_cpu = jax.default_backend() == "cpu"
        max_model_len = self._max_model_len(model_config, max_model_len)
        max_num_seqs, max_num_batched_tokens = kv_sizing.resolve_batch_limits(
            max_num_seqs, max_num_batched_tokens, for_server=usage_context == "server"
        )
        scheduler_config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            policy=scheduling_policy,
            enable_chunked_prefill=enable_chunked_prefill,
            async_scheduling=async_scheduling,
            async_depth=async_depth,
        )
        self.backend = get_backend(attention_backend or default_backend_name())
        run_config, shardings, plan = self._setup_tp(model_config, tensor_parallel_size)
        params = self._load_params(model_config, load_format, seed, shardings, plan)
        bytes_per_block = kv_sizing.block_bytes(
            run_config, block_size, self.dtype, tensor_parallel_size
        )
        min_blocks = kv_sizing.blocks_per_seq(max_model_len, block_size) + 1
        runner = ModelRunner(
            run_config, params, self.backend, self.dtype, mesh_shardings=shardings,
            num_blocks=num_kv_blocks or min_blocks, block_size=block_size,
            max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            stable_buffers=not on_cpu if stable_buffers is None else stable_buffers,
        )  # fmt: skip
        num_blocks = num_kv_blocks
        if num_blocks is None:
            if on_cpu:
                budget = kv_cache_memory_bytes or kv_sizing.DEFAULT_CPU_KV_BYTES
            else:
                budget = kv_sizing.gpu_kv_budget(
                    runner.profile_peak_bytes(), gpu_memory_utilization
                )
            num_blocks = kv_sizing.num_blocks_from_bytes(budget, bytes_per_block)
        kv_sizing.check_fits(num_blocks, max_model_len, block_size, bytes_per_block)
        if num_blocks != runner.num_blocks:
            runner.reallocate_kv(num_blocks)
        logger.info("KV pool: %d blocks of %d tokens", runner.num_blocks, block_size)
        self.compile_seconds = runner.compile_all(show_progress)
        cache_config = CacheConfig(block_size, runner.num_blocks, enable_prefix_caching)
        parallel = ParallelConfig(tensor_parallel_size)
        self.config = EngineConfig(model_config, cache_config, scheduler_config, parallel)
        self.model_runner = runner
        self.engine = Engine(self.config, runner, self.tokenizer, seed=seed)
        self._counter = itertools.count()
        if envs.gc_freeze():
            freeze_startup_heap()

    # ---- set-up helpers -----------------------------------------------------------------
    @staticmethod
    def _load_tokenizer(path: str | None):
        names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
        if path is None or not any(os.path.exists(os.path.join(path, n)) for n in names):
            logger.warning("No tokenizer in %s: prompts must be token ids, text is empty.", path)
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)

    @staticmethod
    def _max_model_len(config: ModelConfig, requested: int | None) -> int:
        limit = config.max_position_embeddings
        if config.sliding_window and config.sliding_window < limit:
            # Within the window, attention is full; beyond it we would need windowed kernels.
            limit = config.sliding_window
        if requested is None:
            return limit
        if requested > limit:
            raise ValueError(
                f"max_model_len={requested} exceeds the model's limit of {limit} tokens "
                "(max_position_embeddings / sliding_window in config.json)."
            )
        return requested

    def _setup_tp(self, config: ModelConfig, tp: int):
        """-> (config the model runs with, MeshShardings or None, TPPlan or None). tp == 1
        in one process: no mesh, no shard_map, the single-device path unchanged."""
        if tp == 1 and jax.process_count() == 1:
            return config, None, None
        from jaxpaged import sharding
        from jaxpaged.models.llama import build_model

        plan = sharding.plan_tp(config, tp)
        mesh = sharding.make_mesh(tp)
        self.backend = sharding.shard_attention(self.backend, mesh)
        model = build_model(plan.config, self.backend, self.dtype)
        logger.info("tp=%d over %s; kv heads replicated x%d", tp, mesh.devices.tolist(),
                    plan.kv_replication)  # fmt: skip
        return plan.config, sharding.make_shardings(model, mesh, plan), plan

    def _load_params(self, config: ModelConfig, load_format: str, seed: int, shardings, plan):
        """Every leaf goes straight to its shards; kv heads are replicated after loading
        (on device, leaf by leaf) when tp needs more kv heads than the checkpoint has."""
        from jaxpaged.models.loader import dummy_params, load_params

        targets = None
        if shardings is not None:
            from jaxpaged.sharding import load_shardings

            targets = load_shardings(shardings.params, plan)
        if load_format == "dummy":
            params = dummy_params(config, self.dtype, targets, seed=seed)
        else:
            params = load_params(self.model_path, config, self.dtype, targets)
        if plan is not None:
            from jaxpaged.sharding import replicate_kv_heads

            params = replicate_kv_heads(params, plan, shardings.params)
        return params

    def get_tokenizer(self):
        return self.tokenizer

    # ---- generation ---------------------------------------------------------------------
    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("This model has no tokenizer; pass token id lists.")
            return prompt, self.tokenizer.encode(prompt)
        return None, [int(t) for t in prompt]

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str | dict) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(
                f"Got {len(sampling_params)} sampling params for {len(prompts)} prompts."
            )
        request_ids = self._add_requests(prompts, sampling_params, priority)
        return self._run(request_ids, use_tqdm)

    def _add_requests(self, prompts, sampling_params, priority) -> list[str]:
        request_ids: list[str] = []
        try:
            for i, (prompt, sp) in enumerate(zip(prompts, sampling_params, strict=True)):
                text, token_ids = self._tokenize(prompt)
                request_id = str(next(self._counter))
                prio = priority[i] if priority else 0
                self.engine.add_request(request_id, text, token_ids, sp, priority=prio)
                request_ids.append(request_id)
        except Exception:
            # Nothing is lost or left behind: requests already queued are withdrawn.
            self.engine.abort_request(request_ids)
            raise
        return request_ids

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Generating", disable=not use_tqdm)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        except BaseException:
            self.engine.abort_request(request_ids)
            raise
        finally:
            bar.close()
        return [finished[r] for r in request_ids]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        if self.tokenizer is None:
            raise ValueError("This model has no tokenizer, so it has no chat template.")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
