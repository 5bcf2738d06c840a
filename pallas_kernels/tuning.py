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
    p_in_registers: bool = True
    """P @ V with P as the wgmma register operand; False stages P through SMEM (the only
    form Mosaic GPU interpret mode runs, so interpret mode always uses it)."""

    def __post_init__(self):
        if self.block_kv % 64 or self.block_kv <= 0:
            raise ValueError(f"block_kv={self.block_kv} must be a positive multiple of 64.")
        if self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} must be >= 1.")
        if self.num_splits < 1:
            raise ValueError(f"num_splits={self.num_splits} must be >= 1.")


# (head_dim, split?) -> (block_kv, num_stages). H100, 32/8 heads, d=128, block 16, tune run of
# 2026-11-22 (P in registers, ~96 KB SMEM so two programs fit on an SM): 64-key steps with 2
# stages were best or within 1% everywhere (B=32 at 2k: 99.0 us vs 104.9 for 128 keys and 105.3
# for 3 stages; B=128 at 512: 101.5 vs 110.4; B=128 at 8k: 1.425 ms for both). NHD and HND pools
# were within 1% in the first tune run.
_DECODE_TILE: dict[tuple[int, bool], tuple[int, int]] = {
    (128, False): (64, 2),
    (128, True): (64, 2),
    (64, False): (64, 2),
    (64, True): (64, 2),
}
# Prefill, one 2048-token chunk over 2048 history: (64, 2) 299 TFLOP/s, P via SMEM 270,
# (128, 2) 225, (64, 3) 206 (three stages or 128-key tiles leave one program per SM).
_RAGGED_TILE: dict[int, tuple[int, int]] = {128: (64, 2), 64: (64, 2)}


def decode_config(
    num_seqs: int, num_kv_heads: int, head_dim: int, block_size: int, max_context: int
) -> KernelConfig:
    """Split-K so that num_seqs * num_kv_heads * splits is about one program per SM (measured:
    B=1 at 8k, 16 splits 22.0 us vs 8: 26.8 and 32: 23.3; B=8 at 2k, 2 splits 32.7 us vs 1: 47.5
    and 4: 31.9; B=32 at 2k, 1 split 99.0 us vs 2: 99.9), at most one split per 128 keys."""
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
