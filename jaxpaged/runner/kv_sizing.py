"""How many KV blocks the pool gets.

GPU: budget = gpu_memory_utilization x device memory. The runner first runs its largest step
bucket against a minimal pool; what the device then has in use at peak (weights, activations,
sampler state) is subtracted, and what is left becomes blocks.
CPU: an explicit `num_kv_blocks`, or a byte budget (`kv_cache_memory_bytes`, default 1 GiB).
Either way the pool must hold one max_model_len sequence, or start-up fails with the numbers.
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from jaxpaged import envs
from jaxpaged.config import ModelConfig

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 1 << 30


def block_bytes(config: ModelConfig, block_size: int, dtype, tensor_parallel_size: int = 1) -> int:
    """Bytes of one block across all layers, K and V, on each device: the pool is split
    over kv heads, so each of tp devices holds num_kv_heads / tp of every block."""
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim
    return per_token * block_size * np.dtype(dtype).itemsize // tensor_parallel_size


def blocks_per_seq(max_model_len: int, block_size: int) -> int:
    return -(-max_model_len // block_size)


LARGE_GPU_BYTES = 70 * 2**30


def default_batch_limits(for_server: bool = False) -> tuple[int, int]:
    """The default (max_num_seqs, max_num_batched_tokens) for sizes the user leaves unset;
    vLLM's choice by device: on GPUs of >= 70 GiB other than the A100, 1024 sequences and
    16,384 tokens per step for offline generation and 8,192 for the server (whose steps'
    time is its requests' latency); on smaller GPUs 256 and 8,192 / 2,048. On CPU, 16 and
    256. The device is this process's first (the hosts of one mesh have the same GPUs)."""
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return 16, 256
    limit = (device.memory_stats() or {}).get("bytes_limit", 0)
    if not limit:  # e.g. XLA_PYTHON_CLIENT_ALLOCATOR=platform: no allocator limit to read
        logger.warning("GPU memory unknown: default max_num_seqs / max_num_batched_tokens "
                       "are those of a GPU under 70 GiB")  # fmt: skip
    if limit / envs.xla_mem_fraction() >= LARGE_GPU_BYTES and "A100" not in device.device_kind:
        return 1024, 8192 if for_server else 16384
    return 256, 2048 if for_server else 8192


def resolve_batch_limits(
    max_num_seqs: int | None, max_num_batched_tokens: int | None, for_server: bool = False
) -> tuple[int, int]:
    """The user's sizes, each unset one taken from default_batch_limits (the device is not
    queried when both are set). A default token budget is at least max_num_seqs, and a
    default max_num_seqs at most the user's token budget, so a decode step of every sequence
    fits in a step."""
    if max_num_seqs and max_num_batched_tokens:
        return max_num_seqs, max_num_batched_tokens
    default_seqs, default_tokens = default_batch_limits(for_server)
    if not max_num_seqs:
        max_num_seqs = min(default_seqs, max_num_batched_tokens or default_seqs)
    sizes = max_num_seqs, max_num_batched_tokens or max(default_tokens, max_num_seqs)
    logger.info("max_num_seqs=%d, max_num_batched_tokens=%d", *sizes)
    return sizes


def gpu_kv_budget(peak_bytes_in_use: int, gpu_memory_utilization: float) -> int:
    """Bytes the pool may take, given the peak measured in the profiling step."""
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit", 0)
    total = limit / envs.xla_mem_fraction()
    # Headroom inside the allocator: the profiled step is one bucket; the others, cuBLAS
    # workspaces and fragmentation need some slack (without it, steps after sizing OOMed).
    headroom = max(1 << 30, int(0.05 * limit))
    budget = min(limit - headroom, gpu_memory_utilization * total)
    logger.info(
        "KV budget: %.2f GiB (limit %.2f GiB, utilization %.2f, peak in use %.2f GiB)",
        (budget - peak_bytes_in_use) / 2**30, limit / 2**30, gpu_memory_utilization,
        peak_bytes_in_use / 2**30,
    )  # fmt: skip
    return int(budget - peak_bytes_in_use)


def num_blocks_from_bytes(budget: int, bytes_per_block: int) -> int:
    # +1: block 0 is the null block, on top of the budget's usable blocks.
    return max(budget // bytes_per_block, 0) + 1


def check_fits(num_blocks: int, max_model_len: int, block_size: int, bytes_per_block: int):
    need = blocks_per_seq(max_model_len, block_size)
    if num_blocks - 1 < need:
        raise ValueError(
            f"The KV cache pool has {num_blocks - 1} usable blocks "
            f"({(num_blocks - 1) * bytes_per_block / 2**20:.1f} MiB, {block_size} tokens each), "
            f"but one max_model_len={max_model_len} sequence needs {need} blocks "
            f"({need * bytes_per_block / 2**20:.1f} MiB). Increase gpu_memory_utilization / "
            "num_kv_blocks / kv_cache_memory_bytes, or decrease max_model_len."
        )
