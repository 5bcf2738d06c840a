"""The padded step shapes compiled at start-up.

A step is padded to a (num_tokens, num_reqs, decode_only) bucket:
- decode steps (one token per request): T == R, R a power of two up to max_num_seqs;
- other steps: T a power of two from 128 up to max_num_batched_tokens, and R = min(T,
  max_num_seqs), the most requests T tokens can hold. Padding requests cost only per-request
  work (a block-table row, one logits row and its sampling), small next to T tokens through
  the model, and one R per T halves the buckets to trace and compile at start-up. Up to 128
  tokens the matmuls stay memory-bound (T tokens make ~T FLOP per weight byte; an H200's
  matmul rate over its copy bandwidth is ~240), so a step takes about its weight-read time
  whatever T, and smaller mixed buckets would only add start-up time: ~2 s of tracing per
  bucket on the 8B shape (46 s for 22 buckets, docs/benchmarks.md).
Every real step maps to exactly one bucket, so the serving loop never compiles.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

MIN_MIXED_TOKENS = 128
"""The smallest mixed-step bucket (or max_num_batched_tokens, if smaller)."""


def _powers(start: int, factor: int, limit: int) -> list[int]:
    out, x = [], start
    while x < limit:
        out.append(x)
        x *= factor
    return out + [limit]


@dataclass(frozen=True)
class Buckets:
    decode_reqs: tuple[int, ...]
    mixed_tokens: tuple[int, ...]
    max_num_seqs: int

    @classmethod
    def make(cls, max_num_seqs: int, max_num_batched_tokens: int) -> Buckets:
        return cls(
            decode_reqs=tuple(_powers(1, 2, max_num_seqs)),
            mixed_tokens=tuple(
                _powers(min(MIN_MIXED_TOKENS, max_num_batched_tokens), 2, max_num_batched_tokens)
            ),
            max_num_seqs=max_num_seqs,
        )

    def _mixed_reqs(self, num_tokens: int) -> int:
        return min(num_tokens, self.max_num_seqs)

    def all_keys(self) -> list[tuple[int, int, bool]]:
        keys = [(r, r, True) for r in self.decode_reqs]
        return keys + [(t, self._mixed_reqs(t), False) for t in self.mixed_tokens]

    def select(self, num_tokens: int, num_reqs: int, decode_only: bool) -> tuple[int, int, bool]:
        if decode_only:
            r = self.decode_reqs[bisect.bisect_left(self.decode_reqs, num_reqs)]
            return (r, r, True)
        t = self.mixed_tokens[bisect.bisect_left(self.mixed_tokens, num_tokens)]
        return (t, self._mixed_reqs(t), False)
