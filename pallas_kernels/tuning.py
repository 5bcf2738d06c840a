"""Tuning tables for the paged-attention kernels, kept apart from the kernels.

Keys are static shapes only (the jit cache key): sequence lengths are dynamic, so the decode
table is keyed by the batch and by the pool's per-sequence capacity (max_blocks * block_size).
Entries come from benchmarks/kernels.py on an H100 (docs/benchmarks.md, "Kernels").
"""

from __future__ import annotations

from dataclasses import dataclass

NUM_SMS = 132
"""H100 SXM multiprocessors: split-K aims at about one program per SM."""


@dataclass(frozen=True)
class KernelConfig:
    block_kv: int = 64
    """Keys per pipeline step (a multiple of block_size and of 64)."""
    num_stages: int = 2
    """K/V tiles in flight per program (TMA double/triple buffering)."""
    num_splits: int = 1
    """Split-K partitions of each sequence's keys (decode only), merged by log-sum-exp."""

    def __post_init__(self):
        if self.block_kv % 64 or self.block_kv <= 0:
            raise ValueError(f"block_kv={self.block_kv} must be a positive multiple of 64.")
        if self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} must be >= 1.")
        if self.num_splits < 1:
            raise ValueError(f"num_splits={self.num_splits} must be >= 1.")


# (head_dim, split?) -> (block_kv, num_stages). H100, 32/8 heads, d=128, block 16
# (tune run of 2026-11-22): without split-K, 128-key steps beat 64 by 3-10% (B=128: 1.43 vs
# 1.49 ms at 8k); with split-K the splits are short and 64-key steps win (B=1, 8k: 26.1 vs
# 27.7 us). Three stages never beat two. NHD and HND pools were within 1%.
_DECODE_TILE: dict[tuple[int, bool], tuple[int, int]] = {
    (128, False): (128, 2),
    (128, True): (64, 2),
    (64, False): (128, 2),
    (64, True): (64, 2),
}
# Prefill (2048-token chunk, 2048 history): block_kv 128 / 2 stages 211 TFLOP/s, 64 / 2: 188,
# 64 / 3: 180.
_RAGGED_TILE: dict[int, tuple[int, int]] = {128: (128, 2), 64: (128, 2)}


def decode_config(
    num_seqs: int, num_kv_heads: int, head_dim: int, block_size: int, max_context: int
) -> KernelConfig:
    """Split-K so that num_seqs * num_kv_heads * splits is about one program per SM (measured:
    B=1 at 8k, 16 splits 22.5 us vs 33 splits 26.1 us; B=8 at 2k, 2 splits 33.2 us vs 5 splits
    41.8 us; B=32 at 2k, 1 split 104 us vs 2 splits 109 us), at most one split per two steps."""
    del block_size
    programs = max(num_seqs * num_kv_heads, 1)
    splits = max(1, NUM_SMS // programs)
    splits = max(1, min(splits, max_context // 128))
    block_kv, stages = _DECODE_TILE.get((head_dim, splits > 1), (64, 2))
    return KernelConfig(block_kv=block_kv, num_stages=stages, num_splits=splits)


def ragged_config(num_tokens: int, head_dim: int, block_size: int) -> KernelConfig:
    del num_tokens, block_size
    block_kv, stages = _RAGGED_TILE.get(head_dim, (64, 2))
    return KernelConfig(block_kv=block_kv, num_stages=stages, num_splits=1)
