"""The contract between the runner and the model: where each token's K/V goes and what it reads.

A step holds T tokens (padded to a bucket) of R requests (padded to a bucket). Request r owns
tokens query_start_loc[r] : query_start_loc[r + 1]; they are the last query lengths of its
seq_lens[r] tokens, so the token at flat index t sits at position
seq_lens[r] - (query_start_loc[r + 1] - t). Padding requests have zero query length and
seq_len 0; padding tokens' slots are in the null block 0 (the reference backend writes
them there, the Pallas backend drops them) and their outputs are ignored.

    block_tables[r] : [b0, b1, b2, 0, 0]     token i of request r lives in
                                             block block_tables[r, i // block_size],
                                             row i % block_size
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: jax.Array
    """i32[T]: flat KV slot (block_id * block_size + offset) each new token is written to."""
    query_start_loc: jax.Array
    """i32[R + 1]: prefix sums of query lengths; query_start_loc[R] == number of real tokens."""
    seq_lens: jax.Array
    """i32[R]: tokens in each request's context including this step's (0 for padding)."""
    block_tables: jax.Array
    """i32[R, max_blocks]: each request's blocks, padded with the null block 0."""
    token_req_idx: jax.Array
    """i32[T]: which request each token belongs to (padding tokens point at a padding row)."""
    decode_only: bool = field(default=False, metadata=dict(static=True))
    """Every request has exactly one query token (T == R): the decode kernel applies."""

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]
