"""Per-request block tables on top of the BlockPool, and the prefix cache's lookup side.

The scheduler drives it with three calls, as in vLLM V1:

    get_computed_blocks(req)  -> the longest cached prefix of req's full blocks (admission)
    allocate_slots(req, n, ...) -> blocks for n more tokens, or None without touching anything
    free(req)                 -> its blocks go back to the pool, tail first, still cached

and one that vLLM folds into allocate_slots:

    cache_blocks(req, num_computed_tokens) -> full blocks whose KV is now written become
                                              cache hits for later requests

Caching is deferred until the step that computed a block has run (the scheduler calls
`cache_blocks` from `update_from_output`). A block is therefore only ever a cache hit once
its KV is in the pool, whatever order the runner writes and reads KV within a step, and a
request preempted after being scheduled never leaves an unwritten block in the cache.
The price: requests admitted in the same step with the same prompt compute it each.

Block hashes are chained over full blocks of `request.all_token_ids` and stored in
`request.block_hashes`; `request.cache_salt` folds into the first block's hash only, so a
salted prompt shares nothing with an unsalted or differently salted one.
"""

from __future__ import annotations

from collections import defaultdict

from jaxpaged.engine.block_pool import BlockPool, KVCacheBlock, hash_block_tokens
from jaxpaged.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_caching: bool, max_model_len: int
    ) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.max_model_len = max_model_len
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: defaultdict[str, list[KVCacheBlock]] = defaultdict(list)
        """request_id -> its block table, in token order."""
        self.num_cached_blocks: dict[str, int] = {}
        """request_id -> how many leading blocks of its table are registered in the cache."""
        self.prefix_cache_queries = 0
        """Tokens looked up by get_computed_blocks (cumulative)."""
        self.prefix_cache_hits = 0
        """Tokens found (cumulative)."""

    @property
    def usage(self) -> float:
        return self.block_pool.get_usage()

    def get_num_free_blocks(self) -> int:
        return self.block_pool.get_num_free_blocks()

    def get_block_ids(self, request_id: str) -> list[int]:
        return [block.block_id for block in self.req_to_blocks.get(request_id, ())]

    def update_block_hashes(self, request: Request) -> None:
        """Extend request.block_hashes to cover every full block of its tokens."""
        bs, hashes = self.block_size, request.block_hashes
        tokens = request.all_token_ids
        for i in range(len(hashes), request.num_tokens // bs):
            parent = hashes[i - 1] if i else None
            extra = (request.cache_salt,) if i == 0 and request.cache_salt is not None else None
            hashes.append(hash_block_tokens(parent, tokens[i * bs : (i + 1) * bs], extra))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of full blocks and its length in tokens.

        Capped at num_tokens - 1 tokens: the last token must be computed again for its logits
        even when the whole prompt is cached.
        """
        if not self.enable_caching:
            return [], 0
        self.update_block_hashes(request)
        max_num_blocks = (request.num_tokens - 1) // self.block_size
        blocks: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_num_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        num_computed_tokens = len(blocks) * self.block_size
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_computed_tokens
        return blocks, num_computed_tokens

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        num_new_computed_tokens: int = 0,
        new_computed_blocks: list[KVCacheBlock] | None = None,
    ) -> list[KVCacheBlock] | None:
        """Make room for num_new_tokens after the request's computed (and newly hit) tokens.

        Layout of the request's block table after the call:

            | blocks it had | new_computed_blocks (hits) | newly allocated blocks |

        Returns the newly allocated blocks, or None (changing nothing) if the pool cannot
        supply them. Free cached blocks among new_computed_blocks do not count as free here,
        since touching them takes them out of the free queue.
        """
        if num_new_tokens <= 0:
            raise ValueError(f"num_new_tokens must be > 0, got {num_new_tokens}.")
        req_blocks = self.req_to_blocks[request.request_id]
        num_computed_tokens = request.num_computed_tokens + num_new_computed_tokens
        num_tokens_need_slot = min(num_computed_tokens + num_new_tokens, self.max_model_len)
        if not new_computed_blocks and num_tokens_need_slot <= len(req_blocks) * self.block_size:
            # The common decode case, every step of every running request: the slots fit
            # the blocks it has, so nothing is taken from the pool.
            self.cache_blocks(request, num_computed_tokens)
            return []
        new_computed_blocks = new_computed_blocks or []
        num_required_blocks = cdiv(num_tokens_need_slot, self.block_size)
        num_new_blocks = max(0, num_required_blocks - len(req_blocks) - len(new_computed_blocks))
        num_evictable_hits = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        if num_new_blocks > self.block_pool.get_num_free_blocks() - num_evictable_hits:
            if not req_blocks:
                del self.req_to_blocks[request.request_id]  # the defaultdict lookup added it
            return None

        if new_computed_blocks:
            assert not req_blocks, "prefix hits only extend an empty block table"
            self.block_pool.touch(new_computed_blocks)
            req_blocks.extend(new_computed_blocks)
            self.num_cached_blocks[request.request_id] = len(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(num_new_blocks)
        req_blocks.extend(new_blocks)
        # Tokens computed before this step have their KV written: cache any block they fill.
        self.cache_blocks(request, num_computed_tokens)
        return new_blocks

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that the first num_computed_tokens tokens fill."""
        if not self.enable_caching:
            return
        request_id = request.request_id
        num_full_blocks = min(num_computed_tokens, request.num_tokens) // self.block_size
        num_cached_blocks = self.num_cached_blocks.get(request_id, 0)
        if num_full_blocks <= num_cached_blocks:
            return
        self.update_block_hashes(request)
        req_blocks = self.req_to_blocks[request_id]
        assert len(req_blocks) >= num_full_blocks, (request, len(req_blocks), num_full_blocks)
        self.block_pool.cache_full_blocks(
            req_blocks, request.block_hashes, num_cached_blocks, num_full_blocks
        )
        self.num_cached_blocks[request_id] = num_full_blocks

    def free(self, request: Request) -> None:
        """Release the request's blocks, last block first so it is evicted first."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.block_pool.free_blocks(reversed(blocks))

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()
