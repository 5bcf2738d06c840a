"""The padded step shapes compiled at start-up.

A step is padded to a (num_tokens, num_reqs, decode_only) bucket:
- decode steps (one token per request): T == R, R a power of two up to max_num_seqs;
- other steps: T a power of two from 16 up to max_num_batched_tokens, and R a power of four
  (fewer compiles; the per-request work is small next to the per-token work).
Every real step maps to exactly one bucket, so the serving loop never compiles.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


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
    mixed_reqs: tuple[int, ...]

    @classmethod
    def make(cls, max_num_seqs: int, max_num_batched_tokens: int) -> Buckets:
        return cls(
            decode_reqs=tuple(_powers(1, 2, max_num_seqs)),
            mixed_tokens=tuple(_powers(16, 2, max_num_batched_tokens)),
            mixed_reqs=tuple(_powers(4, 4, max_num_seqs)),
        )

    def _mixed_reqs_for(self, num_tokens: int) -> list[int]:
        # Requests buckets up to the first one that covers num_tokens (R <= T always holds
        # for real steps, so larger ones are never selected).
        reqs = [r for r in self.mixed_reqs if r < num_tokens]
        cover = [r for r in self.mixed_reqs if r >= num_tokens]
        return reqs + cover[:1]

    def all_keys(self) -> list[tuple[int, int, bool]]:
        keys = [(r, r, True) for r in self.decode_reqs]
        for t in self.mixed_tokens:
            keys += [(t, r, False) for r in self._mixed_reqs_for(t)]
        return keys

    def select(self, num_tokens: int, num_reqs: int, decode_only: bool) -> tuple[int, int, bool]:
        if decode_only:
            r = self.decode_reqs[bisect.bisect_left(self.decode_reqs, num_reqs)]
            return (r, r, True)
        t = self.mixed_tokens[bisect.bisect_left(self.mixed_tokens, num_tokens)]
        r = self.mixed_reqs[bisect.bisect_left(self.mixed_reqs, num_reqs)]
        return (t, r, False)
